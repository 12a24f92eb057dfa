"""Step timing and memory for the bench: CUDA events on CUDA, wall time elsewhere.

On a GPU whose host CPU is slow, wall time around a call measures the launches as much as the kernels; CUDA
events measure the GPU's own time between the start and the end of a call. Every number is a median.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import threading
import time
from typing import Any, Callable, Iterator

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(call: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> float:
    """Median time of ``call`` in ms after ``warmup`` untimed calls: CUDA events on CUDA, else wall time.

    Rounded here, to the microsecond (about the resolution of CUDA events), and nowhere else: it/s and speed-ups
    are derived from the number the report shows, so a reader recomputing them from the report gets the same
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
    return round(statistics.median(times), 3)


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
