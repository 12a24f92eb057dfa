"""``--compare`` compiles and times the modes the bench did not measure itself, each in a graph of its own."""

import torch

from onediff_sd_webui_extensions.bench.compare import compare_modes


def test_compare_times_the_missing_modes_and_says_why_others_cannot_run(tiny_sd15):
    timings, skipped = compare_modes(tiny_sd15.unet, tiny_sd15.inputs, "inductor", torch.device("cpu"),
                                     measured={"eager": (20.0, None)}, warmup=0, repeat=1)
    assert timings["eager"] == {"step_ms": 20.0, "it_s": 50.0, "compile_s": None}
    default = timings["default"]
    assert default["step_ms"] > 0 and default["compile_s"] > 0 and default["it_s"] == round(1000 / default["step_ms"], 2)
    assert skipped == {"reduce-overhead": "CUDA graphs need a CUDA device"}
