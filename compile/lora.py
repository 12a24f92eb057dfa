"""Kohya-format LoRA fused in place into a (compiled) diffusers UNet.

A compiled graph reads the weights from the tensors it captured, so a LoRA must be written *into* those
tensors: ``copy_`` only, data pointers unchanged, never a new Parameter. :class:`LoraFuser` does that:

- before a weight is first changed it keeps a backup of it (on the weight's device when memory allows), and
  every fuse writes ``backup + sum(multiplier * alpha / rank * up @ down)`` into the weight. Weights are never
  "un-added", so nothing drifts: removing every LoRA copies the backups back bit for bit;
- only modules whose set of (LoRA, multiplier) changed are written. Each is one GEMM for all its LoRAs
  (``backup + [s1*up1 | s2*up2] @ [down1; down2]``) whose output is the weight itself (``addmm(out=)``), so
  the weight is read and written once; restores are one ``_foreach_copy_``. (Stacking same-shape modules
  into one batched matmul was measured 2x slower on CPU: it needs stacked copies in and out.)
- a bias delta (LyCORIS ``diff_b``) for a layer without a bias is refused before anything is written: the
  graph has no tensor to hold it, and adding a Parameter would be invisible to it (or recompile it).

Key names: kohya files name modules ``lora_unet_<module path with _>``. SD1.x LoRAs trained by kohya use the
diffusers module paths (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), SDXL ones
and A1111-trained ones the ldm paths (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``);
:func:`kohya_module_names` maps both onto the diffusers UNet's modules.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")
_DOWN, _UP, _ALPHA, _BIAS = "lora_down.weight", "lora_up.weight", "alpha", "diff_b"
_KNOWN_PARTS = (_DOWN, _UP, _ALPHA, _BIAS)

# Projections a "LoRA on every attention and feed-forward projection" targets, by module-name suffix.
ATTENTION_AND_FF_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                             "ff.net.0.proj", "ff.net.2")


class LoraError(ValueError):
    """A LoRA file that cannot be fused into this UNet (unknown format, wrong shapes, bias-less target)."""


# --------------------------------------------------------------------------------------------------------------
# Key mapping: kohya names -> diffusers module names


def _ldm_resnet_suffix(name: str) -> str:
    return {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}.get(name, name)


def ldm_module_name(diffusers_name: str, config) -> Optional[str]:
    """The ldm/sgm (A1111) path of a diffusers UNet2DConditionModel module, or None if it has none.

    ldm numbers the down path as ``input_blocks`` (``1 + block * (layers + 1) + layer``, the downsampler
    last), the up path as ``output_blocks`` (``block * (layers + 1) + layer``) with ``.0`` for the resnet,
    ``.1`` for the attention and the upsampler after them. Checked against diffusers'
    ``convert_ldm_unet_checkpoint`` in the tests.
    """
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise LoraError("ldm names need an int layers_per_block")
    parts = diffusers_name.split(".")
    simple = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for diffusers_prefix, ldm_prefix in simple.items():
        if diffusers_name == diffusers_prefix or diffusers_name.startswith(diffusers_prefix + "."):
            return ldm_prefix + diffusers_name[len(diffusers_prefix):]
    if len(parts) < 4:
        return None
    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return ".".join([f"input_blocks.{(block + 1) * (layers + 1)}.0", *["op" if p == "conv" else p for p in rest]])
        position = 1 + block * (layers + 1) + index
    elif parts[0] == "up_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            has_attention = "CrossAttn" in config.up_block_types[block]
            return ".".join([f"output_blocks.{block * (layers + 1) + layers}.{2 if has_attention else 1}", *rest])
        position = block * (layers + 1) + index
    elif parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        slot = 1 if kind == "attentions" else 2 * index
        if kind == "resnets":
            rest = [_ldm_resnet_suffix(rest[0]), *rest[1:]] if rest else rest
        return ".".join([f"middle_block.{slot}", *rest])
    else:
        return None
    stage = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
    if kind == "resnets":
        rest = [_ldm_resnet_suffix(rest[0]), *rest[1:]] if rest else rest
        return ".".join([f"{stage}.{position}.0", *rest])
    if kind == "attentions":
        return ".".join([f"{stage}.{position}.1", *rest])
    return None


def kohya_module_names(unet: torch.nn.Module) -> Dict[str, str]:
    """``lora_unet_...`` prefix -> diffusers module name, for both the diffusers-path and the ldm-path forms."""
    mapping: Dict[str, str] = {}
    config = getattr(unet, "config", None)
    for name, _ in unet.named_modules():
        if not name:
            continue
        mapping[UNET_PREFIX + name.replace(".", "_")] = name
        ldm = ldm_module_name(name, config) if config is not None else None
        if ldm is not None:
            mapping.setdefault(UNET_PREFIX + ldm.replace(".", "_"), name)
    return mapping


# --------------------------------------------------------------------------------------------------------------
# LoRA files


@dataclasses.dataclass
class LoraModuleDelta:
    """One module's low-rank delta, ready to fuse: ``delta = up @ down`` reshaped to the weight's shape.

    ``up`` already carries ``alpha / rank``; both are 2-D (conv LoRAs are flattened: a 3x3 down becomes
    ``(rank, in * 9)``), on the UNet's device in the dtype the fuse computes in (:func:`compute_dtype`).
    """

    up: torch.Tensor
    down: torch.Tensor
    bias: Optional[torch.Tensor] = None  # an additive bias delta (LyCORIS diff_b), rarely present


_network_ids = itertools.count(1)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype deltas are computed in: the weight's on GPUs (their half GEMMs accumulate in float32 and round
    once), float32 on CPUs (where half GEMMs are slow and not guaranteed to accumulate in float32)."""
    return weight.dtype if weight.device.type == "cuda" else torch.float32


@dataclasses.dataclass(eq=False)
class LoraNetwork:
    """A parsed kohya LoRA: module name -> delta. ``uid`` tells two loads of the same name apart."""

    name: str
    modules: Dict[str, LoraModuleDelta]
    skipped_keys: List[str] = dataclasses.field(default_factory=list)  # text encoder keys
    unmatched_keys: List[str] = dataclasses.field(default_factory=list)  # UNet keys naming no module
    uid: int = dataclasses.field(default_factory=lambda: next(_network_ids))

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "modules": len(self.modules), "text_encoder_keys": len(self.skipped_keys),
                "unmatched_keys": len(self.unmatched_keys)}


def _group_kohya_keys(state_dict: Mapping[str, torch.Tensor]):
    grouped: Dict[str, Dict[str, torch.Tensor]] = {}
    skipped, unknown = [], []
    for key, tensor in state_dict.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            skipped.append(key)
            continue
        prefix, part = key, ""
        for candidate in _KNOWN_PARTS:
            if key.endswith("." + candidate):
                prefix, part = key[: -len(candidate) - 1], candidate
                break
        if not part or not key.startswith(UNET_PREFIX):
            unknown.append(key)
            continue
        grouped.setdefault(prefix, {})[part] = tensor
    return grouped, skipped, unknown


def load_kohya_lora(
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    unet: torch.nn.Module,
    name: Optional[str] = None,
    *,
    module_names: Optional[Mapping[str, str]] = None,
) -> LoraNetwork:
    """Parse a kohya LoRA (a ``.safetensors`` path or a state dict) for ``unet``.

    Shapes are checked against the target modules here, so a fuse never fails half-way. Keys of other formats
    (LoCon ``lora_mid``, LoHa, ...) raise :class:`LoraError`; text-encoder keys are skipped and counted.
    """
    if isinstance(source, (str, os.PathLike)):
        from safetensors.torch import load_file

        name = name or os.path.splitext(os.path.basename(os.fspath(source)))[0]
        state_dict = load_file(os.fspath(source))
    else:
        state_dict = source
    name = name or "lora"
    module_names = module_names if module_names is not None else kohya_module_names(unet)
    grouped, skipped, unknown = _group_kohya_keys(state_dict)
    if unknown:
        raise LoraError(f"LoRA '{name}': keys of an unsupported format, e.g. {unknown[:3]} "
                        f"(only lora_down/lora_up/alpha[/diff_b] kohya LoRA is fused)")
    first = next(unet.parameters())
    modules: Dict[str, LoraModuleDelta] = {}
    unmatched: List[str] = []
    for prefix, parts in grouped.items():
        module_name = module_names.get(prefix)
        if module_name is None:
            unmatched.append(prefix)
            continue
        module = unet.get_submodule(module_name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise LoraError(f"LoRA '{name}': {prefix} targets {type(module).__name__} '{module_name}', "
                            "only Linear and Conv2d are fused")
        if (_DOWN in parts) != (_UP in parts):
            raise LoraError(f"LoRA '{name}': {prefix} has only one of lora_down/lora_up")
        if _DOWN not in parts:
            continue  # a bare alpha or bias entry with no low-rank pair is not a delta
        dtype = compute_dtype(weight)
        down = parts[_DOWN].to(device=first.device, dtype=dtype)
        up = parts[_UP].to(device=first.device, dtype=dtype)
        rank = down.shape[0]
        down = down.reshape(rank, -1)
        up = up.reshape(up.shape[0], -1)
        if up.shape != (weight.shape[0], rank) or down.shape[1] != weight[0].numel():
            raise LoraError(f"LoRA '{name}': {prefix} shapes up {tuple(parts[_UP].shape)} down "
                            f"{tuple(parts[_DOWN].shape)} do not fit weight {tuple(weight.shape)} of '{module_name}'")
        alpha = float(parts[_ALPHA]) if _ALPHA in parts else float(rank)
        bias = parts.get(_BIAS)
        if bias is not None:
            bias = bias.to(device=first.device, dtype=torch.float32).reshape(-1)
            if bias.shape[0] != weight.shape[0]:
                raise LoraError(f"LoRA '{name}': {prefix}.diff_b has {bias.shape[0]} values, '{module_name}' has "
                                f"{weight.shape[0]} outputs")
        modules[module_name] = LoraModuleDelta(up=(up * (alpha / rank)).contiguous(), down=down.contiguous(), bias=bias)
    if unmatched:
        logger.warning("LoRA '%s': %d UNet keys match no module, e.g. %s", name, len(unmatched), unmatched[:3])
    return LoraNetwork(name=name, modules=modules, skipped_keys=skipped, unmatched_keys=unmatched)


# --------------------------------------------------------------------------------------------------------------
# Fusing


@dataclasses.dataclass
class FuseReport:
    """What one :meth:`LoraFuser.fuse` call did."""

    ms: float
    written_modules: int  # modules whose weights were rewritten (their delta changed)
    active_modules: int  # modules carrying some LoRA afterwards
    backup_bytes: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LoraFuser:
    """All LoRA state of one UNet: backups, the fused set, and timings.

    ``unet`` must be the module whose tensors the compiled graph captured (``CompiledUNet.eager``). The fuser
    assumes it is the only writer of the weights it touched; when the host rewrites the weights (a checkpoint
    switch), it must call :meth:`weights_reloaded`, or the next fuse would restore the old checkpoint's
    weights from the backups.
    """

    def __init__(self, unet: torch.nn.Module, backup_on_device: Optional[bool] = None):
        self.unet = unet
        self.module_names = kohya_module_names(unet)
        self.modules = dict(unet.named_modules())  # looked up once: get_submodule per fuse costs more than the math
        self.backup_on_device = backup_on_device  # None: decide from free device memory
        self.backups: Dict[str, torch.Tensor] = {}  # "<module>.weight"/"<module>.bias" -> original values
        self.fused: Dict[str, Tuple[Tuple[int, float], ...]] = {}  # module -> ((network uid, multiplier), ...)
        self.active: List[Tuple[str, float]] = []  # (network name, multiplier), as last fused
        self.last_fuse_ms: Optional[float] = None
        self.last_unfuse_ms: Optional[float] = None
        self.fuses = 0

    # -- loading
    def load(self, source, name: Optional[str] = None) -> LoraNetwork:
        return load_kohya_lora(source, self.unet, name, module_names=self.module_names)

    # -- state
    @property
    def backup_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.backups.values())

    def status(self) -> Dict[str, object]:
        return {"active": [list(item) for item in self.active], "fused_modules": len(self.fused),
                "backup_tensors": len(self.backups), "backup_bytes": self.backup_bytes,
                "last_fuse_ms": self.last_fuse_ms, "last_unfuse_ms": self.last_unfuse_ms, "fuses": self.fuses}

    def weights_reloaded(self) -> None:
        """The host wrote new (LoRA-free) weights into the UNet: forget backups and the fused set."""
        self.backups.clear()
        self.fused.clear()
        self.active = []

    # -- fusing
    def unfuse(self) -> FuseReport:
        """Restore every touched weight from its backup (bit for bit) and drop the backups."""
        report = self._write([])
        self.last_unfuse_ms = report.ms
        return report

    def fuse(self, networks: Sequence[Tuple[LoraNetwork, float]]) -> FuseReport:
        """Make the UNet's weights ``checkpoint + sum(multiplier * delta)`` for ``networks`` (replacing what was
        fused before; an empty list unfuses). Only modules whose contributions changed are written; nothing
        is written if the plan cannot be applied."""
        report = self._write(networks)
        self.last_fuse_ms = report.ms
        return report

    @torch.no_grad()
    def _write(self, networks: Sequence[Tuple[LoraNetwork, float]]) -> FuseReport:
        start = time.perf_counter()
        wanted: Dict[str, List[Tuple[LoraNetwork, float]]] = {}
        for network, multiplier in networks:
            if multiplier == 0:
                continue
            for module_name in network.modules:
                wanted.setdefault(module_name, []).append((network, float(multiplier)))
        wanted_keys = {name: tuple((net.uid, mult) for net, mult in items) for name, items in wanted.items()}
        changed = [name for name in set(wanted_keys) | set(self.fused) if wanted_keys.get(name) != self.fused.get(name)]
        self._check_biases(changed, wanted)

        restores: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (target, backup)
        for module_name in changed:
            module = self.modules[module_name]
            contributions = wanted.get(module_name, [])
            weight_backup = self._backup(module_name + ".weight", module.weight, keep=bool(contributions))
            bias_deltas = [(net.modules[module_name].bias, mult) for net, mult in contributions
                           if net.modules[module_name].bias is not None]
            if bias_deltas or (module_name + ".bias") in self.backups:
                bias_backup = self._backup(module_name + ".bias", module.bias, keep=bool(bias_deltas))
                if bias_deltas:
                    total = sum(delta * mult for delta, mult in bias_deltas)
                    module.bias.copy_(bias_backup.to(total.device, torch.float32) + total)
                else:
                    restores.append((module.bias, bias_backup))
            if not contributions:
                restores.append((module.weight, weight_backup))
                continue
            deltas = [net.modules[module_name] for net, _ in contributions]
            up = torch.cat([d.up * mult for d, (_, mult) in zip(deltas, contributions)], dim=1)
            down = torch.cat([d.down for d in deltas], dim=0)
            _write_low_rank(module.weight, weight_backup, up, down)

        if restores:
            torch._foreach_copy_([t for t, _ in restores], [s.to(t.device, non_blocking=True) for t, s in restores])

        for module_name in changed:
            if module_name in wanted_keys:
                self.fused[module_name] = wanted_keys[module_name]
            else:
                self.fused.pop(module_name, None)
                self.backups.pop(module_name + ".weight", None)
                self.backups.pop(module_name + ".bias", None)
        self.active = [(net.name, float(mult)) for net, mult in networks if mult != 0]
        _sync(next(self.unet.parameters()).device)
        ms = (time.perf_counter() - start) * 1000.0
        self.fuses += 1
        return FuseReport(ms=ms, written_modules=len(changed), active_modules=len(self.fused),
                          backup_bytes=self.backup_bytes)

    def _check_biases(self, changed: Iterable[str], wanted) -> None:
        for module_name in changed:
            for network, _ in wanted.get(module_name, []):
                if network.modules[module_name].bias is not None and self.modules[module_name].bias is None:
                    raise LoraError(
                        f"LoRA '{network.name}' has a bias delta for '{module_name}', which has no bias. A compiled "
                        "graph cannot see a bias added after it was traced, so this LoRA is not fused (nothing was "
                        "written); remove its diff_b keys to use the rest of it.")

    def _backup(self, key: str, tensor: torch.Tensor, keep: bool) -> torch.Tensor:
        backup = self.backups.get(key)
        if backup is None:
            backup = tensor.detach().to(self._backup_device(tensor), copy=True)
            if keep:
                self.backups[key] = backup
        return backup

    def _backup_device(self, tensor: torch.Tensor) -> torch.device:
        if tensor.device.type != "cuda" or self.backup_on_device is True:
            return tensor.device
        if self.backup_on_device is False:
            return torch.device("cpu")
        free, _ = torch.cuda.mem_get_info(tensor.device)
        # Leave room for sampling itself (activations, VAE decode) after the backups.
        return tensor.device if free > tensor.numel() * tensor.element_size() + 2 * 1024 ** 3 else torch.device("cpu")


def _write_low_rank(weight: torch.Tensor, backup: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    """``weight = backup + up @ down`` in place; straight into the weight's storage when dtypes allow."""
    backup_2d = backup.reshape(backup.shape[0], -1)
    if weight.is_contiguous() and backup.device == weight.device and weight.dtype == up.dtype:
        torch.addmm(backup_2d, up, down, out=weight.view(weight.shape[0], -1))
    else:
        weight.copy_(torch.addmm(backup_2d.to(up.device, up.dtype), up, down).view(weight.shape))


# --------------------------------------------------------------------------------------------------------------
# Reference implementation and a deterministic random LoRA (tests and bench)


def attention_and_ff_modules(unet: torch.nn.Module) -> List[str]:
    """Names of every attention (q, k, v, out) and feed-forward projection of a diffusers UNet."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION_AND_FF_SUFFIXES)]


def random_kohya_lora(
    unet: torch.nn.Module,
    rank: int = 16,
    seed: int = 0,
    *,
    modules: Optional[Sequence[str]] = None,
    conv_modules: Sequence[str] = (),
    ldm_names: bool = False,
    strength: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> Dict[str, torch.Tensor]:
    """A deterministic random kohya LoRA state dict for ``unet``.

    Rank ``rank`` on every attention and feed-forward projection (or on ``modules``), plus ``conv_modules``
    (Conv2d, down keeps the conv's kernel: 3x3 convs get a 3x3 down). ``alpha = rank / 2``. ``strength``
    scales the delta relative to a typical weight so the output visibly changes. ``ldm_names`` writes
    A1111/ldm paths instead of diffusers paths.
    """
    generator = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = {}
    config = getattr(unet, "config", None)
    targets = list(modules if modules is not None else attention_and_ff_modules(unet)) + list(conv_modules)
    for module_name in targets:
        module = unet.get_submodule(module_name)
        weight = module.weight
        fan_in = weight[0].numel()
        if isinstance(module, torch.nn.Conv2d):
            down_shape, up_shape = (rank, weight.shape[1], *weight.shape[2:]), (weight.shape[0], rank, 1, 1)
        else:
            down_shape, up_shape = (rank, weight.shape[1]), (weight.shape[0], rank)
        down = torch.randn(down_shape, generator=generator) / fan_in ** 0.5
        # up @ down then has entries of about strength * 2 / sqrt(fan_in): comparable to the weights.
        up = torch.randn(up_shape, generator=generator) * (strength * 2.0 / rank ** 0.5)
        path = ldm_module_name(module_name, config) if ldm_names else module_name
        if path is None:
            raise LoraError(f"'{module_name}' has no ldm name")
        prefix = UNET_PREFIX + path.replace(".", "_")
        state[f"{prefix}.{_DOWN}"] = down.to(dtype)
        state[f"{prefix}.{_UP}"] = up.to(dtype)
        state[f"{prefix}.{_ALPHA}"] = torch.tensor(rank / 2.0, dtype=dtype)
    return state


def save_random_kohya_lora(path: Union[str, os.PathLike], unet: torch.nn.Module, **kwargs) -> str:
    """:func:`random_kohya_lora` written as a ``.safetensors`` file (the format A1111 and kohya read)."""
    from safetensors.torch import save_file

    save_file(random_kohya_lora(unet, **kwargs), os.fspath(path), metadata={"ss_network_module": "networks.lora"})
    return os.fspath(path)


@torch.no_grad()
def apply_lora_reference(unet: torch.nn.Module, state_dicts: Sequence[Tuple[Mapping[str, torch.Tensor], float]]) -> None:
    """Plain reference: ``W = W + sum(multiplier * alpha / rank * up @ down)`` in float32, one module at a time,
    on a clean UNet (diffusers-path names only). Independent of :class:`LoraFuser`'s GEMMs, backups and ldm
    key mapping; for tests and the bench."""
    modules_by_prefix = {UNET_PREFIX + name.replace(".", "_"): module for name, module in unet.named_modules()}
    weight_deltas: Dict[torch.nn.Module, torch.Tensor] = {}
    bias_deltas: Dict[torch.nn.Module, torch.Tensor] = {}
    for state_dict, multiplier in state_dicts:
        for key in state_dict:
            if not key.endswith("." + _DOWN):
                continue
            prefix = key[: -len(_DOWN) - 1]
            module = modules_by_prefix[prefix]
            device = module.weight.device  # the LoRA file's tensors are on the CPU, the UNet may be on a GPU
            down = state_dict[key].to(device, torch.float32)
            up = state_dict[f"{prefix}.{_UP}"].to(device, torch.float32)
            rank = down.shape[0]
            alpha = float(state_dict.get(f"{prefix}.{_ALPHA}", torch.tensor(float(rank))))
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape) * (alpha / rank * multiplier)
            weight_deltas[module] = weight_deltas.get(module, 0) + delta
            if f"{prefix}.{_BIAS}" in state_dict:
                bias = state_dict[f"{prefix}.{_BIAS}"].to(device, torch.float32)
                bias_deltas[module] = bias_deltas.get(module, 0) + bias * multiplier
    for module, delta in weight_deltas.items():
        module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
    for module, delta in bias_deltas.items():
        module.bias.copy_((module.bias.float() + delta).to(module.bias.dtype))
