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
from itertools import repeat
from typing import Dict, List, Optional, Tuple

import torch

from .weights import tensors_by_name


_VERSION = operator.attrgetter("_version")


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
        # Parallel lists, so that the quick check runs as C-level map()s over them: tensor slots (the owning module's _parameters/_buffers and the key),
        # slots that held None (a bias-less layer's "bias"), every table and its size, every submodule slot.
        self._names: List[str] = []
        self._tables: List[dict] = []
        self._keys: List[str] = []
        self._empty: List[Tuple[dict, str, str]] = []
        self._all_tables: List[Tuple[dict, str]] = []  # with its module's prefix
        self._child_tables: List[dict] = []
        self._child_keys: List[str] = []
        self._children: List[torch.nn.Module] = []
        for qualified_name, sub in module.named_modules(remove_duplicate=False):
            prefix = f"{qualified_name}." if qualified_name else ""
            for key, child in sub._modules.items():
                self._child_tables.append(sub._modules)
                self._child_keys.append(key)
                self._children.append(child)
            for table in (sub._parameters, sub._buffers):
                self._all_tables.append((table, prefix))
                for key, tensor in table.items():
                    if tensor is None:
                        self._empty.append((table, key, prefix + key))
                    else:
                        self._names.append(prefix + key)
                        self._tables.append(table)
                        self._keys.append(key)
        self._table_list = [table for table, _ in self._all_tables]
        self._sizes = [len(table) for table in self._table_list]
        self._empty_tables = [table for table, _, _ in self._empty]
        self._empty_keys = [key for _, key, _ in self._empty]
        self._tensors: List[torch.Tensor] = []
        self._state: Tuple[List[int], List[int]] = ([], [])
        self.snapshot()

    def _current(self) -> List[Optional[torch.Tensor]]:
        return list(map(dict.get, self._tables, self._keys))

    @staticmethod
    def _pointers_and_versions(tensors: List[Optional[torch.Tensor]]) -> Tuple[List[int], List[int]]:
        try:
            return list(map(torch.Tensor.data_ptr, tensors)), list(map(_VERSION, tensors))
        except (RuntimeError, TypeError):  # an inference-mode tensor (no version counter) or an emptied slot
            return ([t.data_ptr() if t is not None else 0 for t in tensors],
                    [_version(t) if t is not None else 0 for t in tensors])

    def snapshot(self) -> None:
        """Remember the current tensors as the ones the graph has."""
        self._tensors = self._current()
        self._state = self._pointers_and_versions(self._tensors)

    def _unchanged(self, current: List[Optional[torch.Tensor]]) -> bool:
        return (not any(map(operator.is_not, current, self._tensors))
                and list(map(len, self._table_list)) == self._sizes
                and all(map(operator.is_, map(dict.get, self._empty_tables, self._empty_keys), repeat(None)))
                and all(map(operator.is_, map(dict.get, self._child_tables, self._child_keys), self._children))
                and self._pointers_and_versions(current) == self._state)

    def _added(self) -> List[str]:
        """Tensors in slots that held none (a bias assigned to a bias-less layer) or under new keys."""
        added = [name for table, key, name in self._empty if table.get(key) is not None]
        known = {(id(table), key) for table, key in zip(self._tables, self._keys)}
        known.update((id(table), key) for table, key, _ in self._empty)
        for (table, prefix), size in zip(self._all_tables, self._sizes):
            if len(table) != size:
                added.extend(prefix + key for key, value in table.items()
                             if (id(table), key) not in known and value is not None)
        return added

    def _replaced_modules(self) -> List[str]:
        """Submodule slots holding another module (a LoRA implementation that wraps layers): the graph was
        traced through the old one."""
        replaced = [(table, key) for table, key, child in zip(self._child_tables, self._child_keys, self._children)
                    if table.get(key) is not child]
        if not replaced:
            return []
        names = {id(child): name for name, child in self.module.named_modules(remove_duplicate=False)}
        return [names.get(id(table.get(key)), key) for table, key in replaced]

    def quick_changes(self) -> WeightChanges:
        """Slots holding another tensor object (or none), or whose tensor points at other memory or was
        written in place; reads no tensor data."""
        current = self._current()
        if self._unchanged(current):
            return WeightChanges()
        changes = WeightChanges(added=self._added(), replaced_modules=self._replaced_modules())
        for name, now, then in zip(self._names, current, self._tensors):
            if now is None:
                changes.removed.append(name)
            elif now is not then:
                changes.changed.append(name)
        pointers, versions = self._pointers_and_versions(current)
        listed = set(changes.changed) | set(changes.removed)
        changes.changed.extend(
            name for name, pointer, then_pointer, version, then_version
            in zip(self._names, pointers, self._state[0], versions, self._state[1])
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
