"""Faults and odd inputs around a compiled job in the real webui, through its HTTP API: Interrupt and Skip sent
while a graph compiles and while compiled sampling runs, requests the webui answers oddly or at the edges of
what it takes, each sent with and without the script, and the compile cache folder deleted or on a full disk.

These tests use a webui of their own (``faults_webui``, its own data and compile cache folders), so the graphs
they build do not change test_webui_api.py's counts. They run in file order and share its graphs: the tiny UNet
at 64x64 (batch 1), at 72x56 (built while interrupted), at 64x64 batch 8 (built while skipped), at a
~1000-token prompt's context and at 80x64 (after the cache folder was deleted), and tiny_heads' UNet (on the
full disk); everything else reuses those.

How A1111 (v1.10.1) stops a job: ``/sdapi/v1/interrupt`` and ``/sdapi/v1/skip`` only set a flag. The denoiser
checks it before each step (``CFGDenoiser.forward`` raises ``InterruptedException``) and the sampler returns its
last latent, which the webui decodes and answers with HTTP 200 and an image. A UNet call that is running, a
graph compile included, is never stopped mid-way: the compile finishes, that step's result is the image, and the
graph is complete and reused by the next job.
"""

import base64
import contextlib
import io
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from .api_checks import accelerated, assert_accelerated, assert_same_image, onediff_info, with_checkpoint
from .conftest import start_webui
from .webui_server import WebUI

BASE = {"prompt": "a red cube on a table", "negative_prompt": "blurry", "seed": 1234, "steps": 4,
        "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5, "batch_size": 1}
TXT2IMG, IMG2IMG = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
COMPILE_WAIT_S = 600  # until the status route says a graph compiles (a webui busy with other work is slow)
LONG_STEPS = 60  # a compiled job long enough to be stopped while it samples


@pytest.fixture(scope="session")
def faults_webui(tmp_path_factory, webui_python, tiny_checkpoints):
    """The API alone, with its own data and compile cache folders, for this module."""
    yield from start_webui(tmp_path_factory, webui_python, tiny_checkpoints, name="webui-faults-data")


@pytest.fixture(scope="module")
def base_request(faults_webui):
    return with_checkpoint(BASE, faults_webui.checkpoints[0])


@pytest.fixture(scope="module")
def eager_base(faults_webui, base_request):
    """The eager image of ``base_request``, taken before any compiled job ran in this webui."""
    return faults_webui.post_ok(TXT2IMG, base_request)


def compiled_calls(webui):
    return sum(graph["calls"] for graph in webui.status()["graphs"])


def assert_idle(webui):
    status = webui.status()
    assert status["busy"] is False and status["compiling"] is None, (status["busy"], status["compiling"])
    return status


def assert_eager_unet_is_back(webui, request, eager_answer):
    """An eager job gives exactly the eager image of before and runs no compiled graph: nothing of the compiled
    job was left on the model."""
    calls = compiled_calls(webui)
    again = webui.post_ok(TXT2IMG, request)
    assert compiled_calls(webui) == calls, "an eager job ran the compiled graph: the stand-in UNet was left in place"
    assert np.array_equal(WebUI.image(again), WebUI.image(eager_answer)), "the eager image changed"


def assert_plain_compiled_job_works(webui, request, eager_answer):
    assert_idle(webui)
    compiled = webui.post_ok(TXT2IMG, accelerated(request))
    assert_accelerated(compiled)
    assert_same_image(eager_answer, compiled)
    assert_idle(webui)
    assert_eager_unet_is_back(webui, request, eager_answer)


def assert_same_images(eager_answer, compiled_answer):
    assert len(eager_answer["images"]) == len(compiled_answer["images"])
    for image in range(len(eager_answer["images"])):
        assert_same_image({"images": [eager_answer["images"][image]]}, {"images": [compiled_answer["images"][image]]})


def wait_for(predicate, timeout_s, what, thread=None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if thread is not None and not thread.is_alive():
            pytest.fail(f"the job ended before {what}")
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout_s} s")


def send_while(webui, path, body, route, condition, what):
    """Send ``body`` to ``path`` in a thread; once ``condition(webui)`` holds, POST ``route`` (interrupt or skip)
    from this thread. Returns (HTTP status, answer, what ``condition`` returned)."""
    result = {}

    def run():
        try:
            result["answer"] = webui.request(path, body)
        except BaseException as error:  # noqa: BLE001 (reported below)
            result["error"] = error

    thread = threading.Thread(target=run, name="faults-request", daemon=True)
    thread.start()
    seen = wait_for(lambda: condition(webui), COMPILE_WAIT_S, what, thread)
    signal_status, _ = webui.request(route, {})
    assert signal_status == 200, f"{route} answered {signal_status}"
    thread.join(COMPILE_WAIT_S)
    assert not thread.is_alive(), f"the request did not answer after {route}"
    assert "error" not in result, result.get("error")
    status, answer = result["answer"]
    return status, answer, seen


def compiling(webui):
    return webui.status()["compiling"]


def sampling_at_step(step):
    """A condition: the webui's job samples, at ``step`` or later (A1111's progress route)."""

    def condition(webui):
        status, progress = webui.request("/sdapi/v1/progress?skip_current_image=true")
        state = progress["state"] if status == 200 else {}
        return state.get("job", "").startswith("scripts_") and state.get("sampling_step", 0) >= step and state

    return condition


# --- Interrupt and Skip --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route, size", [
    ("/sdapi/v1/interrupt", {"width": 72, "height": 56}),
    ("/sdapi/v1/skip", {"batch_size": 8}),  # a new UNet batch (16) at 64x64: a new graph, as a new size is
], ids=["interrupt", "skip"])
def test_stop_while_the_graph_compiles(faults_webui, base_request, eager_base, route, size):
    """The first compiled job of a new shape is stopped while its graph compiles: the compile cannot be stopped,
    it finishes, the job answers as an interrupted eager job (200, the image of the steps done: here the first
    step's prediction) and the graph is kept and reused by the next job.

    CFG scale 1: A1111 answers a stopped job with the last step's prediction of the *cond* half of the batch
    (``CFGDenoiser``: ``last_latent = get_pred_x0(x_out[cond indexes])``), not the CFG-combined one; at scale 1
    the two are the same, so the stopped job's image equals the eager image of the same request at 1 step."""
    webui = faults_webui
    request = dict(base_request, cfg_scale=1, **size)  # cfg_scale does not change the graph's shapes
    assert_accelerated(webui.post_ok(TXT2IMG, accelerated(base_request)))  # the structure's graph exists
    graphs_before = webui.status()["dynamo_graphs_total"]

    status, answer, seen = send_while(webui, TXT2IMG, accelerated(request), route, compiling,
                                      "compile reported by the status route")
    print(f"\n{route} while compiling: {seen} -> HTTP {status}, info: {onediff_info(answer) if status == 200 else answer}")
    assert status == 200, answer
    assert len(answer["images"]) == request.get("batch_size", 1)
    after = assert_idle(webui)
    assert after["last_job"]["accelerated"] is True, after["last_job"]
    assert after["compiled_call_failures"] == 0 and after["failed_graphs"] == []
    assert after["dynamo_graphs_total"] == graphs_before + 1, "the interrupted compile did not finish its graph"
    # Stopped after its first step: the image is that step's prediction of the final image. Euler's first step
    # from the same noise and sigma is the whole of a 1-step job (at CFG scale 1), so the eager 1-step image is
    # the same image: the compiled first step ran to its end.
    eager_one_step = webui.post_ok(TXT2IMG, dict(request, steps=1))
    assert_same_images(eager_one_step, answer)

    again = webui.post_ok(TXT2IMG, accelerated(request))
    assert_accelerated(again)
    assert webui.status()["last_job"]["new_graphs"] == 0, "the graph built while interrupted was compiled again"
    assert webui.status()["dynamo_graphs_total"] == graphs_before + 1
    assert_same_images(webui.post_ok(TXT2IMG, request), again)
    assert_idle(webui)
    assert_eager_unet_is_back(webui, base_request, eager_base)


@pytest.mark.parametrize("route", ["/sdapi/v1/interrupt", "/sdapi/v1/skip"], ids=["interrupt", "skip"])
def test_stop_while_compiled_sampling_runs(faults_webui, base_request, eager_base, route):
    """A warm compiled job of many steps stopped after a few steps answers as the same eager job stopped alike:
    200 with an image of the steps done (not the full job's image); then everything is as before."""
    webui = faults_webui
    request = dict(base_request, steps=LONG_STEPS)
    full_eager = webui.post_ok(TXT2IMG, request)
    assert_accelerated(webui.post_ok(TXT2IMG, accelerated(base_request)))  # warm: nothing compiles below
    graphs_before = webui.status()["dynamo_graphs_total"]

    answers = {}
    for name, body in (("eager", request), ("compiled", accelerated(request))):
        status, answer, state = send_while(webui, TXT2IMG, body, route, sampling_at_step(2), "sampling step 2")
        print(f"\n{route} {name} at step {state['sampling_step']}/{state['sampling_steps']} -> HTTP {status}")
        answers[name] = (status, answer)
    (eager_status, eager_answer), (status, answer) = answers["eager"], answers["compiled"]
    assert status == eager_status == 200, (eager_status, status, answer)
    assert len(answer["images"]) == len(eager_answer["images"]) == 1
    assert WebUI.image(answer).shape == WebUI.image(eager_answer).shape
    assert_accelerated(answer)
    # the image of a few steps, far from the 60-step image: the stop took effect (in both)
    for stopped in (answer, eager_answer):
        assert np.abs(WebUI.image(stopped) - WebUI.image(full_eager)).mean() > 2, "the job was not stopped"

    after = assert_idle(webui)
    assert after["dynamo_graphs_total"] == graphs_before, "stopping a warm compiled job compiled a graph"
    assert after["compiled_call_failures"] == 0 and after["failed_graphs"] == []
    again = webui.post_ok(TXT2IMG, accelerated(request))
    assert_accelerated(again)
    assert_same_image(full_eager, again)
    assert_idle(webui)
    assert_eager_unet_is_back(webui, base_request, eager_base)


# --- Odd inputs, with and without the script ----------------------------------------------------------------------


def tiny_init_image():
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def img2img(request, strength):
    return dict(request, init_images=[tiny_init_image()], denoising_strength=strength, prompt="a blue sphere", seed=77)


ODD_INPUTS = {
    "72x56": lambda base: (TXT2IMG, dict(base, width=72, height=56)),
    "one_step": lambda base: (TXT2IMG, dict(base, steps=1)),
    "batch_8": lambda base: (TXT2IMG, dict(base, batch_size=8)),
    "long_prompt": lambda base: (TXT2IMG, dict(base, prompt=" ".join(["red cube"] * 500))),  # ~1000 tokens
    "img2img_strength_0": lambda base: (IMG2IMG, img2img(base, 0.0)),
    "img2img_strength_1": lambda base: (IMG2IMG, img2img(base, 1.0)),
    # the webui does not refuse an unknown sampler: get_sampler_and_scheduler falls back to its default sampler
    # (DPM++ 2M) and answers 200; the script must not change that
    "unknown_sampler": lambda base: (TXT2IMG, dict(base, sampler_name="No Such Sampler")),
    "missing_lora": lambda base: (TXT2IMG, dict(base, prompt=BASE["prompt"] + " <lora:does_not_exist:1>")),
}


@pytest.fixture(scope="module")
def img2img_warmed_up(faults_webui, base_request):
    # A1111's first img2img after a model load differs from the next ones (an eager one, also without the script)
    faults_webui.post_ok(IMG2IMG, img2img(base_request, 0.5))


@pytest.mark.parametrize("case", list(ODD_INPUTS))
def test_odd_input_answers_as_without_the_script(faults_webui, base_request, eager_base, img2img_warmed_up, case):
    webui = faults_webui
    path, request = ODD_INPUTS[case](base_request)
    eager_status, eager_answer = webui.request(path, request)
    status, answer = webui.request(path, accelerated(request))
    print(f"\n{case}: HTTP {eager_status} eager, {status} with the script"
          + (f", info: {onediff_info(answer)}" if status == 200 else f": {answer}"))
    assert status == eager_status, (eager_status, eager_answer, status, answer)
    assert status != 500, answer
    if status == 200:
        assert_accelerated(answer)
        assert_same_images(eager_answer, answer)
    status_after = assert_idle(webui)
    assert status_after["compiled_call_failures"] == 0 and status_after["failed_graphs"] == []
    assert_plain_compiled_job_works(webui, base_request, eager_base)


# --- The compile cache folder under the running webui -------------------------------------------------------------


def test_compile_cache_folder_deleted_while_the_webui_runs(faults_webui, base_request, eager_base):
    """The folder removed by hand between jobs: graphs in memory keep running, and a new size compiles into
    the folder made again, whose entry is recorded (a manifest) for the next start."""
    webui = faults_webui
    folder = webui.log_path.parent / "compile-cache"
    assert_accelerated(webui.post_ok(TXT2IMG, accelerated(base_request)))  # the graph exists, and its entry
    assert webui.status()["persistent_cache"]["entries"] >= 1, "no entry to delete: the test would prove nothing"
    shutil.rmtree(folder)

    compiled = webui.post_ok(TXT2IMG, accelerated(base_request))
    assert_accelerated(compiled)
    assert_same_image(eager_base, compiled)
    request = dict(base_request, width=80)  # a new size of the same graph: compiled into the deleted folder
    eager = webui.post_ok(TXT2IMG, request)
    compiled = webui.post_ok(TXT2IMG, accelerated(request))
    info = onediff_info(compiled)
    print(f"\nafter the folder was deleted: {info}")
    assert_accelerated(compiled)
    assert "compiled 1 new size(s)" in info and "compile cache" not in info, info
    assert_same_image(eager, compiled)
    status = assert_idle(webui)
    assert status["persistent_cache"]["entries"] == 1 and status["compiled_call_failures"] == 0
    assert all(graph["cache_problem"] is None for graph in status["graphs"]), status["graphs"]


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last byte (mounting needs root: skipped otherwise), owner-only as the
    compile cache must be."""
    mount_point = tmp_path / "full-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one failed: {mounted.stderr.strip()} "
                    "(tests/compile/test_persistent_cache.py injects the same failure without a mount)")
    try:
        with open(mount_point / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_compile_cache_on_a_full_disk(faults_webui, base_request, full_disk):
    """The cache folder set to a full disk: a new graph compiles without it (torch's own cache folder) and the
    job stays compiled, its info and the status say why; nothing is marked failed."""
    webui = faults_webui
    folder = str(full_disk / "compile-cache")
    assert webui.request("/sdapi/v1/options", {"onediff_cache_dir": folder})[0] == 200
    try:
        request = with_checkpoint(BASE, "tiny_heads")  # another structure: a new graph, opened in the new folder
        eager = webui.post_ok(TXT2IMG, request)
        compiled = webui.post_ok(TXT2IMG, accelerated(request))
        info = onediff_info(compiled)
        print(f"\non a full disk: {info}")
        assert_accelerated(compiled)
        assert "compile cache not used (No space left on device)" in info, info
        assert_same_image(eager, compiled)
        status = assert_idle(webui)
        assert status["compiled_call_failures"] == 0 and status["failed_graphs"] == []
        problems = [graph["cache_problem"] for graph in status["graphs"] if graph["cache_problem"]]
        assert any("No space left on device" in problem for problem in problems), status["graphs"]
        again = webui.post_ok(TXT2IMG, accelerated(request))
        assert "compile cache" not in onediff_info(again) and webui.status()["last_job"]["new_graphs"] == 0
        assert_same_image(eager, again)
    finally:
        webui.request("/sdapi/v1/options", {"onediff_cache_dir": str(webui.log_path.parent / "compile-cache")})
