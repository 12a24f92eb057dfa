"""Step times measured in the calls a graph serves: per shape, recent calls only, CUDA events read without
synchronizing (the CUDA branch runs here with stand-in events)."""

import torch

from compile import step_times
from compile.step_times import StepTimes, input_shape


def test_host_clock_times_each_call_under_its_input_shape():
    times = StepTimes()
    for _ in range(3):
        token = times.start("cpu")
        torch.randn(256, 256) @ torch.randn(256, 256)
        times.stop(token, "2x4x8x8")
    times.stop(times.start("cpu"), "2x4x16x16")
    recorded = times.as_dict()
    assert recorded["2x4x8x8"]["calls"] == 3 and recorded["2x4x8x8"]["median_ms"] > 0
    assert recorded["2x4x16x16"]["calls"] == 1
    assert times.median_ms("1x4x8x8") is None


def test_only_recent_calls_and_shapes_are_kept(monkeypatch):
    monkeypatch.setattr(step_times, "MAX_SHAPES", 2)
    times = StepTimes()
    for index in range(step_times.KEEP_PER_SHAPE + 5):
        times._add("a", float(index))
    times._add("b", 1.0)
    times._add("c", 1.0)  # a third shape pushes out the least recently used one
    assert set(times.as_dict()) == {"b", "c"}
    times._add("b", 3.0)
    assert times.as_dict()["b"]["calls"] == 2


class FakeEvent:
    """torch.cuda.Event's timing surface: record() stamps a fake GPU clock; query() says whether it ran."""

    clock = 0.0
    finished = True

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = FakeEvent.clock

    def query(self):
        return FakeEvent.finished

    def elapsed_time(self, end):
        return end.at - self.at

    def synchronize(self):
        raise AssertionError("timing must not wait for the GPU")


def test_cuda_calls_are_timed_with_events_read_once_they_have_completed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    times = StepTimes()
    FakeEvent.finished, FakeEvent.clock = False, 0.0
    token = times.start("cuda:0")
    FakeEvent.clock = 7.5
    times.stop(token, "2x4x64x64")
    assert times.as_dict() == {}  # still running on the GPU: not read, not waited for
    FakeEvent.finished = True
    assert times.as_dict() == {"2x4x64x64": {"median_ms": 7.5, "calls": 1}}


def test_input_shape_is_the_first_tensor_argument():
    assert input_shape((torch.zeros(2, 4, 8, 8), torch.zeros(2)), {}) == "2x4x8x8"
    assert input_shape((), {"sample": torch.zeros(1, 4, 16, 16)}) == "1x4x16x16"
    assert input_shape((3,), {}) == "?"


def test_a_compiled_graph_records_each_step_under_its_latent_shape(tiny_sd15, monkeypatch):
    entry = tiny_sd15.lookup.entry
    monkeypatch.setattr(entry, "step_times", StepTimes())  # the session's graph, with a fresh record
    for _ in range(3):
        tiny_sd15.inputs.call(tiny_sd15.compiled)
    shape = "x".join(str(size) for size in tiny_sd15.inputs.sample.shape)
    assert entry.step_times.as_dict()[shape]["calls"] == 3
    assert entry.describe()["step_ms"] == entry.step_times.as_dict()
