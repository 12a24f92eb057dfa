"""Writing one module's weights into the tensors another module's compiled graph captured.

Compiled graphs (CUDA graphs, OneFlow graphs, inductor with parameters as inputs) read weights from the
storage they captured, so a new checkpoint must be written *into* that storage: ``copy_``, data pointers
unchanged. Replacing a tensor object would leave a graph that captured addresses reading stale weights.

The graph is traced from a private :func:`aliasing_clone` of the first module: its own module and tensor
objects over the *same* storage, so compiling costs no memory. The eager module that currently reads the
captured storage is its *owner*. When another module is bound, its weights go into the captured storage and
the previous owner, if still alive (A1111 keeps several checkpoints loaded with ``sd_checkpoints_limit > 1``),
gets its own values back in the storage the new module gave up: no model ever ends up holding another
checkpoint's weights, and no extra copy of the UNet is kept.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import types
from typing import Dict, Iterable, Optional

import torch


@dataclasses.dataclass
class BindReport:
    """What :func:`bind_weights` did: tensors copied into the captured storage, how many of those the previous
    owner got back in swapped storage, and how long it took."""

    copied: int
    swapped: int
    bind_ms: float


def tensors_by_name(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and buffers by qualified name (tied weights appear under each of their names)."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def _owner_and_name(module: torch.nn.Module, qualified: str):
    owner_path, _, leaf = qualified.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), leaf


def aliasing_clone(module: torch.nn.Module, _memo: Optional[dict] = None) -> torch.nn.Module:
    """A copy of ``module``'s tree with new module and tensor objects viewing the same storage (no data copied).

    Other attributes are shared shallowly (configs, A1111's per-module bookkeeping); hook dictionaries are
    copied so hooks added to one tree later do not appear in the other. The clone computes its classes'
    forwards: a ``forward`` set on an instance (ControlNet's per-job hook, a host's router) is not copied, since
    it would run the original's code on the original's weights and keep its state alive with the graph; other
    methods bound to the original are bound to the clone.
    """
    memo = {} if _memo is None else _memo
    if id(module) in memo:
        return memo[id(module)]
    clone = copy.copy(module)
    memo[id(module)] = clone
    vars(clone).pop("forward", None)
    for key, value in list(vars(clone).items()):
        if key.startswith("_") and key.endswith("hooks") and isinstance(value, dict):
            setattr(clone, key, type(value)(value))
        elif isinstance(value, types.MethodType) and value.__self__ is module:
            setattr(clone, key, types.MethodType(value.__func__, clone))

    def alias(tensor):
        if tensor is None:
            return None
        if id(tensor) not in memo:  # tied tensors stay tied
            if isinstance(tensor, torch.nn.Parameter):
                memo[id(tensor)] = torch.nn.Parameter(tensor.data, requires_grad=tensor.requires_grad)
            else:
                memo[id(tensor)] = tensor.detach()
        return memo[id(tensor)]

    clone._parameters = {name: alias(p) for name, p in module._parameters.items()}
    clone._buffers = {name: alias(b) for name, b in module._buffers.items()}
    clone._modules = {name: None if m is None else aliasing_clone(m, memo) for name, m in module._modules.items()}
    return clone


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr()


def _point_at(module: torch.nn.Module, name: str, tensor: torch.Tensor, storage: torch.Tensor) -> None:
    """Make ``module``'s tensor ``name`` (object ``tensor``) read ``storage``."""
    if isinstance(tensor, torch.nn.Parameter):
        tensor.data = storage
    else:
        owner, leaf = _owner_and_name(module, name)
        owner._buffers[leaf] = storage


@torch.no_grad()
def bind_weights(
    source: torch.nn.Module, captured: torch.nn.Module, previous_owner: Optional[torch.nn.Module] = None
) -> BindReport:
    """Copy ``source``'s weights in place into ``captured``'s tensors (the ones a compiled graph holds), and
    point ``source``'s tensors at that storage, so eager and compiled share one copy and later in-place writes
    into ``source`` (a checkpoint reloaded into the same object, LoRA) reach the graph.

    ``previous_owner`` is the module bound before. Where it still reads the captured storage, it is handed the
    storage ``source`` gives up, holding its own values again. Both modules must have ``captured``'s structure
    signature; the graph cache checks that.
    """
    start = time.perf_counter()
    captured_tensors = tensors_by_name(captured)
    previous = tensors_by_name(previous_owner) if previous_owner is not None and previous_owner is not source else {}
    copied = swapped = 0
    for name, tensor in tensors_by_name(source).items():
        target = captured_tensors[name]
        if _same_storage(tensor, target):
            continue  # already the captured storage
        old = previous.get(name)
        hand_back = old is not None and _same_storage(old, target) and tensor.device == target.device
        saved = target.clone() if hand_back else None
        target.copy_(tensor)
        copied += 1
        if tensor.device != target.device:
            continue  # the source lives elsewhere (e.g. offloaded): the graph has its copy, nothing to share
        if hand_back:
            tensor.copy_(saved)
            _point_at(previous_owner, name, old, tensor.detach())
            swapped += 1
        _point_at(source, name, tensor, target.detach())
    return BindReport(copied=copied, swapped=swapped, bind_ms=(time.perf_counter() - start) * 1000.0)


@torch.no_grad()
def give_own_storage(module: torch.nn.Module, captured: Iterable[torch.nn.Module]) -> int:
    """Move ``module``'s tensors that read any of ``captured``'s storage into storage of their own (same values),
    and return how many moved.

    A module bound to one graph reads that graph's storage; a second graph traced from it (other compile
    options, say) would alias the same storage, and a later bind into either graph would change the weights
    the other one serves. Giving the module its own copy first keeps every graph's storage private."""
    taken = {(t.device, t.data_ptr()) for other in captured for t in tensors_by_name(other).values()}
    moved = 0
    for name, tensor in tensors_by_name(module).items():
        if (tensor.device, tensor.data_ptr()) in taken:
            _point_at(module, name, tensor, tensor.detach().clone())
            moved += 1
    return moved


def data_pointers(module: torch.nn.Module) -> Dict[str, int]:
    """Name -> data pointer, to prove writes stayed in place."""
    return {name: t.data_ptr() for name, t in tensors_by_name(module).items()}
