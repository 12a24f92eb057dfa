"""Step timing on a CPU: wall time, rounded once, so that the numbers derived from it agree with the report."""

import time

import torch

from onediff_sd_webui_extensions.bench.timing import iterations_per_second, median_ms, peak_memory


def test_step_time_is_reported_as_measured_and_it_s_follows_from_it():
    step_ms = median_ms(lambda: time.sleep(0.0012345), torch.device("cpu"), warmup=0, repeat=3)
    assert step_ms >= 1.2
    # A reader recomputing it/s from the report's step time must get the report's it/s: no hidden digits.
    assert step_ms == round(step_ms, 3)
    assert iterations_per_second(step_ms) == round(1000 / step_ms, 2)


def test_peak_memory_is_none_off_cuda():
    with peak_memory(torch.device("cpu")) as peak:
        torch.ones(1000)
    assert peak == {"mb": None}
