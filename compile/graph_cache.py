"""A bounded cache of compiled UNet graphs keyed by structure, backend, options, device and dtype.

Asking for a compiled UNet for a module whose key is cached returns the cached graph with the module's
weights written in place into the storage that graph captured: a checkpoint switch costs a copy, never a
compile. A module with another signature (SD1 vs SD2 heads, a 9-channel inpainting UNet, SDXL) never matches
and gets its own graph. An int8 graph (``CompileOptions(quantization="int8")``) is keyed apart from the float
one and binds through :class:`compile.quantization.Int8Binding` (re-quantized in place).

With a :class:`compile.persistent_cache.PersistentCache` the compiled code also outlives the process: a graph
whose key was compiled in an earlier run loads torch's cached kernels on its first call instead of compiling.

CUDA graphs (the ``auto`` compile mode on CUDA, see :func:`compile.backends.resolve_mode`): a replay writes its
output into memory the next replay reuses, while samplers keep UNet outputs across calls (CFG, multistep
history). :class:`CompiledUNet` therefore starts every call as a new CUDA-graph step and returns a copy of the
output, which stays valid for as long as the caller holds it. Weights are only ever written in place (bind,
LoRA), so the captured addresses stay valid; if the module is moved anyway (``--medvram``), torch re-records
rather than replaying stale addresses, and the entry counts it in ``moves_after_capture``.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from .backends import AUTO, CompileOptions, compile_module, resolve_backend, resolve_mode, uses_cuda_graphs
from .control import ResidualUNet, is_ldm_layout
from .counters import RecompileLimitWatcher, compiled_graph_count
from .persistent_cache import PersistentCache, StoredGraph
from .signature import StructureSignature, structure_signature
from .step_times import StepTimes
from .weights import BindReport, aliasing_clone, bind_weights, give_own_storage


class FloatBinding:
    """Weight binding of an unquantized graph. The graph is traced from a private aliasing clone of the first
    module (same storage, own objects); a later module's weights are copied into that storage, it becomes the
    storage's owner, and the previous owner keeps its own weights (:func:`bind_weights`)."""

    def __init__(self, module: torch.nn.Module):
        self.template = aliasing_clone(module)
        self._owner = weakref.ref(module)

    def bind(self, source: torch.nn.Module) -> BindReport:
        report = bind_weights(source, self.template, previous_owner=self._owner())
        self._owner = weakref.ref(source)
        return report

    def describe(self) -> Dict[str, Any]:
        return {}


def binding_for(options: CompileOptions, module: torch.nn.Module):
    """The weight binding for ``options.quantization``: it builds the module to compile (the template) from
    ``module`` and writes later modules' weights into it."""
    if not options.quantization:
        return FloatBinding(module)
    from .quantization import REQUESTS, Int8Binding

    if options.quantization in REQUESTS:
        return Int8Binding(module, options.quantization)
    raise ValueError(f"unknown quantization '{options.quantization}' (choose '' or one of {', '.join(REQUESTS)})")


@dataclasses.dataclass(frozen=True)
class GraphKey:
    signature: str
    backend: str
    options: CompileOptions
    device: str
    dtype: str


def _device_and_dtype(module: torch.nn.Module):
    first = next(module.parameters())
    return str(first.device), str(first.dtype)


class CompiledUNet(torch.nn.Module):
    """The compiled graph as a drop-in module for the eager UNet it was traced from.

    Calls go to the compiled graph; attribute reads the graph does not have (``dtype``, ``in_channels``,
    config fields) fall through to the eager module. The first call is timed as the compile time, and every
    graph dynamo compiles after it is counted as a recompile.
    """

    def __init__(self, entry: "GraphEntry"):
        super().__init__()
        self.eager = entry.module
        self.graph = entry.compiled
        object.__setattr__(self, "entry", entry)

    def forward(self, *args, **kwargs):
        """Call the graph. For an ldm-layout UNet, ``residuals=`` (a :class:`compile.control.Residuals`) gives
        control residuals; without it the same graph adds zeros."""
        entry = self.entry
        graphs_before = compiled_graph_count()
        first_call = entry.compile_s is None
        shapes = call_shapes(args, kwargs)
        memory_before = _reserved_bytes(entry.key.device)
        start = time.perf_counter()
        step_timer = None if first_call else entry.step_times.start(entry.key.device)
        if entry.cuda_graphs:
            entry.note_placement()
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs were copied out
        if entry.residual_unet is not None:  # an ldm-layout UNet: every call passes every control residual
            graph_args, graph_kwargs = entry.residual_unet.call_arguments(args, kwargs), {}
        else:
            graph_args, graph_kwargs = args, kwargs
        output = self._call_graph(entry.stored, graph_args, graph_kwargs)
        if entry.cuda_graphs:
            output = copy_out_of_graph_memory(output)
        new_graphs = compiled_graph_count() - graphs_before
        entry.served_calls.add(shapes)
        if (first_call or new_graphs) and shapes[0] not in entry.compiled_shapes:
            entry.compiled_shapes.append(shapes[0])
        if first_call:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            entry.compile_s = time.perf_counter() - start
            entry.graphs += new_graphs
        else:
            entry.recompiles += new_graphs
            if new_graphs:  # a new size, batch or prompt length compiled its graph
                entry.recompile_s += time.perf_counter() - start
            else:  # a step, not a compile
                entry.step_times.stop(step_timer, shapes[0])
        entry.calls += 1
        entry.memory_growth_bytes += max(0, _reserved_bytes(entry.key.device) - memory_before)
        if entry.stored is not None and (first_call or new_graphs):
            entry.stored.save(entry.compile_s)  # record what inductor wrote, so the next process can load it
        return output

    def _call_graph(self, stored: Optional[StoredGraph], args: tuple, kwargs: dict) -> Any:
        """Call the graph with its compile cache folder; a compile that fails writing into that folder (a full
        disk, the folder deleted while the webui runs) is done again without it, so the job stays compiled."""
        if stored is None or stored.bypassed:
            return self.graph(*args, **kwargs)
        try:
            with stored.activated():
                return self.graph(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 (re-raised unless the folder was at fault)
            if not stored.bypass_after_write_failure(error):
                raise
        return self.graph(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["eager"], name)


def call_shapes(args: tuple, kwargs: dict) -> Tuple[str, ...]:
    """The shapes of a call's tensor arguments, the latent batch's first (as in :func:`step_times.input_shape`).
    With static shapes, a call whose shapes the graph has not served yet compiles: a new image size, batch size
    or prompt length."""
    tensors = [value for value in list(args) + list(kwargs.values()) if isinstance(value, torch.Tensor)]
    return tuple("x".join(str(size) for size in tensor.shape) for tensor in tensors) or ("?",)


def copy_out_of_graph_memory(output: Any) -> Any:
    """``output`` with every tensor copied into ordinary memory (tuples, dicts and diffusers' outputs kept).

    A CUDA-graph replay returns tensors in the graph's private pool, which the next replay overwrites; the
    copy is one device-to-device copy of the (small) UNet output per call."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, output)


def _reserved_bytes(device: str) -> int:
    """Device memory held by torch's allocator (CUDA-graph pools included); 0 off CUDA."""
    return torch.cuda.memory_reserved(device) if device.startswith("cuda") else 0


@dataclasses.dataclass(eq=False)
class GraphEntry:
    """One compiled graph, the module whose tensors it captured, and the binding that writes into them."""

    key: GraphKey
    signature: StructureSignature
    module: torch.nn.Module
    compiled: Any
    binding: Any  # FloatBinding or quantization.Int8Binding
    created: float = dataclasses.field(default_factory=time.time)
    compile_s: Optional[float] = None  # filled by the first call
    graphs: int = 0  # graphs dynamo compiled on the first call
    recompiles: int = 0  # graphs compiled by later calls (new shapes, changed guards)
    recompile_s: float = 0.0  # time those calls took
    calls: int = 0
    reuses: int = 0
    unet: Optional[CompiledUNet] = None
    residual_unet: Optional[ResidualUNet] = None  # what was compiled for an ldm-layout UNet (control residuals)
    stored: Optional[StoredGraph] = None  # its persistent cache entry, when the GraphCache has one
    memory_growth_bytes: int = 0  # device memory the allocator reserved during its calls (kernels, graph pools)
    moves_after_capture: int = 0  # calls that found the captured weights moved (torch re-records the graph)
    step_times: StepTimes = dataclasses.field(default_factory=StepTimes)  # calls after the first, by shape
    compiled_shapes: List[str] = dataclasses.field(default_factory=list)  # latent shapes whose call compiled
    served_calls: Set[Tuple[str, ...]] = dataclasses.field(default_factory=set)  # call_shapes of calls so far
    _placement: Optional[tuple] = dataclasses.field(default=None, repr=False)

    @property
    def cuda_graphs(self) -> bool:
        """Whether calls replay CUDA graphs (the resolved compile mode captures them on a CUDA device)."""
        return uses_cuda_graphs(self.key.options.mode, self.key.device)

    def note_placement(self) -> None:
        """Count calls that find the captured weights at new addresses (a module moved between devices, as
        ``--medvram`` does): torch re-records the CUDA graph then, which costs time and graph-pool memory.
        One pointer stands for all of them: moving a module re-allocates every tensor."""
        first = next(self.module.parameters())
        placement = (first.device, first.data_ptr())
        if self._placement is not None and placement != self._placement:
            self.moves_after_capture += 1
        self._placement = placement

    def will_compile(self, args: tuple, kwargs: dict) -> bool:
        """Whether this call is expected to build a graph: the first call, or (static shapes) shapes not served
        yet. A guess made before the call, for the UI; the counters after it say what happened."""
        if self.compile_s is None:
            return True
        return not self.key.options.dynamic and call_shapes(args, kwargs) not in self.served_calls

    @property
    def cache_hit(self) -> Optional[bool]:
        """True when the first call loads from the persistent cache, False when it compiles, None without one."""
        return None if self.stored is None else self.stored.hit

    @property
    def cache_problem(self) -> Optional[str]:
        """Why a stored entry was refused (corrupt, other key, unreadable) or the folder not used, to show the
        user; else None."""
        return None if self.stored is None else self.stored.problem

    @property
    def cache_notice(self) -> Optional[str]:
        """:attr:`cache_problem` in a few words, for a job's info line."""
        return None if self.stored is None else self.stored.notice

    @property
    def expected_s(self) -> Optional[float]:
        """How long the first call should take, from the persistent cache's records, if known (for the UI)."""
        return None if self.stored is None else self.stored.expected_s

    def describe(self) -> Dict[str, Any]:
        return {
            "signature": self.signature.short(),
            "class": self.signature.class_name,
            "parameters": self.signature.parameter_count,
            "backend": self.key.backend,
            "options": self.key.options.as_dict(),
            "device": self.key.device,
            "dtype": self.key.dtype,
            "compile_s": self.compile_s,
            "graphs": self.graphs,
            "recompiles": self.recompiles,
            "calls": self.calls,
            "reuses": self.reuses,
            "cache_hit": self.cache_hit,
            "cache_problem": self.cache_problem,
            "expected_s": self.expected_s,
            "cuda_graphs": self.cuda_graphs,
            "memory_growth_mb": round(self.memory_growth_bytes / 2**20, 1),
            "moves_after_capture": self.moves_after_capture,
            "step_ms": self.step_times.as_dict(),
            "compiled_shapes": list(self.compiled_shapes),
            **self.binding.describe(),
        }


@dataclasses.dataclass
class Lookup:
    """The answer of :meth:`GraphCache.get`: the compiled UNet and what it cost to get it."""

    unet: CompiledUNet
    entry: GraphEntry
    reused: bool
    bind_ms: float
    copied_tensors: int

    def summary(self) -> str:
        entry = self.entry
        if self.reused:
            return f"reused compiled graph {entry.signature.short()} (weights bound in {self.bind_ms:.1f} ms)"
        if entry.cache_hit:
            return f"loading graph {entry.signature.short()} from the compile cache"
        problem = f" ({entry.cache_problem})" if entry.cache_problem else ""
        return f"compiling a new graph {entry.signature.short()} with {entry.key.backend}{problem}"


class GraphCache:
    """Compiled graphs by :class:`GraphKey`, least recently used first out beyond ``max_graphs``.

    Each entry keeps the module it compiled, because the graph reads that module's tensors; evicting an
    entry releases both. ``persistent`` (optional) keeps the compiled code on disk across processes.
    """

    def __init__(self, max_graphs: int = 2, persistent: Optional[PersistentCache] = None):
        if max_graphs < 1:
            raise ValueError("max_graphs must be at least 1")
        self.max_graphs = max_graphs
        self._entries: "collections.OrderedDict[GraphKey, GraphEntry]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        self.reuses = 0
        self.evictions = 0
        self.evicted_recompiles = 0  # recompiles of entries no longer kept (the status counts since the start)
        self.persistent = persistent
        self.recompile_limit_watcher = RecompileLimitWatcher.install()
        # names of module attributes that hosts and their extensions set as per-job state (see structure_signature)
        self.runtime_attributes: Set[str] = set()

    def key_for(self, module: torch.nn.Module, backend: str = AUTO, options: Optional[CompileOptions] = None):
        """The cache key of ``module``; the compile mode in it is resolved for the module's device (``auto``)."""
        signature = structure_signature(module, self.runtime_attributes)
        device, dtype = _device_and_dtype(module)
        options = options or CompileOptions()
        options = dataclasses.replace(options, mode=resolve_mode(options.mode, device))
        key = GraphKey(signature.digest, resolve_backend(backend), options, device, dtype)
        return key, signature

    def get(
        self, module: torch.nn.Module, backend: str = AUTO, options: Optional[CompileOptions] = None
    ) -> Lookup:
        """The compiled UNet for ``module``: cached (weights bound in place) or newly compiled (lazily: the
        graph is built on its first call, timed in ``entry.compile_s``)."""
        key, signature = self.key_for(module, backend, options)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                report = entry.binding.bind(module)
                entry.reuses += 1
                self.reuses += 1
                return Lookup(entry.unet, entry, True, report.bind_ms, report.copied)
            if not key.options.quantization:  # a float graph aliases the module's storage: it must be its own
                give_own_storage(module, [other.module for other in self._entries.values()])
            binding = binding_for(key.options, module)
            stored = self.persistent.open(key) if self.persistent is not None else None
            residual_unet = ResidualUNet(binding.template) if is_ldm_layout(binding.template) else None
            target = residual_unet if residual_unet is not None else binding.template
            compiled = compile_module(target, key.backend, key.options)
            entry = GraphEntry(key, signature, binding.template, compiled, binding=binding, stored=stored,
                               residual_unet=residual_unet)
            entry.unet = CompiledUNet(entry)
            self._entries[key] = entry
            self.compiles += 1
            self._evict_beyond(self.max_graphs)
            return Lookup(entry.unet, entry, False, 0.0, 0)

    def _evict_beyond(self, max_graphs: int) -> None:
        """Drop least recently used entries beyond ``max_graphs``; their graph, module and (on CUDA) cached
        device memory are released now rather than at some later garbage collection."""
        evicted = []
        while len(self._entries) > max_graphs:
            evicted.append(self._entries.popitem(last=False)[1])
            self.evictions += 1
            self.evicted_recompiles += evicted[-1].recompiles
        if not evicted:
            return
        on_cuda = any(entry.key.device.startswith("cuda") for entry in evicted)
        del evicted
        gc.collect()  # an entry and its CompiledUNet refer to each other
        if on_cuda:
            torch.cuda.empty_cache()

    def entries(self) -> List[GraphEntry]:
        return list(self._entries.values())

    def quantization_speed(self) -> List[Dict[str, Any]]:
        """Each quantized graph against the float graph of the same structure, backend, options, device and
        dtype, at the input shape both have served most: step times from the calls they served, so whether
        quantization pays is measured on this device, not assumed (see :mod:`compile.step_times`)."""
        comparisons = []
        for quantized in list(self._entries.values()):
            if not quantized.key.options.quantization:
                continue
            float_key = dataclasses.replace(
                quantized.key, options=dataclasses.replace(quantized.key.options, quantization=""))
            float_entry = self._entries.get(float_key)
            if float_entry is None:
                continue
            float_times, quantized_times = float_entry.step_times.as_dict(), quantized.step_times.as_dict()
            shared = [shape for shape in quantized_times if shape in float_times]
            if not shared:
                continue
            shape = max(shared, key=lambda each: min(float_times[each]["calls"], quantized_times[each]["calls"]))
            float_ms, quantized_ms = float_times[shape]["median_ms"], quantized_times[shape]["median_ms"]
            memory = quantized.binding.weights.memory_mb()
            comparisons.append({
                "device": quantized.key.device,
                "graph": quantized.signature.short(),
                "scheme": quantized.binding.weights.mode,
                "shape": shape,
                "float_ms": float_ms,
                "quantized_ms": quantized_ms,
                "speedup": round(float_ms / quantized_ms, 3),
                "weight_share": round(memory["int8"] / memory["float"], 3),
            })
        return comparisons

    def clear(self) -> None:
        with self._lock:
            self._evict_beyond(0)

    def status(self) -> Dict[str, Any]:
        """Everything a status page needs, JSON-able."""
        return {
            "max_graphs": self.max_graphs,
            "compiles": self.compiles,
            "reuses": self.reuses,
            "evictions": self.evictions,
            # graphs compiled for new sizes, batches or prompt lengths of graphs already built, since the start
            "recompiles": self.evicted_recompiles + sum(entry.recompiles for entry in self._entries.values()),
            "recompile_limit_hits": list(self.recompile_limit_watcher.messages),
            "persistent_cache": self.persistent.status() if self.persistent is not None else None,
            "graphs": [entry.describe() for entry in self._entries.values()],
            "quantization_speed": self.quantization_speed(),
        }
