"""The bench CLI as a user runs it, in its own process, reading back its JSON report."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_bench_cli_writes_the_documented_report(tmp_path):
    report_path = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "onediff_sd_webui_extensions", "bench", "--warmup", "1", "--repeat", "2",
         "--compare", "--json", str(report_path)],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "speed-up" in completed.stdout and "compiling with inductor" in completed.stderr
    report = json.loads(report_path.read_text())
    assert report["model"] == "preset:tiny" and report["backend"] == "inductor" and report["device"] == "cpu"
    assert report["eager_ms"] > 0 and report["compiled_ms"] > 0 and report["compile_s"] > 0
    assert abs(report["speedup"] - report["eager_ms"] / report["compiled_ms"]) < 0.01
    for name in ("eager", "compiled"):  # every timing with its spread
        spread = report[f"{name}_spread_ms"]
        assert spread["min"] <= spread["p25"] <= spread["median"] == report[f"{name}_ms"] <= spread["p75"] <= spread["max"]
    low, high = report["speedup_range"]
    assert low <= report["speedup"] <= high
    assert report["noisy"] is None or report["noisy"].startswith("noisy: ")
    assert report["first_call"] in ("compile", "compile, kernels from inductor's cache; --cold for a cold compile")
    assert f"first call ({report['first_call']})" in completed.stdout
    assert report["mode"] == "default"  # auto is CUDA graphs on CUDA only
    assert report["it_s"] == round(1000 / report["compiled_ms"], 2)
    assert report["peak_memory_mb"] == {"eager": None, "compiled": None}  # torch counts device memory on CUDA only
    # --compare on a CPU: the modes that run here, from this run's own measurements; CUDA graphs said, not faked
    assert report["compare"]["eager"] == {"step_ms": report["eager_ms"], "it_s": report["eager_it_s"], "compile_s": None}
    assert report["compare"]["default"]["step_ms"] == report["compiled_ms"]
    assert report["compare_skipped"] == {"reduce-overhead": "CUDA graphs need a CUDA device"}
    assert report["max_abs_diff"] <= 1e-4
    same = report["switch"]["same_structure"]
    assert same["reused"] is True and same["new_graphs"] == 0 and same["max_abs_diff"] <= 1e-4
    assert report["switch"]["other_structure"] == {"reused": False}
    lora = report["lora"]
    assert lora["new_graphs"] == 0 and lora["restored_exactly"] is True and lora["max_abs_diff"] <= 1e-4
    replaced = report["replaced_weights"]  # LoRA as SD.Next applies it: new Parameters, found and rebound
    assert replaced["tensors_found"] == replaced["layers"] > 0 and replaced["new_graphs"] == 0
    assert replaced["restored_exactly"] is True and replaced["max_abs_diff"] <= 1e-4
    assert replaced["quick_check_ms"] > 0 and replaced["rebind_ms"] > 0


def test_bench_rejects_a_missing_checkpoint_clearly(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "onediff_sd_webui_extensions", "bench", "--checkpoint", str(tmp_path / "x.safetensors")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 2
    assert "bench: error: --checkpoint: checkpoint not found" in completed.stderr
    assert "Traceback" not in completed.stderr
