"""Writing one module's weights into the tensors another module's compiled graph captured.

Compiled graphs (CUDA graphs, OneFlow graphs, inductor with parameters as inputs) read weights from the
storage they captured, so a new checkpoint must be written *into* that storage: ``copy_``, data pointers
unchanged. Replacing a tensor object would leave a graph that captured addresses reading stale weights.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict

import torch


@dataclasses.dataclass
class BindReport:
    """What :func:`bind_weights` did: how many tensors it copied and how long it took."""

    copied: int
    shared: int
    bind_ms: float


def tensors_by_name(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and buffers by qualified name (tied weights appear under each of their names)."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def _owner_and_name(module: torch.nn.Module, qualified: str):
    owner_path, _, leaf = qualified.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), leaf


@torch.no_grad()
def bind_weights(source: torch.nn.Module, captured: torch.nn.Module, *, share_storage: bool = True) -> BindReport:
    """Copy ``source``'s weights in place into ``captured``'s tensors (the ones a compiled graph holds).

    With ``share_storage`` (and matching devices) ``source``'s parameters are then pointed at the captured
    storage, so the eager module and the graph hold one copy of the weights, and a later in-place write into
    ``source`` (A1111 reloading a checkpoint into the same object, LoRA) reaches the graph too. Both modules
    must have the same structure signature; this is checked by the caller (the graph cache).
    """
    start = time.perf_counter()
    if source is captured:
        return BindReport(copied=0, shared=0, bind_ms=0.0)
    captured_tensors = tensors_by_name(captured)
    copied = shared = 0
    for name, tensor in tensors_by_name(source).items():
        target = captured_tensors[name]
        if tensor.data_ptr() == target.data_ptr() and tensor.device == target.device:
            continue  # already the captured storage
        target.copy_(tensor)
        copied += 1
        if share_storage and isinstance(tensor, torch.nn.Parameter) and tensor.device == target.device:
            tensor.data = target.data
            shared += 1
        elif share_storage and not isinstance(tensor, torch.nn.Parameter) and tensor.device == target.device:
            owner, leaf = _owner_and_name(source, name)
            if leaf in owner._buffers:
                owner._buffers[leaf] = target
                shared += 1
    return BindReport(copied=copied, shared=shared, bind_ms=(time.perf_counter() - start) * 1000.0)


def data_pointers(module: torch.nn.Module) -> Dict[str, int]:
    """Name -> data pointer, to prove writes stayed in place."""
    return {name: t.data_ptr() for name, t in tensors_by_name(module).items()}
