"""The bench's ``--compare``: eager and every compile mode that runs on the device, timed in one run.

On CUDA that is inductor's default mode (the extension's behaviour before CUDA graphs) and ``reduce-overhead``
(CUDA graphs, the ``auto`` default there); on a CPU only the default mode, since CUDA graphs need CUDA: the
report says so instead of showing a number. Each mode compiles its own graph in a cache of its own, so the
bench's main graph is not evicted.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from compile import CUDA_GRAPHS_MODE, CompileOptions, GraphCache

from .timing import iterations_per_second, median_ms, progress

COMPARED_MODES = (None, CUDA_GRAPHS_MODE)


def mode_name(mode: Optional[str]) -> str:
    return mode or "default"


def _timing(step_ms: float, compile_s: Optional[float]) -> Dict[str, Any]:
    return {"step_ms": step_ms, "it_s": iterations_per_second(step_ms),
            "compile_s": None if compile_s is None else round(compile_s, 2)}


def compare_modes(unet: torch.nn.Module, inputs, backend: str, device: torch.device,
                  measured: Dict[str, Tuple[float, Optional[float]]], *, warmup: int, repeat: int
                  ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
    """(``{mode name: {step_ms, it_s, compile_s}}``, ``{mode name: why it was not run}``). ``measured`` holds
    what the bench already timed (``"eager"`` and its own mode: (step ms, compile s or None)); the other
    modes of :data:`COMPARED_MODES` are compiled and timed here."""
    timings = {name: _timing(step_ms, compile_s) for name, (step_ms, compile_s) in measured.items()}
    skipped = {}
    for mode in COMPARED_MODES:
        name = mode_name(mode)
        if name in timings:
            continue
        if mode == CUDA_GRAPHS_MODE and device.type != "cuda":
            skipped[name] = "CUDA graphs need a CUDA device"
            continue
        lookup = GraphCache(max_graphs=1).get(unet, backend, CompileOptions(mode=mode))
        with progress(f"compiling with {backend}, mode {name} (for --compare)"):
            inputs.call(lookup.unet)
        step_ms = median_ms(lambda: inputs.call(lookup.unet), device, warmup, repeat)
        timings[name] = _timing(step_ms, lookup.entry.compile_s)
    return timings, skipped
