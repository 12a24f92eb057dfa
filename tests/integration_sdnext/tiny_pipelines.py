"""Build tiny diffusers pipelines and a LoRA for the SD.Next integration tests.

Run with SD.Next's Python: ``python tiny_pipelines.py MODELS_DIR``. Writes ``MODELS_DIR/Diffusers/<name>``
folders (``save_pretrained``, as SD.Next lists and loads diffusers models) and ``MODELS_DIR/Lora/*.safetensors``,
then prints the pipeline names as JSON. Nothing is downloaded: the CLIP tokenizer is written from the byte
alphabet and a few merges, the models are randomly initialised from small configs.

``tiny_sd15_a`` and ``tiny_sd15_b`` share a structure with other weights (a checkpoint switch reuses the
graph); ``tiny_sdxl`` has SDXL's two text encoders and added time embeddings. The LoRA is kohya-format on the
attention projections of the SD1.5 UNet, keyed by diffusers module names (SD.Next's ``lora_unet_<path>``).

``tiny_controlnet`` is a diffusers ``ControlNetModel`` made (``from_unet``) from the UNet of ``tiny_sd15_control``,
an SD1.5 pipeline of a structure of its own (other attention heads), so the ControlNet tests have a graph of
their own whatever order the test files run in. It is written as ``MODELS_DIR/control/controlnet/tiny_controlnet/``
(config.json + safetensors: SD.Next lists the folders of ``<control folder>/controlnet`` that hold a config.json
as local ControlNets). Its zero-initialised output convolutions get small random weights, so the control image
and the strength change the image.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration"))
from tiny_checkpoints import bytes_to_unicode  # noqa: E402  (the A1111 tests' CLIP byte alphabet)

SD15 = {"tiny_sd15_a": 1, "tiny_sd15_b": 2}
SDXL = "tiny_sdxl"
# SD.Next computes SDXL's pooled text embedding only when the last text encoder is wider than 768
# (modules/prompt_parser_diffusers.py); narrower, its own eager job fails ("pooled_prompt_embeds").
SDXL_TE2_WIDTH = 800


def tokenizer(folder):
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = bytes_to_unicode()
    merges = [("c", "u"), ("cu", "b"), ("cub", "e</w>"), ("r", "e"), ("re", "d</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump({token: index for index, token in enumerate(vocab)}, handle, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # positional: transformers 5 reads the files from ``vocab``/``merges`` (its ``vocab_file=`` is ignored)
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)


def text_encoder(vocab_size, projection=False, hidden=32, seed=0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    with torch.no_grad():  # a text embedding with zero mean makes every prompt look alike
        for name, tensor in model.named_parameters():
            if name.endswith("final_layer_norm.bias"):
                tensor.uniform_(0.2, 0.6)
    return model


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64)


def unet(seed, **overrides):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=32)
    config.update(overrides)
    return UNet2DConditionModel(**config)


def scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def write_sd15(folder, seed, tokenizer_folder, **unet_overrides):
    from diffusers import StableDiffusionPipeline

    tok = tokenizer(tokenizer_folder)
    pipe = StableDiffusionPipeline(unet=unet(seed, **unet_overrides), vae=vae(), text_encoder=text_encoder(len(tok)),
                                   tokenizer=tok, scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def write_sdxl(folder, tokenizer_folder):
    from diffusers import StableDiffusionXLPipeline

    tok = tokenizer(tokenizer_folder)
    model = unet(3, cross_attention_dim=32 + SDXL_TE2_WIDTH, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=SDXL_TE2_WIDTH + 6 * 8,
                 transformer_layers_per_block=1)
    text_encoder_2 = text_encoder(len(tok), projection=True, hidden=SDXL_TE2_WIDTH, seed=1)
    pipe = StableDiffusionXLPipeline(unet=model, vae=vae(), text_encoder=text_encoder(len(tok)),
                                     text_encoder_2=text_encoder_2, tokenizer=tok,
                                     tokenizer_2=tok, scheduler=scheduler(), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)


def write_lora(path, model, rank=4, seed=99):
    """kohya-format LoRA on the UNet's attention projections, strong enough to change the image visibly."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "to_out.0"):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.5
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path)


CONTROL_BASE = "tiny_sd15_control"
CONTROL_BASE_SEED = 4
CONTROLNET = "tiny_controlnet"


def write_controlnet(folder, model, scale=0.3, seed=7):
    """A ControlNet of ``model``'s structure whose residuals are not zero (diffusers zero-initialises the
    convolutions that produce them, which would make every control image look alike)."""
    import torch
    from diffusers import ControlNetModel

    # the tiny VAE halves the image (two blocks): the control image is embedded at that latent size as well
    controlnet = ControlNetModel.from_unet(model, conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
                  *controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * scale)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * scale * 0.1)
    controlnet.save_pretrained(folder, safe_serialization=True)


def main(models_dir):
    diffusers_dir = os.path.join(models_dir, "Diffusers")
    tokenizer_folder = os.path.join(models_dir, "tokenizer-src")
    pipes = {name: write_sd15(os.path.join(diffusers_dir, name), seed, tokenizer_folder) for name, seed in SD15.items()}
    write_sdxl(os.path.join(diffusers_dir, SDXL), tokenizer_folder)
    write_lora(os.path.join(models_dir, "Lora", "tiny_lora.safetensors"), pipes["tiny_sd15_a"].unet)
    control_base = write_sd15(os.path.join(diffusers_dir, CONTROL_BASE), CONTROL_BASE_SEED, tokenizer_folder,
                              attention_head_dim=4)
    write_controlnet(os.path.join(models_dir, "control", "controlnet", CONTROLNET), control_base.unet)
    print(json.dumps({"sd15": sorted(SD15), "sdxl": SDXL, "control_base": CONTROL_BASE, "controlnet": CONTROLNET}))


if __name__ == "__main__":
    main(sys.argv[1])
