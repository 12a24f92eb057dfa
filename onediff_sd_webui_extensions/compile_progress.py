"""What the webui's progress bar says while a compiled graph is being built.

The first call of a new graph (or of a new image size) compiles for about a minute, inside the first sampling
step, before the sampler reports any progress: the webui's bar would stay empty and grey. While such a call
runs, a small background ticker writes a line such as "OneDiff: compiling the UNet graph for 512x512 (UNet batch 2),
23 s (last compile took 61 s)" through a callback (the webui's ``shared.state.textinfo``, which its progress bar
shows), once a second. Nothing here imports the webui.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional

LATENT_SCALE = 8  # pixels per latent cell in every ldm/sgm model the webui runs (A1111's opt_f)

Show = Callable[[Optional[str]], None]  # sets the progress text; None clears it


def image_size(latent_shape: str) -> str:
    """``"2x4x64x96"`` (batch, channels, height, width of the latent) -> ``"768x512"`` (image width x height)."""
    sizes = latent_shape.split("x")
    if len(sizes) != 4:
        return latent_shape
    height, width = (int(size) * LATENT_SCALE for size in sizes[2:])
    return f"{width}x{height}"


def call_size(latent_shape: str) -> str:
    """``"2x4x64x64"`` -> ``"512x512 (UNet batch 2)"``: what one compile is for. The UNet's batch, not the
    job's: with CFG the webui runs the prompt and the negative prompt in one call, 2 per image."""
    batch = latent_shape.split("x")[0]
    return f"{image_size(latent_shape)} (UNet batch {batch})" if batch.isdigit() else latent_shape


@dataclasses.dataclass
class Compile:
    """One graph being built now."""

    what: str  # e.g. "UNet", "int8-dynamic UNet"
    shape: str  # the latent batch's shape
    verb: str  # "compiling", or "loading" from the compile cache
    started: float
    last_s: Optional[float]  # how long the last such build took, when known

    def describe(self, now: float) -> str:
        """E.g. "compiling the UNet graph for 512x512 (UNet batch 2), 23 s (last compile took 61 s)"."""
        last = f" (last {'load' if self.verb == 'loading' else 'compile'} took {self.last_s:.0f} s)" \
            if self.last_s is not None else ""
        return f"{self.verb} the {self.what} graph for {call_size(self.shape)}, {now - self.started:.0f} s{last}"

    def text(self, now: float) -> str:
        """The progress bar's line."""
        return f"OneDiff: {self.describe(now)}"

    def as_dict(self, now: float) -> Dict[str, Any]:
        return {"what": self.what, "size": call_size(self.shape), "verb": self.verb,
                "elapsed_s": round(now - self.started, 1), "last_s": self.last_s, "text": self.text(now)}


class CompileProgress:
    """The build running now (:meth:`current`, for the status route) and how long earlier builds took.

    The last duration is kept per kind of graph and verb; a kind not built yet in this process falls back to
    ``expected_s`` (the compile cache's record of that graph), then to the last build of any graph.
    """

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self.last_s: Dict[tuple, float] = {}  # (verb, what) -> seconds
        self.last_any_s: Dict[str, float] = {}  # verb -> seconds of the last build of any graph
        self._current: Optional[Compile] = None

    def current(self) -> Optional[Compile]:
        return self._current

    @contextlib.contextmanager
    def watch(self, what: str, shape: str, show: Show, verb: str = "compiling",
              expected_s: Optional[float] = None) -> Iterator[Compile]:
        """Around a call that builds a graph: show its progress text now and every ``interval_s`` until the
        call returns, then clear it and remember how long it took (not when the call raised)."""
        last_s = self.last_s.get((verb, what), expected_s if expected_s is not None else self.last_any_s.get(verb))
        build = Compile(what, shape, verb, self.clock(), last_s)
        self._current = build
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.interval_s):
                show(build.text(self.clock()))

        show(build.text(build.started))
        ticker = threading.Thread(target=tick, name="onediff-compile-progress", daemon=True)
        ticker.start()
        try:
            yield build
            seconds = self.clock() - build.started  # not reached when the call raised
            self.last_s[(verb, what)] = seconds
            self.last_any_s[verb] = seconds
        finally:
            stop.set()
            ticker.join()
            self._current = None
            show(None)
