"""The webui's own UNet classes (ldm, sgm) through the graph cache, for the bench's --repositories. Their source is
the webui's: these tests run when WEBUI_DIR points at a webui checkout with its repositories/ folder."""

import os

import pytest

from compile import count_new_graphs, graph_break_count


@pytest.fixture(scope="module")
def repositories():
    webui = os.environ.get("WEBUI_DIR")
    if not webui:
        pytest.skip("WEBUI_DIR is not set: the webui's ldm/sgm UNet source comes from its repositories/ folder")
    pytest.importorskip("einops")
    return os.path.join(webui, "repositories")


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_webui_unet_compiles_whole_and_switches_without_recompiling(graph_cache, repositories, preset):
    from compile.webui_unets import build_webui_unet, webui_unet_inputs

    unet, second = build_webui_unet(preset, repositories, seed=0), build_webui_unet(preset, repositories, seed=1)
    inputs = webui_unet_inputs(unet, latent=16)
    eager, second_eager = inputs.call(unet), inputs.call(second)
    breaks = graph_break_count()
    compiled = inputs.call(graph_cache.get(unet, "inductor").unet)
    assert graph_break_count() == breaks, "the SDP attention must trace into one graph"
    assert (compiled - eager).abs().max().item() <= 1e-4
    with count_new_graphs() as counted:
        switched = inputs.call(graph_cache.get(second, "inductor").unet)
    assert counted.new_graphs == 0 and (switched - second_eager).abs().max().item() <= 1e-4
    assert (second_eager - eager).abs().max().item() > 1e-2  # the second model's weights really differ


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_webui_unet_takes_control_residuals_in_the_same_graph(graph_cache, repositories, preset):
    """ldm's and sgm's UNets run as compile.control.ResidualUNet: zeros give the class's own forward, and
    ControlNet-shaped residuals (SDXL: adapter slots after input blocks 3, 5, 8 and the middle block) change
    values, not the graph."""
    import torch

    from compile.control import Residuals
    from compile.webui_unets import build_webui_unet, webui_unet_inputs

    unet = build_webui_unet(preset, repositories, seed=0)
    inputs = webui_unet_inputs(unet, latent=16)
    lookup = graph_cache.get(unet, "inductor")
    residual_unet = lookup.entry.residual_unet
    slots = (3, 5, 8) if preset == "tiny-sdxl" else (2, 5, 8, 11)
    assert residual_unet.adapter_blocks == tuple(index for index in slots if index < len(unet.input_blocks))
    args, extra = (inputs.sample, inputs.timestep, inputs.context, inputs.y), {"context": inputs.context, "y": inputs.y}
    assert (residual_unet(*args) - inputs.call(unet)).abs().max().item() <= 1e-5
    zeros = residual_unet.zero_residuals(*args)
    generator = torch.Generator().manual_seed(3)
    residuals = Residuals([torch.randn(z.shape, generator=generator) * 0.1 for z in zeros.control],
                          [torch.randn(z.shape, generator=generator) * 0.1 for z in zeros.adapter])
    inputs.call(lookup.unet)  # compiled (or reused) without residuals first
    with count_new_graphs() as counted:
        compiled = lookup.unet(inputs.sample, inputs.timestep, **extra, residuals=residuals)
        lookup.unet(inputs.sample, inputs.timestep, **extra)
    eager = residual_unet(*args, residuals)
    assert counted.new_graphs == 0
    assert (compiled - eager).abs().max().item() <= 1e-4
    assert (eager - inputs.call(unet)).abs().max().item() > 1e-3
