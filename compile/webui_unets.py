"""The UNets the webui runs, for the bench: ldm's ``UNetModel`` (SD1/SD2) and sgm's (SDXL).

A1111 does not run diffusers' UNet: it runs Stability's own classes from its ``repositories/`` folder, with its
own attention forward. Timing those, with the scaled-dot-product attention the extension traces them with (see
``onediff_sd_webui_extensions/a1111/attention.py``), is the closest to a webui step without a webui. Their source
is not part of this project: point ``repositories`` at a webui's ``repositories/`` folder (or a copy of
``stable-diffusion-stability-ai`` and ``generative-models`` side by side). They need ``einops``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

# UNetModel arguments of the webui's configs (v1-inference.yaml, sd_xl_base.yaml), checkpointing off.
_LDM_SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
_SGM_SDXL = dict(adm_in_channels=2816, num_classes="sequential", use_checkpoint=False, in_channels=4,
                 out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
                 use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
                 spatial_transformer_attn_type="softmax", legacy=False)
_LDM_TINY = dict(_LDM_SD15, model_channels=32, attention_resolutions=[1], channel_mult=[1, 2], num_heads=2,
                 context_dim=32)
_SGM_TINY = dict(_SGM_SDXL, adm_in_channels=16, model_channels=32, attention_resolutions=[2], channel_mult=[1, 2],
                 num_head_channels=8, transformer_depth=[1, 2], context_dim=32)

# preset -> (package, its folder in repositories/, UNetModel arguments)
WEBUI_UNETS: Dict[str, tuple] = {
    "sd15": ("ldm", "stable-diffusion-stability-ai", _LDM_SD15),
    "sdxl": ("sgm", "generative-models", _SGM_SDXL),
    "tiny": ("ldm", "stable-diffusion-stability-ai", _LDM_TINY),
    "tiny-sdxl": ("sgm", "generative-models", _SGM_TINY),
}


def _import_unet_module(package: str, source: str):
    """``<package>.modules.diffusionmodules.openaimodel`` from ``source``. sgm's package ``__init__`` files import
    its whole training stack; they are skipped (empty packages over the same folders), as only the UNet and its
    attention are needed."""
    if source not in sys.path:
        sys.path.insert(0, source)
    if package == "sgm" and "sgm" not in sys.modules:
        for name in ("sgm", "sgm.modules", "sgm.modules.diffusionmodules"):
            stub = types.ModuleType(name)
            stub.__path__ = [os.path.join(source, *name.split("."))]
            sys.modules[name] = stub
    return importlib.import_module(f"{package}.modules.diffusionmodules.openaimodel")


def _ensure_omegaconf_list_type() -> None:
    """ldm's UNetModel imports omegaconf only to recognise a ``ListConfig`` context_dim; where omegaconf is not
    installed (the GPU machine), an empty stand-in type keeps that check meaningful (nothing is one)."""
    try:
        import omegaconf.listconfig  # noqa: F401
    except ImportError:
        package, listconfig = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.listconfig")
        listconfig.ListConfig = type("ListConfig", (), {})
        package.listconfig, package.ListConfig = listconfig, listconfig.ListConfig
        sys.modules.update({"omegaconf": package, "omegaconf.listconfig": listconfig})


def sdp_cross_attention_forward(self, x, context=None, mask=None, **_kwargs):
    """Cross attention as one ``scaled_dot_product_attention`` call: what A1111's "sdp" forward computes (its
    hypernetworks and upcast option aside), and what the extension traces in place of forwards dynamo cannot."""
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    batch, _, inner = q.shape
    q, k, v = (t.view(batch, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.to_out(out.transpose(1, 2).reshape(batch, -1, inner))


def build_webui_unet(preset: str, repositories: str, seed: int = 0, dtype=torch.float32, device="cpu",
                     **overrides: Any) -> torch.nn.Module:
    """The webui's UNet class for ``preset`` with deterministic random weights and SDP attention."""
    if preset not in WEBUI_UNETS:
        raise ValueError(f"no webui UNet for preset '{preset}' (choose from {', '.join(WEBUI_UNETS)})")
    package, folder, arguments = WEBUI_UNETS[preset]
    source = os.path.join(repositories, folder)
    if not os.path.isdir(os.path.join(source, package)):
        raise FileNotFoundError(f"{source} has no '{package}' package: --repositories must be a webui's "
                                f"repositories/ folder (with {folder}/)")
    _ensure_omegaconf_list_type()
    openaimodel = _import_unet_module(package, source)
    attention = importlib.import_module(f"{package}.modules.attention")
    attention.CrossAttention.forward = sdp_cross_attention_forward
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = openaimodel.UNetModel(**{**arguments, **overrides})
        for parameter in unet.parameters():  # ldm zero-initialises output layers: the UNet would output zeros
            if parameter.ndim > 1 and not parameter.any():
                parameter.data.normal_(0, 0.02)
    finally:
        torch.random.set_rng_state(state)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


@dataclasses.dataclass
class WebUIUNetInputs:
    """One call of the webui's UNet: ``unet(x, timesteps, context, y)`` (``y``: SDXL's size/pooled vector)."""

    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    y: Optional[torch.Tensor] = None

    def call(self, unet) -> torch.Tensor:
        if self.y is None:
            return unet(self.sample, self.timestep, self.context)
        return unet(self.sample, self.timestep, self.context, self.y)


def webui_unet_inputs(unet, batch: int = 2, latent: int = 64, tokens: int = 77, seed: int = 1) -> WebUIUNetInputs:
    first = next(unet.parameters())
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=first.device, dtype=first.dtype)

    context_dim = _find_context_dim(unet)
    y = randn(batch, unet.label_emb[0][0].in_features) if getattr(unet, "num_classes", None) == "sequential" else None
    return WebUIUNetInputs(sample=randn(batch, unet.in_channels, latent, latent),
                           timestep=torch.full((batch,), 999, device=first.device, dtype=torch.long),
                           context=randn(batch, tokens, context_dim), y=y)


def _find_context_dim(unet) -> int:
    for module in unet.modules():
        if hasattr(module, "attn2"):
            return module.attn2.to_k.in_features
    raise ValueError("the UNet has no cross attention")
