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


class _FakeCudaEvent:
    """Stands in for ``torch.cuda.Event``: each (start, end) pair reports the next of ``GPU_MS`` as its time."""

    GPU_MS = iter(())

    def __init__(self, enable_timing=False):
        assert enable_timing, "an event without timing cannot measure"
        self.recorded = False

    def record(self):
        self.recorded = True

    def synchronize(self):
        assert self.recorded

    def elapsed_time(self, end):
        assert self.recorded and end.recorded
        return next(self.GPU_MS)


def test_on_cuda_steps_are_timed_by_cuda_events_not_wall_time(monkeypatch):
    synchronized = []
    monkeypatch.setattr(_FakeCudaEvent, "GPU_MS", iter([5.0, 1.0, 3.0]))
    monkeypatch.setattr(torch.cuda, "Event", _FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronized.append)
    cuda = torch.device("cuda")
    # The call takes 30 ms of wall time; the GPU's own time (the events) is what counts.
    assert median_ms(lambda: time.sleep(0.03), cuda, warmup=1, repeat=3) == 3.0
    assert synchronized == [cuda]  # warm-up work finished before the first event


def test_on_cuda_peak_memory_is_reset_before_and_read_after_the_block(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 1536 * 2**20)
    with peak_memory(torch.device("cuda")) as peak:
        calls.append("block")
    assert calls == ["sync", "reset", "block", "sync"] and peak == {"mb": 1536.0}


def test_timings_carry_their_spread_and_a_noisy_speedup_is_flagged():
    from onediff_sd_webui_extensions.bench.timing import Timing, speedup_noise

    steady = Timing.of([10.0, 10.1, 10.2, 10.1, 10.0])
    assert (steady.min, steady.median, steady.max) == (10.0, 10.1, 10.2) and steady.p25 <= steady.p75
    clear = speedup_noise(steady, Timing.of([5.0, 5.1, 5.0, 5.05, 5.1]))
    assert clear["noisy"] is None and clear["speedup_range"][0] > 1.9
    overlapping = speedup_noise(steady, Timing.of([9.5, 10.0, 10.5, 10.1, 9.9]))
    assert overlapping["noisy"] == "noisy: the speed-up's range includes 1.0; rerun, with more --repeat"
    busy = speedup_noise(steady, Timing.of([2.0, 5.0, 9.0, 3.0, 7.0]))
    assert busy["noisy"] == "noisy: step times vary by more than 25% (the machine is busy); rerun"
