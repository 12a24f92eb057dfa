"""Build tiny A1111 checkpoints (ldm key layout + a ``.yaml`` beside each) for the integration tests.

Run with the webui's Python: ``python tiny_checkpoints.py WEBUI_DIR OUT_DIR``. The models are built with the
webui's own ``ldm`` code from each yaml, so the saved keys are exactly what A1111 loads. No weights are
downloaded: the text encoder is a 2-layer CLIPTextModel saved to a local folder with a real CLIP tokenizer
(vocab.json / merges.txt derived from the BPE file that open-clip-torch ships), and the yaml points at it.

Random initialisation needs two fixes to give images that react to their inputs: ldm zero-initialises output
convolutions (the UNet would output zeros), and a text-encoder output with zero mean turns into NaN through
A1111's emphasis re-normalisation (it divides by the mean), so the final LayerNorm gets a non-zero bias.
A1111 samples the VAE posterior for img2img with the global RNG, so the VAE's posterior variance is made
negligible. A LoRA for the attention layers (``Lora/tiny_lora.safetensors``) comes with them.
"""

import gzip
import json
import os
import sys

# name -> (UNet overrides, seed). "same" and "pair" have the structure of "base" with other weights; "heads"
# differs only in the attention head count (equal tensor shapes, another graph).
CHECKPOINTS = {
    "tiny_base": ({}, 1),
    "tiny_same": ({}, 2),
    "tiny_heads": ({"num_heads": 2}, 3),
    "tiny_pair": ({}, 4),
}
# A second checkpoint with the config of "tiny_pair" (name, seed). A1111 loads a checkpoint whose config equals
# the loaded model's into that model object (``load_state_dict``), as it does for any two SD1.5 fine-tunes
# without a yaml; here the config is the yaml beside the file, and only a file of another format can share
# that yaml's name: ``tiny_pair.ckpt``.
SAME_CONFIG_CKPT = ("tiny_pair", 5)

UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1],
    num_res_blocks=2,
    channel_mult=[1, 2],
    num_heads=4,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    use_checkpoint=False,
    legacy=False,
)

VAE = dict(
    embed_dim=4,
    monitor="val/rec_loss",
    ddconfig=dict(
        double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
        ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
    ),
    lossconfig={"target": "torch.nn.Identity"},
)


def bytes_to_unicode():
    """GPT-2/CLIP's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder):
    """vocab.json and merges.txt exactly as openai/clip-vit-large-patch14 has them, from open_clip's BPE."""
    import open_clip

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = bytes_to_unicode()
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump({token: index for index, token in enumerate(vocab)}, handle, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as handle:
        json.dump(special, handle)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump(dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer"), handle)
    return len(vocab)


def write_text_encoder(folder):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    os.makedirs(folder, exist_ok=True)
    vocab_size = write_tokenizer(folder)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
    torch.manual_seed(0)
    model = CLIPTextModel(config)
    with torch.no_grad():
        model.text_model.final_layer_norm.bias.uniform_(0.2, 0.6)  # non-zero mean, see module docstring
    model.save_pretrained(folder, safe_serialization=True)


def model_yaml(text_encoder, unet_overrides):
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
                "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8,
                "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                "params": dict(UNET, **unet_overrides)},
                "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": VAE},
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                      "params": {"version": text_encoder}},
            },
        }
    }


def write_checkpoint(out_dir, name, text_encoder, unet_overrides, seed, extension=".safetensors", dtype=None):
    """``dtype``: the stored parameters' dtype (e.g. ``torch.float16`` to halve a large file; buffers such as
    ``alphas_cumprod`` keep theirs); default as built."""
    import torch
    import yaml
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    config = model_yaml(text_encoder, unet_overrides)
    yaml_path = os.path.join(out_dir, name + ".yaml")
    with open(yaml_path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(yaml_path).model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.model.parameters():
            if tensor.ndim > 1 and not tensor.any():  # ldm's zero_module convolutions / projections
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
        # A1111 encodes img2img's input by sampling the VAE posterior with the global RNG, not the job's seed:
        # a near-zero posterior variance keeps img2img reproducible, so compiled and eager runs compare.
        moments = model.first_stage_model.quant_conv
        moments.weight[moments.out_channels // 2 :].zero_()
        moments.bias[moments.out_channels // 2 :].fill_(-30.0)
    cast = {key for key, _ in model.named_parameters()} if dtype is not None else set()
    state = {k: v.detach().to(dtype if k in cast else v.dtype).contiguous() for k, v in model.state_dict().items()}
    if extension == ".ckpt":  # torch's legacy format: A1111's safe unpickler refuses the zip format's newer entries
        torch.save({"state_dict": state}, os.path.join(out_dir, name + extension), _use_new_zipfile_serialization=False)
    else:
        save_file(state, os.path.join(out_dir, name + extension))
    return model


def write_lora(folder, model, name="tiny_lora", rank=4, seed=99, prefix="lora_unet_", path_filter=".attn"):
    """A kohya-format LoRA (``<prefix><module path with _>``) on every Linear of ``model`` whose path contains
    ``path_filter``, strong enough to change the image visibly. A1111 maps ``lora_unet_<ldm path>`` onto the
    UNet and ``lora_te_text_model_...`` onto the text encoder."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path_filter in path:
            key = prefix + path.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.5
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, os.path.join(folder, name + ".safetensors"))


def main(webui_dir, out_dir):
    sys.path.insert(0, os.path.join(webui_dir, "repositories", "stable-diffusion-stability-ai"))
    os.makedirs(out_dir, exist_ok=True)
    text_encoder = os.path.join(out_dir, "tiny_text_encoder")
    write_text_encoder(text_encoder)
    models = {name: write_checkpoint(out_dir, name, text_encoder, overrides, seed)
              for name, (overrides, seed) in CHECKPOINTS.items()}
    name, seed = SAME_CONFIG_CKPT
    write_checkpoint(out_dir, name, text_encoder, CHECKPOINTS[name][0], seed, extension=".ckpt")
    loras = os.path.join(out_dir, "Lora")
    write_lora(loras, models["tiny_base"].model.diffusion_model)
    write_lora(loras, models["tiny_base"].model.diffusion_model, name="tiny_lora_b", seed=7)
    from transformers import CLIPTextModel

    write_lora(loras, CLIPTextModel.from_pretrained(text_encoder), name="tiny_te_lora", seed=5,
               prefix="lora_te_", path_filter="self_attn")
    print(json.dumps(sorted(CHECKPOINTS)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
