"""ControlNet and T2I-Adapter units in compiled jobs, in the real webui with the real sd-webui-controlnet
(v1.1.455): every compiled image is compared with the eager image of the same request, and graphs are counted
with the status route (torch's own counters).

Runs with ``WEBUI_DIR`` and ``CONTROLNET_DIR`` (plus ``CONTROLNET_PYTHON``, a webui venv with ControlNet's
requirements); skipped with the reason otherwise. The models are tiny and built by the session
(tiny_control_models.py): a T2I-Adapter on a 4-level tiny SD1 UNet, and a ControlNet, which the extension
always builds at SD1.5 widths, on a UNet of those widths. The tests share one webui and run in file order.
"""

import base64
import io

import numpy as np
import pytest

from .api_checks import accelerated, assert_accelerated, assert_same_image, onediff_info, with_checkpoint
from .webui_server import WebUI

BASE = {"prompt": "a red cube on a table", "negative_prompt": "blurry", "seed": 1234, "steps": 4,
        "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5, "batch_size": 1}
# a unit changes the tiny models' images by 9 (adapter) to 24 (ControlNet) levels on average: far above the
# compiled-vs-eager tolerance, so an image without the unit's residuals cannot pass for one with them
MIN_UNIT_EFFECT = 3.0


def _png(pattern: str, size: int = 64) -> str:
    from PIL import Image

    ramp = np.arange(size)
    y, x = np.meshgrid(ramp, ramp, indexing="ij")
    if pattern == "stripes":
        pixels = np.stack([(x // 8) % 2, ((x // 16) + (y // 16)) % 2, (x + y) / (2 * size)], -1)
    else:
        pixels = np.stack([(y // 8) % 2, (x // 32) % 2, 1 - (x + y) / (2 * size)], -1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype("uint8")).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unit(model, image="stripes", **overrides):
    return {"enabled": True, "image": _png(image), "module": "none", "model": model, "weight": 1.0,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "Balanced", "resize_mode": "Just Resize",
            "processor_res": 64, "pixel_perfect": False, **overrides}


def with_units(request, *units):
    return dict(request, alwayson_scripts={"controlnet": {"args": list(units)}})


@pytest.fixture(scope="module")
def server(webui_with_controlnet):
    return webui_with_controlnet


@pytest.fixture(scope="module")
def models(tiny_control_models):
    return tiny_control_models[1]


def _compare(server, request, path="/sdapi/v1/txt2img"):
    """The eager and the compiled answer of ``request``, the compiled one checked to run compiled."""
    eager = server.post_ok(path, request)
    compiled = server.post_ok(path, accelerated(request))
    assert_accelerated(compiled)
    assert_same_image(eager, compiled)
    return eager, compiled


def _effect(answer, other):
    return np.abs(WebUI.image(answer) - WebUI.image(other)).mean()


def test_controlnet_is_checked_at_start_up(server):
    assert server.status()["controlnet"]["extension"] == "v1.1.455: units run compiled"


def test_adapter_unit_runs_on_the_plain_graph_like_eager(server, models):
    adapter, checkpoint = models["t2i_adapter"]["model"], models["t2i_adapter"]["checkpoints"][0]
    plain = with_checkpoint(BASE, checkpoint)
    plain_eager, _ = _compare(server, plain)  # compiles the checkpoint's graph
    graphs = server.status()["dynamo_graphs_total"]

    eager, compiled = _compare(server, with_units(plain, unit(adapter)))
    assert _effect(eager, plain_eager) > MIN_UNIT_EFFECT, "the adapter did not change the image"
    assert "1 ControlNet unit(s) compiled" in onediff_info(compiled)
    status = server.status()
    assert status["dynamo_graphs_total"] == graphs, "a job with a unit compiled another graph"
    assert status["last_job"]["new_graphs"] == 0
    assert status["controlnet"]["compiled_jobs"] >= 1


@pytest.mark.parametrize("change", [
    {"image": "checks"},
    {"weight": 0.5},
    {"guidance_start": 0.25, "guidance_end": 0.75},
    {"control_mode": "ControlNet is more important"},
    {"control_mode": "My prompt is more important"},
    {"resize_mode": "Crop and Resize"},
], ids=lambda change: "-".join(change))
def test_unit_changes_compile_nothing(server, models, change):
    adapter, checkpoint = models["t2i_adapter"]["model"], models["t2i_adapter"]["checkpoints"][0]
    before = server.status()["dynamo_graphs_total"]
    overrides = dict(change, image=change.get("image", "stripes"))
    _compare(server, with_units(with_checkpoint(BASE, checkpoint), unit(adapter, **overrides)))
    assert server.status()["dynamo_graphs_total"] == before


def test_two_units_at_once(server, models):
    adapter, checkpoint = models["t2i_adapter"]["model"], models["t2i_adapter"]["checkpoints"][0]
    before = server.status()["dynamo_graphs_total"]
    request = with_units(with_checkpoint(BASE, checkpoint), unit(adapter), unit(adapter, image="checks", weight=0.6))
    _, compiled = _compare(server, request)
    assert "2 ControlNet unit(s) compiled" in onediff_info(compiled)
    assert server.status()["dynamo_graphs_total"] == before


def test_nothing_of_a_unit_sticks_to_the_next_job(server, models):
    adapter, checkpoint = models["t2i_adapter"]["model"], models["t2i_adapter"]["checkpoints"][0]
    plain = with_checkpoint(BASE, checkpoint)
    server.post_ok("/sdapi/v1/txt2img", accelerated(with_units(plain, unit(adapter))))
    eager, compiled = _compare(server, plain)
    assert "ControlNet" not in onediff_info(compiled)
    with_unit = server.post_ok("/sdapi/v1/txt2img", with_units(plain, unit(adapter)))
    assert _effect(with_unit, compiled) > MIN_UNIT_EFFECT


def test_a_checkpoint_of_the_same_structure_with_a_unit(server, models):
    adapter, other = models["t2i_adapter"]["model"], models["t2i_adapter"]["checkpoints"][1]
    before = server.status()
    _compare(server, with_units(with_checkpoint(BASE, other), unit(adapter)))
    after = server.status()
    assert after["dynamo_graphs_total"] == before["dynamo_graphs_total"]
    assert after["last_job"]["reused"] is True


def test_img2img_with_a_unit(server, models):
    adapter, checkpoint = models["t2i_adapter"]["model"], models["t2i_adapter"]["checkpoints"][0]
    request = with_units(dict(with_checkpoint(BASE, checkpoint), init_images=[_png("checks")],
                              denoising_strength=0.75), unit(adapter))
    server.post_ok("/sdapi/v1/img2img", request)  # A1111's first img2img after a reload differs from the next
    before = server.status()["dynamo_graphs_total"]
    _compare(server, request, "/sdapi/v1/img2img")
    assert server.status()["dynamo_graphs_total"] == before


def test_hires_fix_with_a_unit(server, models):
    adapter, checkpoint = models["t2i_adapter"]["model"], models["t2i_adapter"]["checkpoints"][0]
    request = with_units(dict(with_checkpoint(BASE, checkpoint), enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                              hr_second_pass_steps=2, denoising_strength=0.6), unit(adapter))
    _compare(server, request)  # the second size compiles once
    before = server.status()["dynamo_graphs_total"]
    _compare(server, with_units(request, unit(adapter, image="checks", weight=0.7)))
    assert server.status()["dynamo_graphs_total"] == before


def test_a_unit_that_patches_attention_runs_eagerly_with_the_reason(server, models):
    checkpoint = models["t2i_adapter"]["checkpoints"][0]
    before = server.status()["controlnet"]["eager_jobs"]
    request = with_units(with_checkpoint(BASE, checkpoint), unit("None", module="reference_only"))
    eager = server.post_ok("/sdapi/v1/txt2img", request)
    compiled = server.post_ok("/sdapi/v1/txt2img", accelerated(request))
    info = onediff_info(compiled)
    assert info.startswith("eager (ControlNet AttentionInjection units"), info
    assert_same_image(eager, compiled)
    status = server.status()
    assert status["controlnet"]["eager_jobs"] == before + 1
    assert any("AttentionInjection" in reason for reason in status["controlnet"]["eager_reasons"])


def test_controlnet_unit_on_an_sd15_width_unet(server, models):
    controlnet, checkpoint = models["controlnet"]["model"], models["controlnet"]["checkpoints"][0]
    plain = with_checkpoint(BASE, checkpoint)
    plain_eager, _ = _compare(server, plain)  # compiles the SD1.5-width graph
    eager, compiled = _compare(server, with_units(plain, unit(controlnet)))  # compiles the ControlNet network
    assert _effect(eager, plain_eager) > MIN_UNIT_EFFECT, "the ControlNet did not change the image"
    assert "1 control network(s) compiled" in onediff_info(compiled)
    status = server.status()
    assert len(status["controlnet"]["control_network_graphs"]) == 1
    assert status["last_job"]["new_graphs"] == 1  # the network's graph; the UNet's is the plain one
    before = status["dynamo_graphs_total"]
    _compare(server, with_units(plain, unit(controlnet, image="checks", weight=0.5), unit(controlnet, weight=0.4)))
    _compare(server, with_units(plain, unit(controlnet, guidance_end=0.5)))
    assert server.status()["dynamo_graphs_total"] == before
