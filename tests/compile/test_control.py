"""Control residuals as graph inputs (compile/control.py), on a toy UNet of ldm's layout (tests/toy_ldm.py).

The reference for where residuals go is written out below the way sd-webui-controlnet's hooked forward adds
them (adapter features after input blocks 2, 5, ...; control residual i to skip i; the last one after the
middle block), independently of ResidualUNet's loop. Compiled calls are compared with eager ones on the same
inputs, and graphs are counted with torch's counters."""

import math

import pytest
import toy_ldm
import torch
from toy_ldm import ToyUNet, timestep_embedding

from compile import GraphCache, compiled_graph_count
from compile.control import ResidualUNet, Residuals, is_ldm_layout


def controlled_reference(unet, x, timesteps, context, control, adapter):
    """sd-webui-controlnet's order of additions, on the toy's blocks (adapter slots after input blocks 2 and 5)."""
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels))
    adapter = list(adapter)
    h, hs = x, []
    for index, block in enumerate(unet.input_blocks):
        h = block(h, emb, context)
        if index in (2, 5, 8, 11):
            h = h + adapter.pop(0)
        hs.append(h)
    h = unet.middle_block(h, emb, context) + control[-1]
    for index, block in enumerate(unet.output_blocks):
        skip_index = len(hs) - 1
        h = block(torch.cat([h, hs.pop() + control[skip_index]], dim=1), emb, context)
    return unet.out(h)


def _inputs(batch=2, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=generator), torch.tensor([999.0, 500.0][:batch]),
            torch.randn(batch, 7, 8, generator=generator))


def _random_residuals(residual_unet, inputs, seed):
    generator = torch.Generator().manual_seed(seed)
    zeros = residual_unet.zero_residuals(*inputs)
    return Residuals([torch.randn(z.shape, generator=generator) for z in zeros.control],
                     [torch.randn(z.shape, generator=generator) for z in zeros.adapter])


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return ToyUNet().eval()


def test_the_toy_is_recognised_and_its_residual_slots_follow_controlnet(toy):
    assert is_ldm_layout(toy)
    residual_unet = ResidualUNet(toy)
    assert residual_unet.control_count == 7  # 6 skips and the middle block
    assert residual_unet.adapter_blocks == (2, 5)  # SD1's 2, 5, 8, 11 where the UNet has those blocks
    assert not is_ldm_layout(torch.nn.Linear(2, 2))


def test_block_outputs_are_the_shapes_the_blocks_give(toy):
    inputs = _inputs()
    recorded = []
    handles = [block.register_forward_hook(lambda m, i, o: recorded.append(o.shape))
               for block in [*toy.input_blocks, toy.middle_block]]
    try:
        toy(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert [shape for shape, _ in ResidualUNet(toy).block_outputs(*inputs)] == recorded


def test_zero_residuals_compute_the_unets_own_forward(toy):
    inputs = _inputs()
    residual_unet = ResidualUNet(toy)
    expected = toy(*inputs)
    assert torch.equal(residual_unet(*inputs, None, residual_unet.zero_residuals(*inputs)), expected)
    assert torch.equal(residual_unet(*inputs), expected)


def test_residuals_are_added_where_controlnet_adds_them(toy):
    inputs = _inputs()
    residual_unet = ResidualUNet(toy)
    residuals = _random_residuals(residual_unet, inputs, seed=1)
    expected = controlled_reference(toy, *inputs, residuals.control, residuals.adapter)
    assert torch.allclose(residual_unet(*inputs, None, residuals), expected, atol=1e-6)
    assert not torch.allclose(expected, toy(*inputs), atol=1e-3)  # the residuals do change the output


def test_one_graph_serves_calls_with_and_without_residuals(toy):
    cache = GraphCache(max_graphs=2)
    lookup = cache.get(toy, "inductor")
    assert lookup.entry.residual_unet is not None
    inputs = _inputs()
    with torch.no_grad():
        plain = lookup.unet(inputs[0], inputs[1], context=inputs[2])  # the webui's call: no residuals
        assert torch.allclose(plain, toy(*inputs), atol=1e-5)
        graphs_after_first_call = compiled_graph_count()
        for seed in (1, 2):  # other control images / weights: other values, same graph
            residuals = _random_residuals(lookup.entry.residual_unet, inputs, seed)
            controlled = lookup.unet(inputs[0], inputs[1], context=inputs[2], residuals=residuals)
            expected = controlled_reference(toy, *inputs, residuals.control, residuals.adapter)
            assert torch.allclose(controlled, expected, atol=1e-5)
        again = lookup.unet(inputs[0], inputs[1], context=inputs[2])  # units off again
        assert compiled_graph_count() == graphs_after_first_call
    assert torch.equal(again, plain)
    assert lookup.entry.recompiles == 0


def test_block_outputs_fall_back_to_an_eager_pass_where_meta_cannot_run(toy, monkeypatch):
    inputs = _inputs()
    meta_shapes = ResidualUNet(toy).block_outputs(*inputs)
    monkeypatch.setattr(toy_ldm, "timestep_embedding", _cpu_only_timestep_embedding)
    assert ResidualUNet(toy).block_outputs(*inputs) == meta_shapes


def _cpu_only_timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Makes its frequencies on the CPU whatever the timesteps' device, which the meta pass cannot run."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32, device="cpu") / (dim // 2))
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_block_outputs_of_an_int8_unet(toy):
    """torchao's int8 weights are tensor subclasses: the shape pass still runs (the graph of int8 jobs)."""
    from compile import CompileOptions
    from compile.graph_cache import binding_for
    from compile.quantization import int8_availability

    if int8_availability("cpu"):
        pytest.skip(int8_availability("cpu"))
    quantized = binding_for(CompileOptions(quantization="int8"), toy).template
    inputs = _inputs()
    assert ResidualUNet(quantized).block_outputs(*inputs) == ResidualUNet(toy).block_outputs(*inputs)


def test_new_sizes_are_counted_with_their_time_and_outlive_eviction(toy):
    """A graph that compiles another size counts it (and its time); the status keeps counting it once the
    graph was evicted."""
    from compile import CompileOptions

    cache = GraphCache(max_graphs=1)
    lookup = cache.get(toy, "inductor", CompileOptions(dynamic=False))
    for size in (16, 24):
        x, timesteps, context = _inputs(size=size)
        lookup.unet(x, timesteps, context=context)
    assert lookup.entry.recompiles == 1 and lookup.entry.recompile_s > 0
    cache.get(toy, "inductor", CompileOptions(dynamic=False, mode="max-autotune-no-cudagraphs"))  # evicts it
    assert cache.status()["recompiles"] == 1
