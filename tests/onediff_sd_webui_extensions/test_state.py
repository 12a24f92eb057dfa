"""The webui-independent half of the A1111 layer: tolerant script_args, job info text, the status JSON."""

import json

import pytest

from onediff_sd_webui_extensions.state import (
    QUANTIZATION_SPEED_FILE,
    JobRecord,
    OneDiffState,
    ScriptArgs,
    ScriptArgsError,
    Settings,
    quantization_checkbox,
    read_quantization_speed_file,
)


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
