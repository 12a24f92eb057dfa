"""UNetRouter: a diffusers UNet's calls go to the shared compiled graph, with weights the host replaced (SD.Next's
LoRA assigns new Parameters) written into the graph's storage first; eager output on the same inputs is the
reference, graphs are counted with torch's counters."""

import pytest
import torch

from compile import count_new_graphs
from compile.models import build_preset
from onediff_sd_webui_extensions.state import JobRecord
from onediff_sd_webui_extensions.sdnext.unet_router import UNetRouter

TOLERANCE = 1e-4  # fp32


def attention_projections(unet):
    return [module for name, module in unet.named_modules() if name.endswith(("to_q", "to_k", "to_v"))]


def apply_lora_as_sdnext_does(unet, scale=0.05, seed=3):
    """``module.weight = Parameter(W + dW)`` on every attention projection; returns the replaced weights
    (SD.Next's fuse mode restores from W + dW - dW, its backup mode from a copy: either way new Parameters)."""
    generator = torch.Generator().manual_seed(seed)
    originals = []
    for layer in attention_projections(unet):
        originals.append(layer.weight.detach().clone())
        delta = torch.randn(layer.weight.shape, generator=generator) * scale
        layer.weight = torch.nn.Parameter(layer.weight.detach() + delta, requires_grad=False)
    return originals


def remove_lora_as_sdnext_does(unet, originals):
    for layer, weight in zip(attention_projections(unet), originals):
        layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)


def eager(unet, inputs):
    """The UNet's own computation, whatever its forward is routed to."""
    kwargs = {"encoder_hidden_states": inputs.encoder_hidden_states, "return_dict": False}
    return type(unet).forward(unet, inputs.sample, inputs.timestep, **kwargs)[0]


@pytest.fixture
def routed(graph_cache, tiny_sd15):
    """A second checkpoint of the tiny structure, served by the session's graph, its forward routed."""
    unet = build_preset("tiny", seed=21)
    job = JobRecord(started=0.0, accelerated=True)
    router = UNetRouter(unet, graph_cache.get(unet, "inductor"), job)
    router.install()
    yield unet, router, job
    router.remove()
    graph_cache.get(tiny_sd15.unet, "inductor")  # the session's fixture UNet back into the shared graph


def test_calls_go_to_the_compiled_graph_and_match_eager(routed, tiny_sd15):
    unet, router, _ = routed
    with count_new_graphs() as counted:
        output = tiny_sd15.inputs.call(unet)
    assert router.compiled_calls == 1 and router.eager_calls == 0 and counted.new_graphs == 0
    assert (output - eager(unet, tiny_sd15.inputs)).abs().max().item() <= TOLERANCE


def test_channels_last_latents_are_served_by_the_same_graph(routed, tiny_sd15):
    """SD.Next's img2img latents arrive channels-last; dynamo would compile another graph for the strides."""
    unet, router, _ = routed
    inputs = tiny_sd15.inputs
    channels_last = inputs.sample.to(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    with count_new_graphs() as counted:
        output = unet(channels_last, inputs.timestep, encoder_hidden_states=inputs.encoder_hidden_states,
                      return_dict=False)[0]
    assert counted.new_graphs == 0 and router.compiled_calls == 1
    assert (output - eager(unet, inputs)).abs().max().item() <= TOLERANCE


def test_replaced_parameters_reach_the_graph_and_removal_restores_exactly(routed, tiny_sd15):
    unet, router, job = routed
    inputs = tiny_sd15.inputs
    before = tiny_sd15.inputs.call(unet)
    captured = router.lookup.entry.module
    captured_before = {name: t.clone() for name, t in captured.state_dict().items()}

    with count_new_graphs() as counted:
        originals = apply_lora_as_sdnext_does(unet)
        with_lora = inputs.call(unet)
        expected = eager(unet, inputs)
        remove_lora_as_sdnext_does(unet, originals)
        after = inputs.call(unet)

    assert counted.new_graphs == 0 and router.eager_calls == 0
    assert (with_lora - expected).abs().max().item() <= TOLERANCE
    assert (with_lora - before).abs().max().item() > 100 * TOLERANCE  # the LoRA really reached the graph
    assert torch.equal(after, before)
    for name, tensor in captured.state_dict().items():  # the graph's storage holds the original weights again
        assert torch.equal(tensor, captured_before[name]), name
    assert any("written into the graph" in notice for notice in job.notices)


def test_a_structure_change_finishes_the_job_eagerly_with_the_reason(routed, tiny_sd15):
    unet, router, job = routed
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    original = block.to_q
    block.to_q = torch.nn.Sequential(original)  # what an unfused diffusers/peft LoRA does to a layer
    try:
        output = tiny_sd15.inputs.call(unet)
        assert torch.equal(output, eager(unet, tiny_sd15.inputs))
        assert router.eager_calls == 1 and not job.accelerated
        assert "structure changed" in job.info_text() and "to_q" in job.info_text()
    finally:
        block.to_q = original


def test_remove_gives_the_unet_its_own_forward_back(graph_cache, tiny_sd15):
    unet = build_preset("tiny", seed=22)
    router = UNetRouter(unet, graph_cache.get(unet, "inductor"), JobRecord(started=0.0))
    router.install()
    with pytest.raises(RuntimeError, match="already replaced"):
        UNetRouter(unet, router.lookup, JobRecord(started=0.0)).install()
    router.remove()
    graph_cache.get(tiny_sd15.unet, "inductor")
    assert "forward" not in vars(unet)
    assert torch.equal(tiny_sd15.inputs.call(unet), eager(unet, tiny_sd15.inputs))


def test_control_calls_get_one_kwargs_set_and_one_layout():
    """diffusers' pipelines pass None for some optional arguments and leave them out in others, and an img2img
    ControlNet returns channels-last residuals: the compiled call sees one keyword set and the default layout
    (dynamo guards on both), while the pipeline's own kwargs stay as they were for an eager retry."""
    from onediff_sd_webui_extensions.sdnext.unet_router import graph_call_kwargs, optional_kwargs

    unet = build_preset("tiny", seed=0)
    optional = optional_kwargs(unet)
    assert {"timestep_cond", "down_block_additional_residuals", "mid_block_additional_residual"} <= optional
    assert "encoder_hidden_states" not in optional  # required: never dropped
    residual = torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last)
    adapter = [torch.randn(1, 8, 4, 4)]
    kwargs = {"encoder_hidden_states": torch.randn(1, 7, 8), "timestep_cond": None, "return_dict": False,
              "mid_block_additional_residual": residual, "down_intrablock_additional_residuals": adapter}
    graph_kwargs = graph_call_kwargs(kwargs, optional)
    assert "timestep_cond" not in graph_kwargs and graph_kwargs["return_dict"] is False
    assert graph_kwargs["mid_block_additional_residual"].is_contiguous()
    assert torch.equal(graph_kwargs["mid_block_additional_residual"], residual)
    assert graph_kwargs["down_intrablock_additional_residuals"] is not adapter  # the UNet pops from its list
    graph_kwargs["down_intrablock_additional_residuals"].pop()
    assert len(adapter) == 1 and kwargs["timestep_cond"] is None and kwargs["mid_block_additional_residual"] is residual
