"""UNets to compile without the webui: deterministic random-weight presets and A1111 checkpoint files.

The presets are diffusers ``UNet2DConditionModel`` configs. ``tiny`` and ``tiny-sdxl`` keep the SD1.5 and
SDXL layouts (cross-attention, and SDXL's ``text_time`` added conditioning) at a size that compiles in about a
minute on a 2-core CPU; ``sd15``, ``sd2`` and ``sdxl`` are the real architectures, for GPU runs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import torch

_SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
_SD2 = dict(_SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
_SDXL = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
_TINY = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
_TINY_SDXL = dict(
    _TINY,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text embedding + 6 time ids
)

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": _TINY,
    "tiny-sdxl": _TINY_SDXL,
    "sd15": _SD15,
    "sd2": _SD2,
    "sdxl": _SDXL,
}
# The latent size each preset is benchmarked at (64 = a 512x512 image).
PRESET_LATENT = {"tiny": 16, "tiny-sdxl": 16, "sd15": 64, "sd2": 96, "sdxl": 128}


def unet_config(preset: str, **overrides: Any) -> Dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset '{preset}' (choose from {', '.join(PRESETS)})")
    config = copy.deepcopy(PRESETS[preset])
    config.update(overrides)
    return config


def _import_diffusers_quietly() -> None:
    """diffusers imports torchao when it is installed: import both without torchao's start-up noise."""
    from .quantization import quiet_torchao_imports

    with quiet_torchao_imports():
        import diffusers  # noqa: F401
        import diffusers.quantizers  # noqa: F401  (imports torchao's modules, when installed)


def build_unet(config: Dict[str, Any], seed: int = 0, dtype=torch.float32, device="cpu"):
    """A diffusers UNet with deterministic random weights (same seed, same weights)."""
    _import_diffusers_quietly()
    from diffusers import UNet2DConditionModel

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(**config)
    finally:
        torch.random.set_rng_state(generator_state)
    if dtype != unet.dtype:
        unet = unet.to(dtype=dtype)
    return unet.to(device=device).eval().requires_grad_(False)


def build_preset(preset: str = "tiny", seed: int = 0, dtype=torch.float32, device="cpu", **overrides: Any):
    return build_unet(unet_config(preset, **overrides), seed=seed, dtype=dtype, device=device)


@dataclasses.dataclass
class UNetInputs:
    """One denoising call's inputs, in diffusers' keyword form."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None

    def call(self, unet) -> torch.Tensor:
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states, "return_dict": False}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return unet(self.sample, self.timestep, **kwargs)[0]


def example_inputs(unet, batch: int = 2, latent: Optional[int] = None, tokens: int = 77, seed: int = 1) -> UNetInputs:
    """Deterministic inputs that fit ``unet`` (batch 2 = one prompt with classifier-free guidance)."""
    config = unet.config
    first = next(unet.parameters())
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=first.device, dtype=first.dtype)

    latent = latent or config.sample_size
    added = None
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([latent * 8, latent * 8, 0, 0, latent * 8, latent * 8], dtype=first.dtype)
        added = {"text_embeds": randn(batch, pooled), "time_ids": time_ids.repeat(batch, 1).to(first.device)}
    cross = config.cross_attention_dim
    return UNetInputs(
        sample=randn(batch, config.in_channels, latent, latent),
        timestep=torch.full((batch,), 999.0, device=first.device, dtype=first.dtype),
        encoder_hidden_states=randn(batch, tokens, cross if isinstance(cross, int) else cross[0]),
        added_cond_kwargs=added,
    )


def detect_checkpoint_preset(state_dict: Dict[str, torch.Tensor]) -> str:
    """sd15, sd2 or sdxl from an A1111 (ldm layout) state dict's keys and shapes."""
    if any(key.startswith("model.diffusion_model.label_emb.") for key in state_dict):
        return "sdxl"
    context = state_dict.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if context is not None and context.shape[1] == 1024:
        return "sd2"
    return "sd15"


def load_checkpoint_unet(path: str, dtype=torch.float32, device="cpu") -> Tuple[Any, str]:
    """The UNet of an A1111 ``.safetensors`` checkpoint, offline, as a diffusers UNet.

    The architecture comes from ``<name>.yaml`` beside the file when there is one (A1111's convention), else
    from the real SD1.5/SD2/SDXL configs chosen by the checkpoint's keys. Returns (unet, description).
    """
    _import_diffusers_quietly()
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from safetensors.torch import load_file

    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: only .safetensors checkpoints are read (pickled .ckpt files can run code)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state_dict = load_file(path)
    in_key = "model.diffusion_model.input_blocks.0.0.weight"
    if in_key not in state_dict:
        raise ValueError(f"{path}: no UNet found (expected A1111/ldm keys such as '{in_key}')")
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    if os.path.isfile(yaml_path):
        import yaml

        with open(yaml_path) as handle:
            config = create_unet_diffusers_config_from_ldm(yaml.safe_load(handle), state_dict)
        kind = f"config {os.path.basename(yaml_path)}"
    else:
        kind = detect_checkpoint_preset(state_dict)
        config = unet_config(kind, in_channels=state_dict[in_key].shape[1])
    converted = convert_ldm_unet_checkpoint(state_dict, config)
    unet = UNet2DConditionModel(**config)
    missing, unexpected = unet.load_state_dict(converted, strict=False)
    if missing:
        raise ValueError(f"{path}: checkpoint does not fit {kind}; missing {len(missing)} tensors, e.g. {missing[:3]}")
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return unet, f"{os.path.basename(path)} ({kind})"
