"""The webui-independent half of the A1111 layer: tolerant script_args, job info text, the status JSON."""

import json
import re

import pytest

from onediff_sd_webui_extensions.state import (
    QUANTIZATION_SPEED_FILE,
    JobRecord,
    OneDiffState,
    ScriptArgs,
    ScriptArgsError,
    Settings,
    backend_choices,
    backend_label,
    backend_name,
    graph_label,
    quantization_checkbox,
    read_quantization_speed_file,
    resolved_backend,
)

# What compile.available_backends answers on a machine with inductor only, and on one with OneFlow on CUDA.
INDUCTOR_ONLY = {"inductor": None, "oneflow": "onediff's oneflow backend needs the oneflow package",
                 "nexfort": "onediff's nexfort backend needs the nexfort package"}
WITH_ONEFLOW = dict(INDUCTOR_ONLY, oneflow=None)


@pytest.mark.parametrize(
    "args, expected",
    [
        (None, False), ([], False), ([True], True), ([False], False), (True, True), (["true"], True),
        (["False"], False), ([" on "], True), ([1], True), ([0], False), ([{"0": True}], True),
        ([{"0": "false"}], False), ([True, "more", 3], True),
    ],
)
def test_script_args_are_read_tolerantly(args, expected):
    assert ScriptArgs.parse(args).quantization is expected


@pytest.mark.parametrize("args", [["maybe"], [2], [[1]], [{"0": True, "1": False}], [None]])
def test_unreadable_script_args_name_the_argument_and_the_accepted_forms(args):
    with pytest.raises(ScriptArgsError, match=r"script_args\[0\] \(int8 quantization\) must be a boolean"):
        ScriptArgs.parse(args)


def test_settings_map_to_compile_options():
    assert Settings().compile_options().mode == "auto"  # resolved per device by the graph cache
    assert Settings(compile_mode="default").compile_options().mode is None
    options = Settings(compile_mode="max-autotune-no-cudagraphs", dynamic=True).compile_options("int8")
    assert (options.mode, options.dynamic, options.quantization) == ("max-autotune-no-cudagraphs", True, "int8")
    assert Settings().compile_options() != Settings().compile_options("int8")  # int8 is its own graph


def test_job_info_says_whether_the_job_was_accelerated():
    eager = JobRecord(started=0.0, notices=["--lowvram moves UNet blocks"])
    assert eager.info_text() == "eager (--lowvram moves UNet blocks)"
    fast = JobRecord(started=0.0, accelerated=True, backend="inductor", graph="UNetModel:abc", reused=True,
                     new_graphs=1, notices=["dynamo hit its recompile limit"])
    assert fast.info_text() == "inductor, reused UNetModel:abc, 1 new graph(s), dynamo hit its recompile limit"
    stored = JobRecord(started=0.0, accelerated=True, backend="inductor", graph="UNetModel:abc", reused=False,
                       from_compile_cache=True, quantization="int8-dynamic")
    assert stored.info_text() == "inductor, loaded UNetModel:abc, int8-dynamic quantized"
    built = JobRecord(started=0.0, accelerated=True, backend="inductor", graph="UNetModel:abc", reused=False,
                      compile_s=71.04)
    assert built.info_text() == "inductor, compiled UNetModel:abc in 71.0 s"
    graphed = JobRecord(started=0.0, accelerated=True, backend="inductor", graph="UNetModel:abc", reused=True,
                        cuda_graphs=True)
    assert graphed.info_text() == "inductor, CUDA graphs, reused UNetModel:abc"
    pieces = JobRecord(started=0.0, accelerated=True, backend="inductor", graph="UNetModel:abc", reused=True,
                       graph_breaks=2, attention_replaced="split_cross_attention_forward")
    assert pieces.info_text() == ("inductor, reused UNetModel:abc, 2 graph break(s), "
                                  "sdp attention (for split_cross_attention_forward)")
    new_size = JobRecord(started=0.0, accelerated=True, backend="inductor", graph="UNetModel:abc", reused=True,
                         new_graphs=1, new_size_compile_s=58.04)
    assert new_size.info_text() == "inductor, reused UNetModel:abc, compiled 1 new size(s) in 58.0 s"
    controlled = JobRecord(started=0.0, accelerated=True, backend="inductor", graph="UNetModel:abc", reused=True,
                           control_units=2)
    assert controlled.info_text() == "inductor, reused UNetModel:abc, 2 ControlNet unit(s) compiled"


def test_compile_cache_defaults_to_a_folder_inside_the_extension():
    import os

    from conftest import ROOT

    assert os.path.dirname(Settings().cache_dir) == ROOT
    assert "/compile_cache/" in open(os.path.join(ROOT, ".gitignore")).read()


def test_status_is_json_and_counts_jobs():
    state = OneDiffState()
    job = state.start_job()
    job.accelerated = True
    state.finish_job(job)
    state.finish_job(state.start_job())
    status = json.loads(json.dumps(state.status()))
    assert (status["jobs"], status["accelerated_jobs"], status["eager_jobs"]) == (2, 1, 1)
    assert status["backends_available"]["inductor"] is True
    assert status["graphs"] == [] and status["compiles"] == 0


MEASURED = {"scheme": "int8-dynamic", "shape": "2x4x64x64", "float_ms": 27.8, "quantized_ms": 38.0,
            "speedup": 0.732, "weight_share": 0.86, "measured": "2026-11-22"}


def test_quantization_checkbox_promises_speed_only_where_it_was_measured_faster():
    missing = quantization_checkbox("int8", installed=False, measured=None, device="CPU")
    assert missing["interactive"] is False and "torchao is not installed" in missing["info"]
    unmeasured = quantization_checkbox("int8", installed=True, measured=None, device="CPU")
    assert unmeasured["label"] == "Model Quantization (int8): smaller weights" and "not measured" in unmeasured["info"]
    slower = quantization_checkbox("int8", installed=True, measured=MEASURED, device="NVIDIA H100 80GB HBM3")
    assert "Speed Up" not in slower["label"] and "not faster here" in slower["label"]
    assert "0.73x" in slower["info"] and "int8-dynamic" in slower["info"] and "86%" in slower["info"]
    faster = quantization_checkbox("fp8", installed=True, measured=dict(MEASURED, speedup=1.31), device="GPU")
    assert faster["label"] == "Model Quantization (fp8) Speed Up" and "1.31x" in faster["info"]


def test_finished_job_saves_the_measured_quantization_speed_per_device(tmp_path, monkeypatch):
    state = OneDiffState()
    state.apply_settings(Settings(cache_dir=str(tmp_path)))
    comparison = {key: value for key, value in MEASURED.items() if key != "measured"}
    monkeypatch.setattr(state.cache, "quantization_speed", lambda: [dict(comparison, device="cpu")])
    state.finish_job(JobRecord(started=0.0, accelerated=True))
    saved = json.loads((tmp_path / QUANTIZATION_SPEED_FILE).read_text())
    assert saved["CPU"]["speedup"] == 0.732 and saved["CPU"]["measured"]
    assert read_quantization_speed_file(str(tmp_path / "absent.json")) == {}


def test_the_backend_dropdown_marks_what_cannot_run_and_says_what_auto_is():
    choices = backend_choices(INDUCTOR_ONLY)
    assert choices == ["auto (inductor here)", "inductor",
                       "oneflow (not available: onediff's oneflow backend needs the oneflow package)",
                       "nexfort (not available: onediff's nexfort backend needs the nexfort package)"]
    assert backend_choices(WITH_ONEFLOW)[0] == "auto (oneflow here)"
    assert backend_label("auto", {name: "missing" for name in INDUCTOR_ONLY}) == "auto (no backend can run here)"
    assert backend_label("tensorrt", INDUCTOR_ONLY).startswith("tensorrt (not available: unknown backend")


@pytest.mark.parametrize("value, name", [
    ("auto (inductor here)", "auto"), ("oneflow (not available: onediff's oneflow backend needs it)", "oneflow"),
    ("inductor", "inductor"), ("Nexfort", "nexfort"), ("", "auto"), (None, "auto"),
])
def test_a_stored_dropdown_entry_or_a_plain_name_reads_as_the_backend(value, name):
    assert backend_name(value) == name
    assert all(backend_name(choice) == plain for choice, plain in
               zip(backend_choices(INDUCTOR_ONLY), ["auto", "inductor", "oneflow", "nexfort"]))


def test_the_resolved_backend_is_what_a_job_compiles_with():
    assert resolved_backend("auto", INDUCTOR_ONLY) == "inductor"
    assert resolved_backend("auto", WITH_ONEFLOW) == "oneflow"
    assert resolved_backend("oneflow", INDUCTOR_ONLY) is None
    assert resolved_backend("inductor", INDUCTOR_ONLY) == "inductor"


def test_an_unavailable_backend_keeps_the_info_line_short():
    job = JobRecord(started=0.0, notices=["backend oneflow not available"],
                    details=["compile backend 'oneflow' is not available: ... To use it, install OneFlow ..."])
    assert job.info_text() == "eager (backend oneflow not available)"


def test_the_status_line_says_what_runs_now_and_what_ran_last():
    state = OneDiffState()
    assert state.summary(INDUCTOR_ONLY) == "OneDiff: backend auto (inductor here), 0 graph(s) cached. No job yet."
    job = state.start_job()
    assert state.summary(INDUCTOR_ONLY).endswith("0 graph(s) cached. Job running...")  # not the last job's info
    with state.compile_progress.watch("UNet", "2x4x64x64", lambda text: None):
        compiling = r"Job compiling the UNet graph for 512x512 \(UNet batch 2\), \d+ s\.\.\.$"
        assert re.search(compiling, state.summary(INDUCTOR_ONLY))
        status = state.status()
        assert status["busy"] and status["compiling"]["size"] == "512x512 (UNet batch 2)"
    job.accelerated, job.backend, job.graph, job.reused, job.compile_s = True, "inductor", "UNetModel:abc", False, 61.2
    state.finish_job(job)
    assert state.summary(INDUCTOR_ONLY).endswith("Last job: inductor, compiled UNetModel:abc in 61.2 s.")
    state.apply_settings(Settings(backend="oneflow", cache_dir=""))
    assert state.summary(INDUCTOR_ONLY).startswith(
        "OneDiff: backend oneflow (not available: onediff's oneflow backend needs the oneflow package)")
    status = state.status()
    assert not status["busy"] and status["compiling"] is None and status["summary"].startswith("OneDiff: backend")


def test_a_changed_cache_folder_is_used_from_then_on(tmp_path):
    state = OneDiffState()
    state.apply_settings(Settings(cache_dir=str(tmp_path / "first")))
    first = state.cache.persistent
    assert first.folder == str(tmp_path / "first")
    state.apply_settings(Settings(cache_dir=str(tmp_path / "first"), max_graphs=3))
    assert state.cache.persistent is first  # unchanged folder: the same cache object
    state.apply_settings(Settings(cache_dir=str(tmp_path / "second")))
    assert state.compile_cache_text() == f"Compile cache: 0 graph(s), 0.0 MB in {tmp_path / 'second'}"
    state.apply_settings(Settings(cache_dir=""))
    assert state.cache.persistent is None and state.compile_cache_text() == "Compile cache: off (no folder set)."


def test_cached_graphs_are_labelled_by_what_tells_them_apart(tiny_sd15, tiny_sd15_int8):
    """The float and the int8 graph of one UNet share the structure's signature; the label tells them apart by
    scheme, and names the image sizes compiled (64x64 latents here: 512x512 images)."""
    float_label, int8_label = graph_label(tiny_sd15.lookup.entry), graph_label(tiny_sd15_int8.lookup.entry)
    signature = tiny_sd15.lookup.entry.signature.short()
    assert tiny_sd15_int8.lookup.entry.signature.short() == signature
    latent = tiny_sd15.inputs.sample.shape[-1]
    assert float_label.startswith(f"{signature} float default {latent * 8}x{latent * 8}")
    assert int8_label.startswith(f"{signature} int8-") and f" default {latent * 8}x{latent * 8}" in int8_label


def test_a_call_expected_to_compile_shows_its_progress_and_one_served_before_does_not(tiny_sd15):
    state, shown = OneDiffState(), []
    entry, inputs = tiny_sd15.lookup.entry, tiny_sd15.inputs
    kwargs = {"encoder_hidden_states": inputs.encoder_hidden_states}
    with state.watch_compile(entry, (inputs.sample, inputs.timestep), kwargs, shown.append):
        pass
    assert shown == []
    batch_of_7 = inputs.sample.repeat(7, 1, 1, 1)
    with state.watch_compile(entry, (batch_of_7, inputs.timestep), kwargs, shown.append):  # not called: no compile
        pass
    latent = inputs.sample.shape[-1]
    assert shown == [f"OneDiff: compiling the UNet graph for {latent * 8}x{latent * 8} (UNet batch 14), 0 s", None]
