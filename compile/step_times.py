"""Step times of a compiled graph, measured in the calls it serves, per input shape.

Why: whether a quantized graph is faster than the float one depends on the device (on an H100 int8 ran at
0.73x / 0.48x of float for SD1.5 / SDXL; a newer torchao or another GPU may differ), so the extension measures
it in the user's own jobs instead of promising it. A call on CUDA is timed with CUDA events (the host returns
before the GPU is done, and a CUDA-graph replay is one launch); the events are read later, when they have
completed, so timing never synchronizes the device. Elsewhere a call is timed on the host clock.
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

import torch

KEEP_PER_SHAPE = 32  # recent calls kept per shape (a 20-step job with CFG fills it)
MAX_SHAPES = 8  # shapes kept per graph; the oldest goes first (a graph seldom serves more sizes)


def input_shape(args: tuple, kwargs: dict) -> str:
    """The latent batch's shape ``"2x4x64x64"``: the first tensor argument, which sets a UNet step's cost."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return "x".join(str(size) for size in value.shape)
    return "?"


class StepTimes:
    """Recent call durations of one graph by input shape; :meth:`median_ms` and :meth:`as_dict` read them."""

    def __init__(self) -> None:
        self._ms: "collections.OrderedDict[str, Deque[float]]" = collections.OrderedDict()
        self._pending: List[Tuple[str, Any, Any]] = []  # (shape, start event, end event) not read yet

    def start(self, device: str) -> Any:
        """A token for :meth:`stop`: a recorded CUDA event on a CUDA device, else the host clock."""
        if device.startswith("cuda"):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, token: Any, shape: str) -> None:
        if isinstance(token, float):
            self._add(shape, (time.perf_counter() - token) * 1000.0)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((shape, token, end))
        self._read_completed()

    def _read_completed(self) -> None:
        waiting = []
        for shape, start, end in self._pending:
            if end.query():
                self._add(shape, start.elapsed_time(end))
            else:
                waiting.append((shape, start, end))
        self._pending = waiting[-KEEP_PER_SHAPE * MAX_SHAPES:]

    def _add(self, shape: str, ms: float) -> None:
        if shape not in self._ms:
            if len(self._ms) >= MAX_SHAPES:
                self._ms.popitem(last=False)
            self._ms[shape] = collections.deque(maxlen=KEEP_PER_SHAPE)
        self._ms.move_to_end(shape)
        self._ms[shape].append(ms)

    def median_ms(self, shape: str) -> Optional[float]:
        self._read_completed()
        times = self._ms.get(shape)
        return statistics.median(times) if times else None

    def as_dict(self) -> Dict[str, Dict[str, float]]:
        """``{shape: {"median_ms", "calls"}}`` over the recent calls (for the status route)."""
        self._read_completed()
        return {shape: {"median_ms": round(statistics.median(times), 3), "calls": len(times)}
                for shape, times in self._ms.items() if times}
