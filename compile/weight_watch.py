"""Noticing that a module's weights are no longer what its compiled graph was last given.

A compiled graph reads the tensors it captured (see :mod:`compile.weights`). Hosts change a UNet's weights in
ways that never reach those tensors: SD.Next's LoRA code assigns a *new* ``torch.nn.Parameter`` to every layer
it fuses or restores (``module.weight = Parameter(W + dW)``), ``param.data = other`` re-points a tensor, and an
in-place write reaches the graph only where eager and graph share storage (not for an int8 copy, not across
devices). :class:`WeightWatch` records, per tensor slot, the tensor object, its data pointer and its version
counter when the graph was given the weights, and tells which slots changed since:

- :meth:`WeightWatch.quick_changes`, meant for every call: object identity, data pointer and version counter,
  no tensor data read;
- :meth:`WeightWatch.value_changes`, the thorough check: compares values with the captured tensors, for slots
  whose storage is not the captured storage (it finds writes the quick check cannot see, e.g. ``p.data.add_``
  on a tensor that does not share the graph's storage, whose version counter does not move).

Slots that appear or disappear (a LoRA that adds a bias) and submodules replaced by other objects (layers
wrapped by diffusers/peft LoRA) are reported as structure changes: the graph computes another function then, and binding cannot fix that.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Dict, List, Tuple

import torch

from .weights import tensors_by_name


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference-mode tensors keep no version counter; identity and pointer still tell
        return -1


@dataclasses.dataclass
class WeightChanges:
    """What changed since :meth:`WeightWatch.snapshot`: tensor names replaced or rewritten, and names that
    appeared or vanished (a structure change)."""

    changed: List[str] = dataclasses.field(default_factory=list)
    added: List[str] = dataclasses.field(default_factory=list)
    removed: List[str] = dataclasses.field(default_factory=list)
    replaced_modules: List[str] = dataclasses.field(default_factory=list)

    @property
    def structure_changed(self) -> bool:
        return bool(self.added or self.removed or self.replaced_modules)

    def __bool__(self) -> bool:
        return bool(self.changed) or self.structure_changed

    def describe(self) -> str:
        parts = []
        if self.added:
            parts.append(f"{len(self.added)} new tensor(s), e.g. {self.added[0]}")
        if self.removed:
            parts.append(f"{len(self.removed)} tensor(s) gone, e.g. {self.removed[0]}")
        if self.replaced_modules:
            parts.append(f"{len(self.replaced_modules)} layer(s) replaced, e.g. {self.replaced_modules[0]}")
        if self.changed:
            parts.append(f"{len(self.changed)} tensor(s) changed")
        return ", ".join(parts) or "no change"


class WeightWatch:
    """Watches the tensor slots (``_parameters`` / ``_buffers`` entries) of ``module``'s submodules.

    Slots are resolved once; the quick check then reads each slot's current tensor without walking the module
    tree. Call :meth:`snapshot` after the graph was given the weights (a bind).
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._names: List[str] = []
        self._slots: List[Tuple[dict, str]] = []  # (the owning module's _parameters or _buffers, key)
        self._empty_slots: List[Tuple[dict, str, str]] = []  # slots holding None (a bias-less layer's "bias")
        self._tables: List[Tuple[dict, int, str]] = []  # every watched table, its size, its module's prefix
        self._children: List[Tuple[dict, str, torch.nn.Module]] = []  # submodule slots and what they held
        for qualified_name, sub in module.named_modules(remove_duplicate=False):
            prefix = f"{qualified_name}." if qualified_name else ""
            self._children.extend((sub._modules, key, child) for key, child in sub._modules.items())
            for table in (sub._parameters, sub._buffers):
                self._tables.append((table, len(table), prefix))
                for key, tensor in table.items():
                    if tensor is None:
                        self._empty_slots.append((table, key, prefix + key))
                    else:
                        self._names.append(prefix + key)
                        self._slots.append((table, key))
        self._tensors: List[torch.Tensor] = []
        self._pointers: List[int] = []
        self._versions: List[int] = []
        self.snapshot()

    def _current(self) -> List[torch.Tensor]:
        return [table.get(key) for table, key in self._slots]

    def snapshot(self) -> None:
        """Remember the current tensors as the ones the graph has."""
        self._tensors = self._current()
        self._pointers = [t.data_ptr() if t is not None else 0 for t in self._tensors]
        self._versions = [_version(t) if t is not None else 0 for t in self._tensors]

    def _added(self) -> List[str]:
        """Tensors in slots that held none (a bias assigned to a bias-less layer) or under new keys."""
        added = [name for table, key, name in self._empty_slots if table.get(key) is not None]
        for table, size, prefix in self._tables:
            if len(table) != size:
                known = {key for slot_table, key in self._slots if slot_table is table}
                known.update(key for slot_table, key, _ in self._empty_slots if slot_table is table)
                added.extend(prefix + key for key, value in table.items() if key not in known and value is not None)
        return added

    def _replaced_modules(self) -> List[str]:
        """Submodule slots holding another module (a LoRA implementation that wraps layers): the graph was
        traced through the old one."""
        if not any(table.get(key) is not child for table, key, child in self._children):
            return []
        names = {id(child): name for name, child in self.module.named_modules(remove_duplicate=False)}
        return [names.get(id(table.get(key)), key) for table, key, child in self._children
                if table.get(key) is not child]

    def quick_changes(self) -> WeightChanges:
        """Slots holding another tensor object (or none), or whose tensor points at other memory or was
        written in place; reads no tensor data."""
        current = self._current()
        changes = WeightChanges(added=self._added(), replaced_modules=self._replaced_modules())
        if any(map(operator.is_not, current, self._tensors)):
            for name, now, then in zip(self._names, current, self._tensors):
                if now is None:
                    changes.removed.append(name)
                elif now is not then:
                    changes.changed.append(name)
        pointers = [t.data_ptr() if t is not None else 0 for t in current]
        versions = [_version(t) if t is not None else 0 for t in current]
        if pointers != self._pointers or versions != self._versions:
            listed = set(changes.changed) | set(changes.removed)
            changes.changed.extend(
                name for name, pointer, then_pointer, version, then_version
                in zip(self._names, pointers, self._pointers, versions, self._versions)
                if (pointer, version) != (then_pointer, then_version) and name not in listed)
        return changes

    @torch.no_grad()
    def value_changes(self, captured: torch.nn.Module) -> List[str]:
        """Names whose values differ from ``captured``'s tensor of the same name, checked only where the two do
        not share storage (shared storage holds equal values by definition)."""
        captured_tensors: Dict[str, torch.Tensor] = tensors_by_name(captured)
        differing = []
        for name, tensor in zip(self._names, self._current()):
            target = captured_tensors.get(name)
            if tensor is None or target is None:
                continue
            if tensor.device == target.device and tensor.data_ptr() == target.data_ptr():
                continue
            if tensor.shape != target.shape or not torch.equal(tensor.to(target.device, target.dtype), target):
                differing.append(name)
        return differing
