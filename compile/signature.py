"""Structure signature of a UNet: what must match for a compiled graph to serve another module.

Two UNets may share one compiled graph only when the graph computes the same function of their weights: the
same classes, the same parameter and buffer names, shapes and dtypes, and the same non-tensor settings. The
last part matters: SD1 and SD2 UNets of equal width have identical projection shapes but different attention
head counts, and ldm's ``use_linear`` switches between Linear and 1x1-conv projections.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from typing import AbstractSet, Any, Iterator, Tuple

import torch

_SCALARS = (bool, int, float, str, type(None))


def _setting_value(value: Any) -> Any:
    """A JSON-able, instance-independent description of a module attribute (None to leave it out)."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value):
        return list(value)
    if isinstance(value, torch.Tensor):
        return None  # plain tensor attributes are covered by parameters/buffers or are runtime state
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return getattr(value, "__qualname__", type(value).__name__)
    if isinstance(value, dict):
        return None  # configs and caches; their effect shows in shapes and the scalar attributes
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


# Attributes that hosts attach to modules as runtime state, not structure: A1111's Lora extension keeps the
# applied networks and weight backups on every layer (network_current_names, network_weights_backup, ...).
# An instance-level ``forward`` is not structure either: a compiled graph runs the classes' forwards (see
# weights.aliasing_clone); whether a job may bypass such an override is the host's decision.
_RUNTIME_STATE_PREFIXES = ("_", "network_")
_RUNTIME_STATE_NAMES = frozenset({"training", "forward"})


def _module_settings(module: torch.nn.Module, runtime_attributes: AbstractSet[str]) -> dict:
    settings = {}
    for key, value in vars(module).items():
        if key.startswith(_RUNTIME_STATE_PREFIXES) or key in _RUNTIME_STATE_NAMES or key in runtime_attributes:
            continue
        described = _setting_value(value)
        if described is not None:
            settings[key] = described
    return settings


def _named_tensors(module: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


@dataclasses.dataclass(frozen=True)
class StructureSignature:
    """A hashable fingerprint of a module's structure; ``digest`` is the cache key part."""

    digest: str
    class_name: str
    parameter_count: int
    tensor_count: int

    def short(self) -> str:
        return f"{self.class_name}:{self.digest[:12]}"


def structure_signature(module: torch.nn.Module, runtime_attributes: AbstractSet[str] = frozenset()) -> StructureSignature:
    """Fingerprint ``module``: classes and settings of every submodule, every tensor's name, shape and dtype.
    ``runtime_attributes``: more attribute names that are per-job state (a host's extensions set them)."""
    description = {
        "modules": [
            [name, f"{type(sub).__module__}.{type(sub).__qualname__}", _module_settings(sub, runtime_attributes)]
            for name, sub in module.named_modules(remove_duplicate=False)
        ],
        "tensors": [[name, list(t.shape), str(t.dtype)] for name, t in _named_tensors(module)],
    }
    encoded = json.dumps(description, sort_keys=True, default=str).encode()
    return StructureSignature(
        digest=hashlib.sha256(encoded).hexdigest(),
        class_name=type(module).__qualname__,
        parameter_count=sum(p.numel() for p in module.parameters()),
        tensor_count=len(description["tensors"]),
    )
