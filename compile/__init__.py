"""Torch-level core of the extension: compile backends, structure signatures, the graph cache, in-place weight
binding. Nothing here imports the webui, so all of it is tested without one."""

from .backends import (
    AUTO,
    AUTO_MODE,
    CUDA_GRAPHS_MODE,
    INDUCTOR,
    KNOWN_BACKENDS,
    NEXFORT,
    ONEFLOW,
    BackendUnavailable,
    CompileOptions,
    auto_choice,
    available_backends,
    compile_module,
    resolve_backend,
    resolve_mode,
    uses_cuda_graphs,
)
from .counters import RecompileLimitWatcher, compiled_graph_count, count_new_graphs, graph_break_count
from .graph_cache import CompiledUNet, GraphCache, GraphEntry, GraphKey, Lookup
from .persistent_cache import PersistentCache, StoredGraph
from .signature import StructureSignature, structure_signature
from .weights import BindReport, aliasing_clone, bind_weights, data_pointers, tensors_by_name
from .lora import LoraError, LoraFuser, LoraNetwork, kohya_module_names, load_kohya_lora
