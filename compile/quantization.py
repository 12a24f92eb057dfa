"""int8 (or fp8) weights for a compiled UNet with torchao, keeping LoRA and checkpoint switching working.

Requests and schemes. A request (``CompileOptions.quantization``) is ``"int8"`` (the checkbox's default) or
``"fp8"`` (opt-in, in the settings); the device decides the scheme that runs (:func:`choose_mode`):

* ``int8`` -> ``int8-dynamic`` where the device runs ``torch._int_mm``, else ``int8-weight-only``.
* ``fp8`` -> ``fp8-rowwise`` (bfloat16 UNets) or ``fp8-tensorwise`` (float16/float32: torchao's row-wise fp8
  takes bfloat16 weights only), where torchao's float8 kernels run (CUDA compute capability >= 8.9).
  Not the default: on a random-weight SD1.5 UNet in float16, fp8 e4m3 on the int8 layers measured 2.0% max
  relative error per UNet call (1.5% on the feed-forward layers alone) against 0.6% for int8 dynamic
  (torchao's float8 math run on the CPU with its hardware check lifted); the quality target is 1%.

What is quantized, and why:

* ``nn.Linear`` layers only. torchao's int8 tensor (``Int8Tensor``) implements ``linear`` and nothing for
  ``conv2d``; an int8 convolution would be dequantize-then-conv, which saves memory but costs time on every
  device, so convolutions (including ``conv_in``/``conv_out``, the most quality-sensitive layers) stay float.
  That quantizes 86% of SDXL's UNet weights but only 28% of SD1.5's (its ResNet convolutions hold 69%).
* Mode: int8 dynamic activation + int8 weight (``Int8DynamicActivationInt8WeightConfig``, an int8 x int8
  matmul via ``torch._int_mm``) where the device runs ``torch._int_mm``, else int8 weight-only
  (``Int8WeightOnlyConfig``: int8 storage, float matmul). See :func:`int8_availability` and :func:`choose_mode`.
* Kept float (:data:`FLOAT_LAYER_PATTERNS`, diffusers and ldm/A1111 names): the timestep and SDXL added-
  condition embeddings and each ResNet's ``time_emb_proj``/``emb_layers``. They run on ``batch`` rows only, so
  int8 saves no time (and CUDA's int8 matmul wants more than 16 rows), they hold 1% of SDXL's weights (3% of
  SD1.5's), and their error scales every feature map of the block.
* Weight-only whatever the device: the cross-attention key/value projections ``attn2.to_k``/``attn2.to_v``
  (:data:`WEIGHT_ONLY_LAYER_PATTERNS`). They read the text encoder's hidden states, whose few huge outlier
  channels would make per-token activation quantization coarse for all the other channels; their weights are
  13% of SDXL's, too many to leave float, and they run on 77 tokens, so the float matmul costs nothing.

How the quantized weights stay writable in place:

in-place ops on torchao tensors fail (``add_`` raises, ``copy_`` too), and a compiled graph reads the storage it
captured, so a weight is never replaced: the new float weight is quantized with the same config and its int8
data, scale and zero point are ``copy_``'d into the captured tensor's inner tensors (:meth:`Int8Weights.
write_float_weights`). Quantization is deterministic, so re-quantizing the same float weight restores the same
int8 data bit for bit. Each quantized layer keeps a float master copy (on CPU by default: it is only read when a
layer is re-quantized, and device memory is what int8 is for) of the checkpoint's weight, from which LoRA deltas
are fused (:meth:`Int8Weights.fuse_deltas`) and to which :meth:`Int8Weights.restore` returns.

LoRA hooks. Either of two ways reaches the int8 graph with 0 recompiles:

* a fuser working on the compiled module (``CompiledUNet.eager`` = ``lookup.entry.module``, the int8 template):
  ``weights = int8_weights_of(module)`` (None for a float graph); for a layer in ``weights.layers`` never
  write ``.weight`` in place (it raises) but take ``weights.layers[name].master`` as the float backup, write
  ``weights.write_float_weights({name: master + delta, ...}, as_master=False)`` (or ``fuse_deltas``) and
  unfuse with ``weights.restore([name, ...])``. Other layers are plain float parameters: write them in place.
* a fuser working on the eager float UNet (A1111's Lora extension does): fuse in place as usual, then
  ``graph_cache.get(eager, ...)`` re-quantizes exactly the tensors whose version counter moved
  (:meth:`Int8Weights.bind_from`); restoring the backups and asking again brings back the original int8 data.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import logging
import re
import time
import warnings
import weakref
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch

from .weights import BindReport, tensors_by_name

logger = logging.getLogger(__name__)

INT8 = "int8"  # request: the best int8 scheme the device runs
FP8 = "fp8"  # request: float8 activations and weights
REQUESTS = (INT8, FP8)
INT8_DYNAMIC = "int8-dynamic"  # int8 activations and weights, int8 x int8 matmul
INT8_WEIGHT_ONLY = "int8-weight-only"  # int8 weights, float matmul
FP8_ROWWISE = "fp8-rowwise"  # float8 e4m3 activations and weights, a scale per row (bfloat16 weights only)
FP8_TENSORWISE = "fp8-tensorwise"  # float8 e4m3, one scale per tensor

FLOAT_LAYER_PATTERNS: Tuple[str, ...] = (
    r"(^|\.)time_embedding\.",  # diffusers timestep MLP
    r"(^|\.)time_embed\.",  # ldm timestep MLP
    r"(^|\.)add_embedding\.",  # diffusers SDXL pooled-text + size conditioning
    r"(^|\.)label_emb\.",  # ldm SDXL added conditioning
    r"(^|\.)class_embedding\.",
    r"\.time_emb_proj$",  # diffusers ResNet timestep projection
    r"\.emb_layers\.",  # ldm ResNet timestep projection
)
WEIGHT_ONLY_LAYER_PATTERNS: Tuple[str, ...] = (r"\.attn2\.to_k$", r"\.attn2\.to_v$")
_FLOAT_LAYER_RE = re.compile("|".join(FLOAT_LAYER_PATTERNS))
_WEIGHT_ONLY_LAYER_RE = re.compile("|".join(WEIGHT_ONLY_LAYER_PATTERNS))


def layer_mode(name: str, linear: torch.nn.Linear, mode: str) -> Optional[str]:
    """How the Linear ``name`` is quantized when the UNet's mode is ``mode``: None keeps it float (see the
    module docstring). Odd widths stay float too: the int8 matmul kernels want multiples of 16."""
    if _FLOAT_LAYER_RE.search(name) or linear.in_features % 16 != 0 or linear.out_features % 16 != 0:
        return None
    if _WEIGHT_ONLY_LAYER_RE.search(name):
        return INT8_WEIGHT_ONLY
    return mode


class Int8Unavailable(RuntimeError):
    """int8 was asked for where it cannot run; the message says why in plain words (show it, run float)."""


class _QuietTorchaoImport(logging.Filter):
    """Drops the messages importing torchao (or diffusers, which imports it) prints that say nothing about this
    extension's schemes: optional kernel libraries built for other devices (``Failed to load .../_C_mxfp8...so``,
    ``_C_cutlass_90a``), torch deprecation warnings about torchao's own ``register_constant`` calls, diffusers'
    note that it cannot register old torchao tensor classes for loading torchao checkpoints and, with a CPU-only
    torch (which never has Triton), ``Detected no triton``. Users read them as breakage."""

    # a logger's filter misses the records of its children, so each logger that prints one is named
    LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree",
               "diffusers.quantizers.torchao.torchao_quantizer")

    def __init__(self) -> None:
        super().__init__()
        self.dropped = []
        self.patterns = ["Failed to load", "register_constant", "Unable to import `torchao` Tensor objects"]
        if not torch.cuda.is_available():
            self.patterns.append("Detected no triton")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(pattern in message for pattern in self.patterns):
            self.dropped.append(message)
            return False
        return True


@contextlib.contextmanager
def quiet_torchao_imports():
    """Leave torchao's harmless import-time messages out of the console while importing torchao or diffusers
    (one debug line says what was left out)."""
    quiet = _QuietTorchaoImport()
    loggers = [logging.getLogger(name) for name in quiet.LOGGERS]
    for each in loggers:
        each.addFilter(quiet)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(quiet)
        if quiet.dropped:
            logger.debug("%d import message(s) left out (optional kernels for other devices, deprecation "
                         "warnings): %s", len(quiet.dropped), quiet.dropped)


@functools.lru_cache(maxsize=None)
def import_torchao():
    """``torchao`` with its quantization API, imported once, only when a quantized graph is asked for (never at
    webui start-up), quietly (:func:`quiet_torchao_imports`)."""
    with quiet_torchao_imports():
        import torchao
        import torchao.quantization  # noqa: F401  (its kernels module logs on import)
    # Printed at each quantized graph's first compile. Harmless: torch then hashes the tensor subclass its own
    # way, and an int8 graph still loads from the persistent cache in a new process (tiny UNet on a CPU: first
    # call 41.8 s compiling, 3.8 s loading; AOTAutograd and FX graph cache hits).
    warnings.filterwarnings("ignore", message=r"\w+ does not implement _stable_hash_for_caching", category=UserWarning)
    return torchao


def torchao_installed() -> bool:
    """Whether torchao can be imported, without importing it (cheap enough for building the UI)."""
    return importlib.util.find_spec("torchao") is not None


def _torchao_configs():
    import_torchao()
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    # set_inductor_config=False: torchao's setter changes process-wide inductor flags (coordinate descent
    # tuning...) that are never restored and change the cache key of every later float compile as well.
    return {
        INT8_DYNAMIC: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        INT8_WEIGHT_ONLY: Int8WeightOnlyConfig(set_inductor_config=False),
        FP8_ROWWISE: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
        FP8_TENSORWISE: Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), set_inductor_config=False),
    }


@functools.lru_cache(maxsize=None)
def _probe(device: str, mode: str, dtype: str = "float32") -> Optional[str]:
    """None when a quantized Linear of ``mode`` runs on ``device`` with ``dtype`` weights (eagerly, 32 rows),
    else why not."""
    try:
        configs = _torchao_configs()
    except ImportError as error:
        return f"torchao is missing or lacks the quantization configs ({error}); install torchao (tested with 0.18)"
    try:
        weight = torch.randn(64, 64, device=device, dtype=getattr(torch, dtype))
        quantized = _quantize_weight(weight, configs[mode])
        if not hasattr(quantized, "__tensor_flatten__"):  # torchao left it float (shape or dtype it skips)
            return f"torchao {mode} does not quantize {dtype} weights"
        activation = torch.randn(32, 64, device=device, dtype=weight.dtype)
        error = (torch.nn.functional.linear(activation, quantized) - activation @ weight.t()).abs().max()
        if not torch.isfinite(error):
            return f"torchao {mode} gives non-finite results on {device}"
    except Exception as error:  # a device or torch build without the kernels
        return f"torchao {mode} does not run on {device} with torch {torch.__version__} ({type(error).__name__}: {error})"
    return None


def _schemes(request: str, dtype: str):
    """The schemes that serve ``request``, best first (see the module docstring)."""
    if request == INT8:
        return (INT8_DYNAMIC, INT8_WEIGHT_ONLY)
    if request == FP8:
        return (FP8_ROWWISE,) if dtype == "bfloat16" else (FP8_TENSORWISE,)
    raise ValueError(f"unknown quantization '{request}' (choose one of {', '.join(REQUESTS)})")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def int8_availability(device="cpu", request: str = INT8, dtype=torch.float32) -> Optional[str]:
    """None when ``request`` (int8 or fp8) can run on ``device`` for ``dtype`` weights, else a plain-words
    reason (for the UI: run unquantized)."""
    device, dtype = str(torch.device(device)), _dtype_name(dtype)
    reasons = [_probe(device, mode, dtype) for mode in _schemes(request, dtype)]
    return None if any(reason is None for reason in reasons) else reasons[-1]


def choose_mode(device="cpu", request: str = INT8, dtype=torch.float32) -> str:
    """The scheme that serves ``request`` on ``device`` (:class:`Int8Unavailable` when none runs).

    int8: dynamic where the device runs int8 x int8 matmuls, else weight-only. On CPU (torch 2.13) both run,
    also under torch.compile, and dynamic is the one that pays: a compiled 640->2560->640 feed-forward on 2048
    tokens ran 2.2-2.3x faster than float in int8 dynamic and no faster in weight-only (two runs on 2 shared
    cores). Whole UNets gain less: only their Linears are int8.
    """
    device, dtype = str(torch.device(device)), _dtype_name(dtype)
    for mode in _schemes(request, dtype):
        if _probe(device, mode, dtype) is None:
            return mode
    raise Int8Unavailable(f"{request} quantization cannot run here: {int8_availability(device, request, dtype)}")


@torch.no_grad()
def _quantize_weight(weight: torch.Tensor, config) -> torch.Tensor:
    """``weight`` (out, in) quantized with ``config`` through torchao's public ``quantize_`` (the same code
    path for the first quantization and every re-quantization, so equal inputs give equal int8 data)."""
    from torchao.quantization import quantize_

    holder = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(holder, config)
    return holder.weight


def _inner_tensors(tensor: torch.Tensor, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The plain tensors a torchao tensor is made of (int8 data, scale, zero point), by dotted name; nested
    subclasses (older torchao's AffineQuantizedTensor holds a tensor_impl) are flattened down to plain ones."""
    names, _ = tensor.__tensor_flatten__()
    leaves = {}
    for name in names:
        inner = getattr(tensor, name)
        if hasattr(inner, "__tensor_flatten__"):
            leaves.update(_inner_tensors(inner, f"{prefix}{name}."))
        else:
            leaves[prefix + name] = inner
    return leaves


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, counting a torchao tensor's inner int8 data and scales."""
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass made of inner tensors
        return sum(inner.numel() * inner.element_size() for inner in _inner_tensors(tensor).values())
    return tensor.numel() * tensor.element_size()


def weight_memory_mb(module: torch.nn.Module) -> float:
    """Parameters and buffers of ``module`` in MB (10^6 bytes), int8 tensors at their real size."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(tensor_bytes(t) for t in tensors.values()) / 1e6


@dataclasses.dataclass
class QuantizedLayer:
    """One quantized Linear of the template: its float master weight and whether it holds a fused weight."""

    name: str
    linear: torch.nn.Linear
    master: torch.Tensor
    config: object  # the torchao config it was quantized with (re-quantization uses the same)
    fused: bool = False


@dataclasses.dataclass
class WriteReport:
    """What a bind or write did: tensors re-quantized, float tensors copied, tensors skipped as unchanged."""

    quantized: int = 0
    copied: int = 0
    unchanged: int = 0
    ms: float = 0.0


class Int8Weights:
    """The quantized state of one template module (int8, or fp8 where asked for): its quantized layers (with
    their float masters and torchao configs), the UNet's scheme (``mode``), and what was last bound from which
    source module.

    Build it with :meth:`quantize_copy`, which leaves the source module untouched (A1111 swaps its eager,
    float UNet back after the job).
    """

    def __init__(self, template: torch.nn.Module, mode: str, layers: Dict[str, QuantizedLayer]):
        self.template = template
        self.mode = mode
        self.layers = layers
        self._source: Optional[weakref.ref] = None
        self._fingerprints: Dict[str, Tuple[Optional[weakref.ref], int, int]] = {}

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def quantize_copy(
        cls,
        module: torch.nn.Module,
        mode: str = INT8,
        *,
        layer_mode: Callable[[str, torch.nn.Linear, str], Optional[str]] = layer_mode,
        master_device="cpu",
    ) -> "Int8Weights":
        """A copy of ``module`` with its Linears quantized (``int8_weights.template``); ``module`` is not
        modified. ``mode``: a request (``int8``, ``fp8``: the device picks the scheme) or a scheme. The float
        weights of quantized layers are never copied on the device (peak memory is the source plus the
        quantized template), only to ``master_device``."""
        first = next(module.parameters())
        if mode in REQUESTS:
            mode = choose_mode(first.device, mode, first.dtype)
        configs = _torchao_configs()
        modes = {
            name: layer_mode(name, sub, mode) for name, sub in module.named_modules() if type(sub) is torch.nn.Linear
        }
        selected = {name: module.get_submodule(name) for name, chosen in modes.items() if chosen is not None}
        placeholder = torch.nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
        memo = {id(linear.weight): placeholder for linear in selected.values()}
        template = copy.deepcopy(module, memo)
        layers = {}
        for name, source_linear in selected.items():
            config = configs[modes[name]]
            linear = template.get_submodule(name)
            linear.weight = _quantize_weight(source_linear.weight, config)
            master = source_linear.weight.detach().to(master_device, copy=True)
            layers[name] = QuantizedLayer(name, linear, master, config)
        weights = cls(template, mode, layers)
        weights._remember(module)
        # Found by int8_weights_of; a weak reference, so that no cycle delays freeing an evicted template's
        # device memory until a garbage collection (forward never reads it: no guard).
        template._int8_weights = weakref.ref(weights)
        return weights

    # --- writing float weights ----------------------------------------------------------------------------

    def _write_quantized(self, layer: QuantizedLayer, weight: torch.Tensor) -> None:
        target = layer.linear.weight
        fresh = _quantize_weight(weight.to(device=target.qdata.device, dtype=target.dtype), layer.config)
        fresh_inner = _inner_tensors(fresh)
        for name, inner in _inner_tensors(target).items():
            inner.copy_(fresh_inner[name])

    @torch.no_grad()
    def write_float_weights(self, weights: Mapping[str, torch.Tensor], *, as_master: bool = True) -> WriteReport:
        """Quantize float weights (layer name -> (out, in) tensor) into the template's int8 tensors in place.

        ``as_master=True`` (checkpoint weights): the masters become these weights. ``as_master=False`` (a LoRA
        fuser handing W + delta): masters stay, the layers are marked fused until :meth:`restore`.
        """
        start = time.perf_counter()
        unknown = sorted(set(weights) - set(self.layers))
        if unknown:
            raise KeyError(f"not quantized layers (write those float parameters in place): {unknown[:5]}")
        for name, weight in weights.items():
            layer = self.layers[name]
            self._write_quantized(layer, weight)
            if as_master:
                layer.master.copy_(weight)
            layer.fused = not as_master
        return WriteReport(quantized=len(weights), ms=(time.perf_counter() - start) * 1000.0)

    def fuse_deltas(self, deltas: Mapping[str, torch.Tensor], scale: float = 1.0) -> WriteReport:
        """Re-quantize only the named layers from master + ``scale`` * delta (a LoRA), in place."""
        fused = {}
        for name, delta in deltas.items():
            master = self.layers[name].master
            fused[name] = master.to(delta.device) + scale * delta.to(master.dtype)
        return self.write_float_weights(fused, as_master=False)

    def restore(self, names: Optional[Iterable[str]] = None) -> WriteReport:
        """Re-quantize the named layers (default: every fused one) from their masters: the original int8 data
        and scales, bit for bit."""
        names = [name for name, layer in self.layers.items() if layer.fused] if names is None else list(names)
        return self.write_float_weights({name: self.layers[name].master for name in names}, as_master=True)

    # --- binding another module of the same structure (checkpoint switch) --------------------------------

    @staticmethod
    def _fingerprint(tensor: torch.Tensor):
        # Tensors created under inference_mode have no version counter: -1 marks them as always changed.
        version = -1 if tensor.is_inference() else tensor._version
        return (weakref.ref(tensor), tensor.data_ptr(), version)

    def _remember(self, source: torch.nn.Module) -> None:
        self._source = weakref.ref(source)
        self._fingerprints = {name: self._fingerprint(t) for name, t in tensors_by_name(source).items()}

    def _unchanged(self, name: str, tensor: torch.Tensor) -> bool:
        known = self._fingerprints.get(name)
        return (
            known is not None and known[2] != -1 and known[0]() is tensor and known[1:] == self._fingerprint(tensor)[1:]
        )

    @torch.no_grad()
    def bind_from(self, source: torch.nn.Module) -> WriteReport:
        """Write ``source``'s weights into the template in place: quantized layers re-quantized (masters
        updated), other tensors copied. Tensors unchanged since the last bind from the same module object (same
        tensor object, storage and version counter) are skipped, so a job with an untouched eager UNet costs
        nothing and an in-place LoRA on it re-quantizes only the layers it wrote. ``source`` is not modified."""
        start = time.perf_counter()
        if source is self.template:  # its own tensors: nothing to write (and its weights are int8 already)
            return WriteReport()
        same_source = self._source is not None and self._source() is source
        template_tensors = tensors_by_name(self.template)
        changed_layers = {}
        report = WriteReport()
        for name, tensor in tensors_by_name(source).items():
            if same_source and self._unchanged(name, tensor):
                report.unchanged += 1
                continue
            layer_name = name[: -len(".weight")] if name.endswith(".weight") else None
            if layer_name in self.layers:
                changed_layers[layer_name] = tensor
            else:
                template_tensors[name].copy_(tensor)
                report.copied += 1
        report.quantized = self.write_float_weights(changed_layers).quantized
        self._remember(source)
        report.ms = (time.perf_counter() - start) * 1000.0
        return report

    # --- reporting -----------------------------------------------------------------------------------------

    def int8_snapshot(self) -> Dict[str, torch.Tensor]:
        """Clones of every quantized layer's int8 data, scales and zero points (``"layer:inner"`` -> tensor),
        to prove later that a restore brought back the same bits (:meth:`matches_snapshot`)."""
        return {
            f"{name}:{inner_name}": inner.clone()
            for name, layer in self.layers.items()
            for inner_name, inner in _inner_tensors(layer.linear.weight).items()
        }

    def matches_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> bool:
        current = self.int8_snapshot()
        return current.keys() == snapshot.keys() and all(torch.equal(now, snapshot[key]) for key, now in current.items())

    def memory_mb(self) -> Dict[str, float]:
        """Weight memory of the template as float (what the source module holds) and as int8 (on the device;
        the float masters live on ``master`` devices and are reported separately)."""
        int8 = weight_memory_mb(self.template)
        quantized_bytes = sum(tensor_bytes(layer.linear.weight) for layer in self.layers.values())
        float_bytes = sum(layer.master.numel() * layer.master.element_size() for layer in self.layers.values())
        return {
            "float": (int8 * 1e6 - quantized_bytes + float_bytes) / 1e6,
            "int8": int8,
            "masters": float_bytes / 1e6,
        }

    def describe(self) -> Dict[str, object]:
        return {
            "scheme": self.mode,
            "quantized_layers": len(self.layers),
            "fused_layers": sorted(name for name, layer in self.layers.items() if layer.fused),
            "weight_mb": self.memory_mb(),
        }


def int8_weights_of(module: torch.nn.Module) -> Optional[Int8Weights]:
    """The :class:`Int8Weights` of an int8 template (what a compiled int8 graph runs), None for a float one."""
    reference = getattr(module, "_int8_weights", None)
    return reference() if reference is not None else None


class Int8Binding:
    """Weight binding of an int8 graph (chosen by ``CompileOptions(quantization="int8")`` in the graph cache).

    The compiled template is an int8 copy of the first module (:meth:`Int8Weights.quantize_copy`); a later
    module of the same structure (checkpoint switch) or the same module changed in place (A1111's LoRA) is
    bound through :meth:`Int8Weights.bind_from`: re-quantized in place, 0 recompiles. The module handed in
    is never modified or aliased, so the eager UNet stays float.

    Device memory: the template holds the int8 Linears and its own copy of the tensors it keeps float
    (convolutions, norms, embeddings: 72% of SD1.5's weights, 14% of SDXL's), beside the eager UNet. Sharing
    those with the eager UNet would save that copy, but a checkpoint switch would then write into the first
    module's tensors, as the float binding does; the float masters of the int8 layers live on the CPU.
    """

    def __init__(self, module: torch.nn.Module, request: str = INT8):
        self.weights = Int8Weights.quantize_copy(module, request)
        self.template = self.weights.template

    def bind(self, source: torch.nn.Module) -> BindReport:
        report = self.weights.bind_from(source)
        return BindReport(copied=report.quantized + report.copied, swapped=0, bind_ms=report.ms)

    def describe(self) -> Dict[str, object]:
        return {"quantization": self.weights.describe()}
