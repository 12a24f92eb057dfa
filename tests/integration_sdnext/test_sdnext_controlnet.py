"""ControlNet jobs of SD.Next's Control tab (``/sdapi/v1/control``) with the script, in the real SD.Next: the
ControlNet pipeline SD.Next builds around the checkpoint's UNet calls it with the control residuals
(``down_block_additional_residuals``, ``mid_block_additional_residual``), and those calls run compiled. Every
accelerated image is compared with the eager image of the same request (same seed); graphs are counted with the
status route (torch's counter, ``dynamo_graphs_total``).

The jobs run on ``tiny_sd15_control`` with ``tiny_controlnet`` (``tiny_pipelines.py``): a structure of its own,
so its graph and the graphs of ``test_sdnext_script.py`` do not depend on which file runs first. The first
controlled job compiles that structure's graph (with the residuals as inputs); other control images, strengths,
control steps, guess mode and the ControlNet img2img pipeline compile nothing more.
"""

import base64
import io
import re

import numpy as np
import pytest

from integration.api_checks import MAX_LEVEL_DIFF, MAX_MEAN_DIFF, SCRIPT, accelerated, assert_same_image
from integration.webui_server import WebUI

# 64x64, 4 steps, SD.Next's default sampler; the Control tab takes its size as the size "before" resizing.
BASE = {"prompt": "a red cube", "negative_prompt": "blurry", "seed": 1234, "steps": 4, "width_before": 64,
        "height_before": 64, "cfg_scale": 5, "batch_size": 1}
CONTROL_EFFECT = 2  # mean levels by which another control image or strength must change the image


def png_base64(array):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


NOISE = png_base64(np.random.default_rng(0).integers(0, 256, (64, 64, 3)))
SQUARE = png_base64(np.pad(np.full((32, 32, 3), 255), ((16, 16), (16, 16), (0, 0))))
INIT = png_base64(np.concatenate([np.full((64, 32, 3), (200, 60, 40)), np.full((64, 32, 3), (30, 90, 180))], axis=1))


def control_info(answer):
    """The job's "OneDiff: ..." value: the control route answers the infotext as HTML."""
    found = re.search(r"OneDiff: ([^<|]*)", answer["info"])
    return found.group(1).strip() if found else ""


def assert_compiled(answer):
    info = control_info(answer)
    assert info.startswith("inductor"), f"the control job ran eagerly: {info!r}\n{answer['info']}"


@pytest.fixture(scope="module")
def control(sdnext, tiny_models):
    """SD.Next with the control structure loaded (the Control tab builds its ControlNet pipeline around the
    loaded model before a request's override_settings apply), and a function making control requests."""
    names = tiny_models[1]
    sdnext.post_ok("/sdapi/v1/options", {"sd_model_checkpoint": f"Diffusers/{names['control_base']}"})

    def request(image=NOISE, strength=1.0, **unit):
        return dict(BASE, unit_type="controlnet", control=[
            dict(model=names["controlnet"], process="", strength=strength, override=image, **unit)])

    yield request
    sdnext.post_ok("/sdapi/v1/options", {"sd_model_checkpoint": sdnext.checkpoints[0]})


def run_pair(sdnext, request):
    """(eager answer, compiled answer, compiled job's record, dynamo graphs the compiled job added)."""
    eager = sdnext.post_ok("/sdapi/v1/control", request)
    graphs_before = sdnext.status()["dynamo_graphs_total"]
    compiled = sdnext.post_ok("/sdapi/v1/control", accelerated(request))
    status = sdnext.status()
    assert eager["images"] and compiled["images"], f"no image:\n{eager['info']}\n{sdnext.log_tail(30)}"
    assert "Control model: tiny_controlnet" in compiled["info"], compiled["info"]
    return eager, compiled, status["last_job"], status["dynamo_graphs_total"] - graphs_before


def test_script_is_offered_for_control_jobs(sdnext):
    status, scripts = sdnext.request("/sdapi/v1/scripts")
    assert status == 200 and SCRIPT in scripts["control"]


def test_controlnet_job_runs_compiled_same_as_eager(sdnext, control):
    eager, compiled, job, new_graphs = run_pair(sdnext, control())
    assert_compiled(compiled)
    assert_same_image(eager, compiled)
    assert job["accelerated"] and job["graph"].startswith("UNet2DConditionModel:") and job["notices"] == []
    assert new_graphs == job["new_graphs"] <= 1  # this structure's graph, residuals as inputs


def test_other_control_image_strength_and_steps_compile_nothing(sdnext, control):
    first = sdnext.post_ok("/sdapi/v1/control", accelerated(control()))
    changed = [control(SQUARE, 0.5), control(NOISE, 1.5, start=0.25, end=0.75), control(SQUARE, 1.0, guess=True)]
    for request in changed:
        eager, compiled, job, new_graphs = run_pair(sdnext, request)
        assert_compiled(compiled)
        assert new_graphs == 0 and job["new_graphs"] == 0 and job["reused"]
        assert_same_image(eager, compiled)
        effect = np.abs(WebUI.image(first) - WebUI.image(compiled)).mean()
        assert effect > CONTROL_EFFECT, f"the control change moved the compiled image by {effect:.2f} levels only"


def test_img2img_control_job_compiles_nothing(sdnext, control):
    """With an init image SD.Next runs the ControlNet img2img pipeline: it leaves out ``timestep_cond`` and its
    ControlNet returns channels-last residuals (it runs on the VAE's channels-last latents)."""
    request = dict(control(SQUARE, 0.8), init_control=[INIT], input_type=2, denoising_strength=0.6)
    eager, compiled, job, new_graphs = run_pair(sdnext, request)
    assert_compiled(compiled)
    assert new_graphs == 0 and job["new_graphs"] == 0
    # as test_sdnext_script.test_img2img: the tiny VAE encoder amplifies float rounding into a few pixels
    difference = np.abs(WebUI.image(eager) - WebUI.image(compiled))
    assert difference.mean() <= MAX_MEAN_DIFF and np.percentile(difference, 99) <= MAX_LEVEL_DIFF, (
        f"compiled img2img control differs from eager: mean {difference.mean():.3f}, "
        f"p99 {np.percentile(difference, 99)}")
    graph = next(entry for entry in sdnext.status()["graphs"] if entry["signature"] == job["graph"])
    assert graph["recompiles"] == 0  # every control job of this structure ran on its first graph
