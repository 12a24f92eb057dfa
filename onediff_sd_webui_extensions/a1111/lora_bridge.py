"""Bridge to A1111's built-in Lora extension (``extensions-builtin/Lora``, webui v1.10.1) for a compiled UNet.

How the built-in extension applies LoRA: ``lora_patches.LoraPatches`` replaces ``forward`` (and
``_load_from_state_dict``) of ``torch.nn.Linear``, ``Conv2d``, ``GroupNorm``, ``LayerNorm`` and
``MultiheadAttention`` *at class level* (``modules.patches.patch``), keeping the old functions in
``networks.originals``. The patched forward calls ``networks.network_apply_weights(self)`` lazily: when the
module's ``network_current_names`` differ from the loaded networks it restores the weights from a CPU backup
and writes ``W + delta`` with ``copy_``. A compiled graph never runs those forwards, so:

1. :func:`apply_networks_to_unet` runs ``network_apply_weights`` eagerly on every UNet module the extension
   named (``network_layer_name``), after A1111 activated the job's networks and before the compiled UNet runs,
   timed. Writes are in place; the one write that is not (A1111 assigns a new ``torch.nn.Parameter`` when a
   network has a bias delta for a layer without a bias) is detected: such a bias has no storage in the graph,
   so it is removed again and reported (the rest of the network applies). Any other tensor that no longer is
   the captured one is copied into the captured storage.
2. :func:`original_forwards` runs a block (tracing the graph, every compiled call) with the classes' original
   forwards, so dynamo never traces ``network_apply_weights`` and the LoRA state is never a guard. The patches
   are swapped back as soon as the block ends: the text encoder, which A1111 runs outside UNet calls, keeps
   the extension's lazy LoRA exactly as in a normal run. (Measured with torch 2.13: dynamo does not guard on
   the class attribute, so a graph traced with the original forwards keeps running them even if called
   outside the block; what the block protects is every trace — the first call and any recompile.)

Nothing from the webui is imported at module level: the extension's ``networks`` module is found in
``sys.modules`` (A1111 imports it when it loads the built-in extension) or passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import threading
import time
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

# The classes whose forward the v1.10.1 Lora extension patches, by the names it uses in ``networks``
# (``network_<Name>_forward``) and ``networks.originals`` (``<Name>_forward``).
PATCHED_CLASSES: Tuple[Tuple[str, type], ...] = (
    ("Linear", torch.nn.Linear),
    ("Conv2d", torch.nn.Conv2d),
    ("GroupNorm", torch.nn.GroupNorm),
    ("LayerNorm", torch.nn.LayerNorm),
    ("MultiheadAttention", torch.nn.MultiheadAttention),
)
HANDLED_MODULE_TYPES = tuple(cls for _, cls in PATCHED_CLASSES)
_X_PROJ = re.compile(r"_(q|k|v|out)_proj$")

# One compiled call at a time swaps the class attributes; re-entrant so nested use on one thread is a no-op.
_FORWARD_SWAP_LOCK = threading.RLock()


def lora_extension() -> Optional[Any]:
    """The built-in Lora extension's ``networks`` module, or None when it is disabled or not loaded yet."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "network_apply_weights") or getattr(networks, "originals", None) is None:
        return None
    return networks


def _module_tensors(module: torch.nn.Module) -> Iterator[Tuple[torch.nn.Module, str, str]]:
    """(owner, attribute, name relative to ``module``) of every tensor ``network_apply_weights`` may write."""
    if isinstance(module, torch.nn.MultiheadAttention):
        yield module, "in_proj_weight", "in_proj_weight"
        yield module.out_proj, "weight", "out_proj.weight"
        yield module.out_proj, "bias", "out_proj.bias"
    else:
        yield module, "weight", "weight"
        yield module, "bias", "bias"


@dataclasses.dataclass
class LoraApplyReport:
    """What one :func:`apply_networks_to_unet` call did."""

    apply_ms: float = 0.0
    networks: List[Tuple[str, float]] = dataclasses.field(default_factory=list)  # (name, unet multiplier)
    updated_modules: int = 0  # modules the extension re-processed because their network set changed
    copied_into_captured: List[str] = dataclasses.field(default_factory=list)  # tensors re-bound to the graph's
    dropped_biases: List[str] = dataclasses.field(default_factory=list)  # bias deltas the graph cannot hold

    def comment(self) -> Optional[str]:
        """A line for the job's infotext when part of a LoRA could not be applied, else None."""
        if not self.dropped_biases:
            return None
        return (f"LoRA bias deltas for {len(self.dropped_biases)} bias-less UNet layer(s) cannot be used by the "
                f"compiled UNet and were left out (e.g. {self.dropped_biases[0]}); the rest of the LoRA applies.")

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def unet_lora_modules(unet: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """The UNet modules the Lora extension handles: patched types it gave a ``network_layer_name``."""
    return [(name, module) for name, module in unet.named_modules()
            if isinstance(module, HANDLED_MODULE_TYPES) and getattr(module, "network_layer_name", None) is not None]


# unet -> (captured, [(name, module, the same module in captured)]), computed once per pair: the check runs
# before every compiled call (every sampling step), where walking both module trees again cost 2.2 ms (SD1.5) /
# 5.9 ms (SDXL) per call on a CPU thread.
_LORA_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, Tuple[Any, list]]" = weakref.WeakKeyDictionary()


def _lora_modules_with_captured(unet: torch.nn.Module, captured: torch.nn.Module):
    """(name, module, captured module) of every module of a patched type; whether the extension named it is
    read at each call (names are assigned when a model loads, possibly after this list was made)."""
    cached = _LORA_MODULES.get(unet)
    if cached is None or cached[0]() is not captured:
        pairs = [(name, module, captured.get_submodule(name)) for name, module in unet.named_modules()
                 if isinstance(module, HANDLED_MODULE_TYPES)]
        cached = _LORA_MODULES[unet] = (weakref.ref(captured), pairs)
    return cached[1]


def _tensor_slots(module: torch.nn.Module, captured_module: torch.nn.Module):
    """(owner, attribute, relative name, captured owner, captured tensor now) for each tensor of ``module``."""
    for owner, attribute, relative in _module_tensors(module):
        captured_owner = captured_module.out_proj if relative.startswith("out_proj.") else captured_module
        yield owner, attribute, relative, captured_owner, getattr(captured_owner, attribute, None)


@torch.no_grad()
def apply_networks_to_unet(unet: torch.nn.Module, captured: Optional[torch.nn.Module] = None,
                           networks: Optional[Any] = None) -> LoraApplyReport:
    """Apply A1111's currently loaded networks to ``unet``'s weights now, in place.

    ``captured`` is the module whose tensors the compiled graph reads (default: ``unet`` itself); tensors the
    extension replaced instead of writing are copied into it. Modules whose network set is unchanged are not
    touched (``network_apply_weights`` checks that itself), so calling this before every UNet call is cheap:
    one attribute read per LoRA-able module when nothing changed, and no device synchronisation. Modules no
    loaded network names and that carry nothing applied are skipped: the extension would only back them up
    (a CPU copy of every UNet weight, most of its ~700 ms) and leave them unchanged.
    """
    networks = networks if networks is not None else lora_extension()
    report = LoraApplyReport()
    if networks is None:
        return report
    captured = unet if captured is None else captured

    start = time.perf_counter()
    wanted_layers = _layers_named_by(networks)
    written = []
    for name, module, captured_module in _lora_modules_with_captured(unet, captured):
        layer_name = getattr(module, "network_layer_name", None)
        if layer_name is None:
            continue
        before = getattr(module, "network_current_names", ())
        if wanted_layers is not None and before == () and layer_name not in wanted_layers:
            continue
        slots = list(_tensor_slots(module, captured_module))  # before the extension may replace a tensor
        networks.network_apply_weights(module)
        if getattr(module, "network_current_names", ()) != before:
            written.append((name, slots))
    for name, slots in written:
        for owner, attribute, relative, captured_owner, target in slots:
            qualified = f"{name}.{relative}"
            tensor = getattr(owner, attribute, None)
            if tensor is None or target is tensor:
                continue
            if target is None:  # a bias the extension added to a bias-less layer: no storage in the graph
                setattr(owner, attribute, None)
                report.dropped_biases.append(qualified)
                continue
            if tensor.data_ptr() != target.data_ptr():
                target.copy_(tensor)
                report.copied_into_captured.append(qualified)
            if owner is captured_owner:
                owner._parameters[attribute] = target  # the graph's own Parameter object back in place
            elif tensor.device == target.device:
                tensor.data = target.data  # share the captured storage, as the graph cache binds weights
    if written and next(unet.parameters()).device.type == "cuda":
        torch.cuda.synchronize()  # the time to report includes the writes (nothing to wait for otherwise)
    report.apply_ms = (time.perf_counter() - start) * 1000.0
    report.updated_modules = len(written)
    report.networks = [(net.name, float(net.unet_multiplier)) for net in getattr(networks, "loaded_networks", [])]
    return report


def networks_fingerprint(networks: Optional[Any] = None) -> Optional[tuple]:
    """The loaded networks as the extension's ``network_apply_weights`` compares them with a module's applied
    set (name, multipliers, dyn_dim), or None without the extension. While it stays the same and nothing else
    runs the UNet's patched forwards (true inside one compiled job), applying again would change nothing."""
    networks = networks if networks is not None else lora_extension()
    if networks is None:
        return None
    return tuple((net.name, net.te_multiplier, net.unet_multiplier, net.dyn_dim)
                 for net in getattr(networks, "loaded_networks", []))


def _layers_named_by(networks: Any) -> Optional[set]:
    """``network_layer_name``s the loaded networks have modules for (None when that cannot be told)."""
    names = set()
    for net in getattr(networks, "loaded_networks", []):
        modules = getattr(net, "modules", None)
        if not isinstance(modules, dict):
            return None
        for key in modules:
            names.add(key)
            names.add(_X_PROJ.sub("", key))  # MultiheadAttention parts are keyed "<layer>_q_proj" etc.
    return names


def forget_backups(unet: torch.nn.Module, networks: Optional[Any] = None) -> int:
    """Forget the extension's LoRA backups and applied-set on ``unet``'s modules; returns how many held one.

    Call it only right after clean checkpoint weights were written into ``unet`` *without*
    ``load_state_dict`` (e.g. by the graph cache binding another model's weights into captured storage):
    ``load_state_dict`` already does this through the extension's ``_load_from_state_dict`` patches, and
    otherwise the next application would restore the previous checkpoint's weights from stale backups.
    """
    networks = networks if networks is not None else lora_extension()
    forgotten = 0
    for _, module in unet_lora_modules(unet):
        forgotten += getattr(module, "network_weights_backup", None) is not None
        if networks is not None and hasattr(networks, "network_reset_cached_weight"):
            networks.network_reset_cached_weight(module)
        else:  # what the extension's network_reset_cached_weight does
            module.network_current_names = ()
            module.network_weights_backup = None
            module.network_bias_backup = None
    return forgotten


@contextlib.contextmanager
def original_forwards(networks: Optional[Any] = None) -> Iterator[List[type]]:
    """Run the block with the torch.nn forwards as they were before the Lora extension patched them.

    Only forwards that currently are the extension's patch are swapped (so a patch another extension laid
    over it is left alone), and they are put back when the block ends, also on error. Yields the swapped
    classes. Use it around the compiled UNet's first call (tracing) and every later call. While the block
    runs, every thread sees the original forwards: A1111 runs one job at a time and computes the text
    conditioning before sampling, so the text encoder's LoRA (applied by the patched forwards) is unaffected.
    """
    networks = networks if networks is not None else lora_extension()
    with _FORWARD_SWAP_LOCK:
        swapped: List[Tuple[type, Any]] = []
        if networks is not None:
            for class_name, cls in PATCHED_CLASSES:
                patched = getattr(networks, f"network_{class_name}_forward", None)
                original = getattr(networks.originals, f"{class_name}_forward", None)
                if patched is not None and original is not None and cls.__dict__.get("forward") is patched:
                    cls.forward = original
                    swapped.append((cls, patched))
        try:
            yield [cls for cls, _ in swapped]
        finally:
            for cls, patched in reversed(swapped):
                cls.forward = patched


@dataclasses.dataclass
class A1111LoraState:
    """LoRA state of the compiled UNet for the status route: the last application and totals."""

    last: Optional[LoraApplyReport] = None
    applications: int = 0
    dropped_biases_total: int = 0

    def apply(self, unet: torch.nn.Module, captured: Optional[torch.nn.Module] = None,
              networks: Optional[Any] = None) -> LoraApplyReport:
        report = apply_networks_to_unet(unet, captured, networks)
        self.last = report
        self.applications += 1
        self.dropped_biases_total += len(report.dropped_biases)
        return report

    def status(self) -> Dict[str, Any]:
        return {
            "last_fuse_ms": None if self.last is None else round(self.last.apply_ms, 3),
            "last_networks": [] if self.last is None else [list(item) for item in self.last.networks],
            "last_updated_modules": 0 if self.last is None else self.last.updated_modules,
            "applications": self.applications,
            "dropped_biases_total": self.dropped_biases_total,
        }
