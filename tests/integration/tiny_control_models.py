"""Build tiny SD1 checkpoints with ControlNet-compatible UNets and tiny control models for sd-webui-controlnet
(v1.1.455) integration tests; nothing is downloaded, every weight comes from a fixed seed.

Run with the webui's Python: ``python tiny_control_models.py WEBUI_DIR OUT_DIR [--no-controlnet]``; the last
stdout line is JSON. Checkpoints (with their ``.yaml``) go to ``OUT_DIR``, control models to
``OUT_DIR/ControlNet`` (point the webui's ``models/ControlNet`` or ``--controlnet-dir`` there).

sd-webui-controlnet does not read a yaml for a control model: it guesses the architecture from the keys
(``scripts/controlnet_model_guess.py``) and loads non-strictly, so every key below is written with exactly the
shape the guess builds (a missing key would silently keep an unseeded random init):

- ``tiny_t2i_adapter_sd15``: a T2I-Adapter (``conv_in.weight`` of 192 input channels = RGB pixel-unshuffled by 8, SD1)
  whose widths [c, 2c, 4c, 4c] the guess takes from ``conv_in`` (c = 32). Its four features are added after
  input blocks 2, 5, 8 and 11 of an SD1 UNet, so it fits ``tiny_cn_base`` / ``tiny_cn_other`` (model_channels
  32, channel_mult [1, 2, 4, 4], num_res_blocks 2). ``ksize`` 1, no down-sampling convolutions (average
  pooling), as the original SD1.4 adapters. Scaled so its features are of the size of the UNet's activations.
- ``tiny_controlnet_sd15w``: a ControlNet (``input_hint_block.0.weight``). The guess always builds SD1.5 widths
  (model_channels 320, channel_mult [1, 2, 4, 4], attention at levels 0-2, 8 heads) and reads only
  ``context_dim`` from ``input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight``, so it needs a UNet of SD1.5
  widths: ``tiny_cn_sd15w`` (context_dim 32 with the tiny text encoder, tiny VAE). Its encoder starts as a copy
  of that UNet's (as ControlNet training does); the hint block's last convolution, the ``zero_convs`` and
  ``middle_block_out``, zero in a fresh ControlNet, get random weights, else the control does nothing.

Both names contain ``sd15``: the extension guesses a control model's SD version from its name and checks it
against the checkpoint's (an unknown one only logs "Unable to determine version"). Tensors are stored as
float16 (the webui loads them into its float32 models with ``--no-half``).
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_checkpoints  # noqa: E402  (same folder; builds checkpoints with the webui's ldm code)

# 4 levels, 2 res blocks: the four T2I-Adapter features land after input blocks 2, 5, 8, 11 with [c, 2c, 4c, 4c]
TINY_UNET = {"channel_mult": [1, 2, 4, 4], "attention_resolutions": [1, 2, 4]}
# SD1.5 widths, as sd-webui-controlnet's ``controlnet_default_config`` assumes (the text encoder stays tiny)
SD15W_UNET = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "attention_resolutions": [4, 2, 1],
              "num_heads": 8, "context_dim": 32}
CHECKPOINTS = {"tiny_cn_base": (TINY_UNET, 11), "tiny_cn_other": (TINY_UNET, 12)}
SD15W_CHECKPOINT = ("tiny_cn_sd15w", 13)
ADAPTER = ("tiny_t2i_adapter_sd15", 21)
CONTROLNET = ("tiny_controlnet_sd15w", 22)
ADAPTER_WIDTH = 32  # = the tiny UNet's model_channels
HINT_SIZE = 64  # calibration pattern (pixels); the latent is HINT_SIZE / 8


def _pattern(size=HINT_SIZE):
    """A fixed RGB pattern in [0, 1] (1, 3, size, size): stripes, a checkerboard and a gradient."""
    import torch

    ramp = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    red = ((x // 8) % 2).float()
    green = (((x // 16) + (y // 16)) % 2).float()
    blue = (x + y) / (2 * size - 2)
    return torch.stack([red, green, blue])[None]


def _unet_inputs(channels_latent=4, context_dim=32, seed=0):
    """A unit-variance latent (what the sampler feeds after c_in), a mid timestep and a random context."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels_latent, HINT_SIZE // 8, HINT_SIZE // 8, generator=generator)
    context = torch.randn(1, 77, context_dim, generator=generator)
    return x, torch.tensor([500.0]), context


def _input_block_outputs(unet, x, timesteps, context, add_after_first=None):
    """Outputs of every input block and of the middle block of an ldm UNetModel (optionally adding a tensor
    to the first block's output, as a ControlNet adds its hint)."""
    import torch
    from ldm.modules.diffusionmodules.util import timestep_embedding

    with torch.no_grad():
        emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
        outputs, h = [], x
        for index, block in enumerate(unet.input_blocks):
            h = block(h, emb, context)
            if index == 0 and add_after_first is not None:
                h = h + add_after_first
            outputs.append(h)
        outputs.append(unet.middle_block(h, emb, context))
    return outputs


def _conv(generator, c_out, c_in, k, gain=2.0, bias_std=0.02):
    import torch

    weight = torch.randn(c_out, c_in, k, k, generator=generator) * (gain / (c_in * k * k)) ** 0.5
    return weight, torch.randn(c_out, generator=generator) * bias_std


def _adapter_state(seed, c=ADAPTER_WIDTH, ksize=1, cin=192):
    """Keys and shapes of sd-webui-controlnet's ``Adapter(cin, [c, 2c, 4c, 4c], nums_rb=2, ksize, sk=True,
    use_conv=False, is_sdxl=False)``: ``conv_in``; ``body.{2i+r}`` with ``in_conv`` where a level starts with
    another width, ``block1`` (3x3), ``block2`` (ksize); levels 1-3 start with a 2x2 average pooling."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    widths = [c, 2 * c, 4 * c, 4 * c]
    state = {}
    state["conv_in.weight"], state["conv_in.bias"] = _conv(generator, c, cin, 3)
    for level, width in enumerate(widths):
        for r in range(2):
            prefix = f"body.{level * 2 + r}."
            if r == 0 and level > 0 and widths[level - 1] != width:
                state[prefix + "in_conv.weight"], state[prefix + "in_conv.bias"] = _conv(
                    generator, width, widths[level - 1], ksize, gain=1.0)
            state[prefix + "block1.weight"], state[prefix + "block1.bias"] = _conv(generator, width, width, 3)
            state[prefix + "block2.weight"], state[prefix + "block2.bias"] = _conv(
                generator, width, width, ksize, gain=0.5)
    return state


def _adapter_forward(state, hint, levels=4):
    """The adapter's features for ``hint`` (1, 3, H, W) in [0, 1], computed from ``state`` (for calibration)."""
    import torch.nn.functional as F

    x = F.conv2d(F.pixel_unshuffle(hint, 8), state["conv_in.weight"], state["conv_in.bias"], padding=1)
    features = []
    for level in range(levels):
        for r in range(2):
            prefix = f"body.{level * 2 + r}."
            if r == 0 and level > 0:
                x = F.avg_pool2d(x, 2)
            if prefix + "in_conv.weight" in state:
                w = state[prefix + "in_conv.weight"]
                x = F.conv2d(x, w, state[prefix + "in_conv.bias"], padding=w.shape[-1] // 2)
            h = F.relu(F.conv2d(x, state[prefix + "block1.weight"], state[prefix + "block1.bias"], padding=1))
            w = state[prefix + "block2.weight"]
            x = F.conv2d(h, w, state[prefix + "block2.bias"], padding=w.shape[-1] // 2) + x
        features.append(x)
    return features


def write_adapter(folder, unet, name, seed):
    """The T2I-Adapter, with ``conv_in`` scaled so that its features' mean std equals the mean std of ``unet``'s
    activations at the injection points (after input blocks 2, 5, 8, 11). Returns per-level std ratios."""
    import torch
    from safetensors.torch import save_file

    targets = [o.std().item() for i, o in enumerate(_input_block_outputs(unet, *_unet_inputs())) if i in (2, 5, 8, 11)]
    state = _adapter_state(seed)
    hint = _pattern()
    for _ in range(4):  # the biases make the scale slightly non-linear: a few fixed-point steps
        stds = [f.std().item() for f in _adapter_forward(state, hint)]
        factor = sum(targets) / sum(stds)
        state["conv_in.weight"] *= factor
        state["conv_in.bias"] *= factor
    stds = [f.std().item() for f in _adapter_forward(state, hint)]
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()},
              os.path.join(folder, name + ".safetensors"))
    return [round(s / t, 3) for s, t in zip(stds, targets)]


def write_controlnet(folder, unet, name, seed):
    """A ControlNet for ``unet`` (SD1.5 widths): encoder (``time_embed``, ``input_blocks``, ``middle_block``)
    copied from it, a random ``input_hint_block`` whose output matches the std of input block 0's output on the
    calibration pattern, and random 1x1 ``zero_convs`` / ``middle_block_out`` of unit gain. Returns the ratio of
    each residual's std to the std of the UNet activation it is added to."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()
             if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    hint_widths = [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2),
                   (256, unet.model_channels, 1)]
    hint_convs = []
    for c_in, c_out, stride in hint_widths:
        weight, bias = _conv(generator, c_out, c_in, 3)
        hint_convs.append((weight, bias, stride))
    context_dim = unet.input_blocks[5][1].transformer_blocks[0].attn2.to_k.in_features  # what the guess reads
    x, timesteps, context = _unet_inputs(context_dim=context_dim)
    h = _pattern()
    for index, (weight, bias, stride) in enumerate(hint_convs):
        h = F.conv2d(h, weight, bias, stride=stride, padding=1)
        if index < len(hint_convs) - 1:
            h = F.silu(h)
    plain = _input_block_outputs(unet, x, timesteps, context)
    factor = plain[0].std().item() / h.std().item()
    for index, (weight, bias, _) in enumerate(hint_convs):
        if index == len(hint_convs) - 1:
            weight, bias = weight * factor, bias * factor
        state[f"input_hint_block.{index * 2}.weight"] = weight
        state[f"input_hint_block.{index * 2}.bias"] = bias
    outputs = _input_block_outputs(unet, x, timesteps, context, add_after_first=h * factor)
    ratios = []
    for index, activation in enumerate(outputs):
        channels = activation.shape[1]
        key = f"zero_convs.{index}.0" if index < len(outputs) - 1 else "middle_block_out.0"
        weight, bias = _conv(generator, channels, channels, 1, gain=1.0, bias_std=0.01)
        state[key + ".weight"], state[key + ".bias"] = weight, bias
        residual = F.conv2d(activation, weight, bias)
        ratios.append(round(residual.std().item() / plain[index].std().item(), 3))
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()},
              os.path.join(folder, name + ".safetensors"))
    return ratios


def main(webui_dir, out_dir, with_controlnet=True):
    import torch

    sys.path.insert(0, os.path.join(webui_dir, "repositories", "stable-diffusion-stability-ai"))
    torch.set_grad_enabled(False)
    os.makedirs(out_dir, exist_ok=True)
    control_dir = os.path.join(out_dir, "ControlNet")
    os.makedirs(control_dir, exist_ok=True)
    started = time.time()
    text_encoder = os.path.join(out_dir, "tiny_text_encoder")
    tiny_checkpoints.write_text_encoder(text_encoder)
    models = {name: tiny_checkpoints.write_checkpoint(out_dir, name, text_encoder, overrides, seed,
                                                      dtype=torch.float16)
              for name, (overrides, seed) in CHECKPOINTS.items()}
    name, seed = ADAPTER
    adapter_ratios = write_adapter(control_dir, models["tiny_cn_base"].model.diffusion_model, name, seed)
    result = {
        "checkpoints": sorted(CHECKPOINTS),
        "control_dir": "ControlNet",
        "t2i_adapter": {"model": ADAPTER[0], "checkpoints": sorted(CHECKPOINTS), "feature_std_ratio": adapter_ratios},
    }
    del models
    if with_controlnet:
        name, seed = SD15W_CHECKPOINT
        model = tiny_checkpoints.write_checkpoint(out_dir, name, text_encoder, SD15W_UNET, seed, dtype=torch.float16)
        ratios = write_controlnet(control_dir, model.model.diffusion_model, *CONTROLNET)
        result["checkpoints"].append(name)
        result["controlnet"] = {"model": CONTROLNET[0], "checkpoints": [name], "residual_std_ratio": ratios}
    result["build_s"] = round(time.time() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], with_controlnet="--no-controlnet" not in sys.argv[3:])
