"""The progress bar's text while a graph is built: shown at once, ticking, cleared after, durations remembered."""

import threading

import pytest

from onediff_sd_webui_extensions.compile_progress import CompileProgress, call_size, image_size


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Shown:
    """The progress texts a watch showed, in order; ``arrived`` is set once one contains ``awaited``."""

    def __init__(self, awaited=None):
        self.texts = []
        self.awaited = awaited
        self.arrived = threading.Event()

    def __call__(self, text):
        self.texts.append(text)
        if self.awaited and text and self.awaited in text:
            self.arrived.set()


def test_latent_shapes_read_as_image_sizes():
    assert image_size("2x4x64x96") == "768x512"  # width x height, 8 pixels per latent cell
    assert call_size("2x4x64x64") == "512x512 (UNet batch 2)"
    assert image_size("?") == "?" and call_size("?") == "?"


def test_the_text_shows_at_once_ticks_while_the_call_runs_and_clears_after():
    clock, shown = Clock(), Shown(awaited="23 s")
    progress = CompileProgress(interval_s=0.01, clock=clock)
    with progress.watch("UNet", "2x4x64x64", shown):
        assert shown.texts == ["OneDiff: compiling the UNet graph for 512x512 (UNet batch 2), 0 s"]
        clock.now += 23
        assert shown.arrived.wait(5)  # the ticker showed the new elapsed time by itself
        assert progress.current().as_dict(clock())["elapsed_s"] == 23
        assert progress.current().text(clock()) == "OneDiff: compiling the UNet graph for 512x512 (UNet batch 2), 23 s"
    assert shown.texts[-1] is None and "23 s" in shown.texts[-2]
    assert progress.current() is None


def test_the_last_duration_is_per_kind_of_graph_then_the_cache_record_then_any_graph():
    clock = Clock()
    progress = CompileProgress(interval_s=60, clock=clock)
    with progress.watch("UNet", "2x4x64x64", Shown()):
        clock.now += 61
    with progress.watch("UNet", "2x4x96x64", Shown()) as build:
        assert build.text(clock()).endswith("(last compile took 61 s)")
    with progress.watch("int8-dynamic UNet", "2x4x64x64", Shown(), expected_s=42.0) as build:
        assert build.last_s == 42.0  # the compile cache's record of this graph
    with progress.watch("int8-weight-only UNet", "2x4x64x64", Shown()) as build:
        assert build.last_s == 0  # the last build of any graph (the one just above took 0 s on this clock)
    with progress.watch("UNet", "2x4x64x64", Shown(), verb="loading") as build:
        assert build.last_s is None  # a load is not a compile: nothing to compare with yet
        assert build.text(clock()) == "OneDiff: loading the UNet graph for 512x512 (UNet batch 2), 0 s"


def test_a_call_that_raises_clears_the_text_and_leaves_no_duration():
    shown = Shown()
    progress = CompileProgress(interval_s=60, clock=Clock())
    with pytest.raises(RuntimeError):
        with progress.watch("UNet", "2x4x64x64", shown):
            raise RuntimeError("compile failed")
    assert shown.texts[-1] is None and progress.current() is None
    assert progress.last_s == {} and progress.last_any_s == {}
