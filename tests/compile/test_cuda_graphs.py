"""CUDA graphs by default on CUDA: the logic that needs no GPU, exercised on CPU.

A CUDA-graph replay writes its output into a private pool that the next replay overwrites. Here a stand-in
graph does exactly that on CPU (one output buffer, rewritten by every call), so the output-lifetime rule of
:class:`compile.graph_cache.CompiledUNet` is checked against eager without a GPU; mode resolution, move
detection and eviction are checked directly.
"""

import weakref

import pytest
import torch

from compile import CompileOptions, GraphCache, resolve_mode, uses_cuda_graphs
from compile import graph_cache as graph_cache_module
from compile.graph_cache import CompiledUNet, FloatBinding, GraphEntry, GraphKey
from compile.models import build_preset, example_inputs
from compile.signature import structure_signature


def test_auto_mode_is_cuda_graphs_on_cuda_only():
    assert resolve_mode("auto", "cuda:0") == "reduce-overhead"
    assert resolve_mode("auto", "cpu") is None
    assert resolve_mode("default", "cuda") is None and resolve_mode(None, "cuda") is None
    assert resolve_mode("max-autotune-no-cudagraphs", "cuda") == "max-autotune-no-cudagraphs"
    assert uses_cuda_graphs("reduce-overhead", "cuda:0") and uses_cuda_graphs("max-autotune", "cuda")
    assert not uses_cuda_graphs("reduce-overhead", "cpu") and not uses_cuda_graphs(None, "cuda")


def test_auto_mode_on_cpu_is_served_by_the_default_graph(graph_cache, tiny_sd15):
    """``auto`` resolves inside the key: on CPU it is the graph (and persistent cache entry) of the old default."""
    key, _ = graph_cache.key_for(tiny_sd15.unet, "inductor", CompileOptions(mode="auto"))
    assert key == tiny_sd15.lookup.entry.key and key.options.mode is None
    assert not tiny_sd15.lookup.entry.cuda_graphs


class ReplayIntoOnePool(torch.nn.Module):
    """Stands in for a CUDA-graph replay on CPU: every call writes its result into one static output buffer and
    returns that buffer, as a replay returns tensors of the graph's pool."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.pool = None

    def forward(self, *args, **kwargs):
        result = self.module(*args, **kwargs)[0]
        if self.pool is None:
            self.pool = torch.empty_like(result)
        self.pool.copy_(result)
        return (self.pool,)


@pytest.fixture
def replaying_entry(monkeypatch):
    """A GraphEntry whose 'compiled graph' overwrites its output on every call, marked as CUDA-graphed."""
    monkeypatch.setattr(graph_cache_module, "uses_cuda_graphs", lambda mode, device: True)
    unet = build_preset("tiny")
    key = GraphKey("test", "inductor", CompileOptions(mode="reduce-overhead"), "cpu", "torch.float32")
    binding = FloatBinding(unet)
    entry = GraphEntry(key, structure_signature(unet), binding.template, ReplayIntoOnePool(binding.template),
                       binding=binding)
    entry.unet = CompiledUNet(entry)
    return entry


def test_outputs_held_across_calls_stay_valid(replaying_entry, monkeypatch):
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    entry, unet = replaying_entry, replaying_entry.module
    first_inputs, second_inputs = example_inputs(unet, seed=1), example_inputs(unet, seed=2)
    first_eager, second_eager = first_inputs.call(unet), second_inputs.call(unet)

    # the stand-in really overwrites: a raw output held across a call shows the next call's result
    raw = first_inputs.call(entry.compiled)
    second_inputs.call(entry.compiled)
    assert torch.equal(raw, second_eager) and not torch.equal(raw, first_eager)

    # through CompiledUNet, what a sampler keeps from step 1 is still step 1's output after step 2
    first = first_inputs.call(entry.unet)
    second = second_inputs.call(entry.unet)
    assert torch.equal(first, first_eager) and torch.equal(second, second_eager)
    assert len(steps) == 2, "every call starts a new CUDA-graph step"


def test_a_moved_module_is_counted(replaying_entry):
    entry = replaying_entry
    inputs = example_inputs(entry.module)
    inputs.call(entry.unet)
    inputs.call(entry.unet)
    assert entry.moves_after_capture == 0
    # re-allocates every tensor, as moving to the CPU and back does; the old storage is held so that the
    # allocator cannot hand the same address back (which a real move may do, and which then needs no re-record)
    old_storage = [parameter.data for parameter in entry.module.parameters()]
    entry.module.double().float()
    inputs.call(entry.unet)
    inputs.call(entry.unet)
    del old_storage  # held until the calls had seen the new addresses
    assert entry.moves_after_capture == 1
    assert entry.describe()["moves_after_capture"] == 1 and entry.describe()["cuda_graphs"] is True


def test_an_evicted_graph_releases_its_module_at_once():
    """Nothing (our entry/CompiledUNet cycle, dynamo's code cache) keeps an evicted graph's weights alive."""
    cache = GraphCache(max_graphs=1)
    first = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval()
    lookup = cache.get(first, "inductor")
    with torch.no_grad():
        lookup.unet(torch.randn(2, 8))  # compiled: dynamo now caches code that read the captured weights
    captured = weakref.ref(lookup.entry.module)
    del lookup
    cache.get(torch.nn.Sequential(torch.nn.Linear(8, 4)), "inductor")
    assert cache.evictions == 1
    assert captured() is None
