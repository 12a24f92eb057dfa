"""Step timing and memory for the bench: CUDA events on CUDA, wall time elsewhere.

On a GPU whose host CPU is slow, wall time around a call measures the launches as much as the kernels; CUDA
events measure the GPU's own time between the start and the end of a call. Every number is a median.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Step times of one measurement in ms: the median and the spread of the calls around it."""

    median: float
    p25: float
    p75: float
    min: float
    max: float

    @classmethod
    def of(cls, times_ms: List[float]) -> "Timing":
        ordered = sorted(times_ms)
        quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
        return cls(*(round(value, 3) for value in (statistics.median(ordered), quartiles[0], quartiles[2],
                                                   ordered[0], ordered[-1])))

    @property
    def relative_spread(self) -> float:
        """The middle half of the calls' width against the median."""
        return (self.p75 - self.p25) / self.median if self.median else 0.0

    def as_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        return f"{self.median:.2f} ms (middle half {self.p25:.2f}-{self.p75:.2f}, all {self.min:.2f}-{self.max:.2f})"


# the middle half of a measurement's calls spread wider than this share of its median: the machine was busy
NOISY_SPREAD = 0.25


def speedup_noise(eager: Timing, compiled: Timing) -> Dict[str, Any]:
    """The speed-up's range from the two spreads (eager's quartiles over compiled's) and, when it cannot be
    trusted, why: the range includes 1.0, or either measurement is spread wider than :data:`NOISY_SPREAD`."""
    low, high = round(eager.p25 / compiled.p75, 3), round(eager.p75 / compiled.p25, 3)
    noisy = None
    if max(eager.relative_spread, compiled.relative_spread) > NOISY_SPREAD:
        noisy = "noisy: step times vary by more than 25% (the machine is busy); rerun"
    elif low <= 1.0 <= high:
        noisy = "noisy: the speed-up's range includes 1.0; rerun, with more --repeat"
    return {"speedup_range": [low, high], "noisy": noisy}


def measure_ms(call: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> Timing:
    """Times of ``call`` in ms after ``warmup`` untimed calls: CUDA events on CUDA, else wall time.

    Rounded here, to the microsecond (about the resolution of CUDA events), and nowhere else: it/s and speed-ups
    are derived from the numbers the report shows, so a reader recomputing them from the report gets the same
    values."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(max(1, repeat)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            call()
            times.append((time.perf_counter() - start_s) * 1000.0)
    return Timing.of(times)


def median_ms(call: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> float:
    """The median of :func:`measure_ms`."""
    return measure_ms(call, device, warmup, repeat).median


def iterations_per_second(step_ms: float) -> float:
    return round(1000.0 / step_ms, 2)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """``with peak_memory(device) as peak: ...`` then ``peak["mb"]``: the most device memory allocated during the
    block (None off CUDA, where torch keeps no such counter)."""
    result: dict = {"mb": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        if device.type == "cuda":
            synchronize(device)
            result["mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


@contextlib.contextmanager
def progress(label: str, every_s: float = 5.0) -> Iterator[None]:
    """Print '<label> ... N s' every few seconds while the block runs (compiles are long and silent)."""
    done = threading.Event()
    start = time.perf_counter()

    def report() -> None:
        while not done.wait(every_s):
            print(f"  {label} ... {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    print(f"  {label} ...", file=sys.stderr, flush=True)
    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
