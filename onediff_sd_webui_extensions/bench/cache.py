"""Bench section "cache": does a second process with the same ``--cache-dir`` load the graph instead of compiling?

For the bench: :func:`add_cache_argument` adds ``--cache-dir``, :func:`graph_cache_for` gives the graph cache
backed by that folder, and :func:`cache_section` turns the compiled entry into the report's section; run the
bench twice with the same folder and the second report says ``"cache": {"hit": true, "compile_s": ...}``.
``python -m onediff_sd_webui_extensions.bench.cache --cache-dir DIR`` does the same for one preset on its own
(compile or load, first call, compare with eager) and prints the section as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, Optional

import torch

from compile import GraphCache, GraphEntry, PersistentCache, count_new_graphs
from compile.models import PRESETS, build_preset, example_inputs


def add_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", metavar="DIR", default=None,
        help="persistent compile cache folder; a second run with the same folder loads instead of compiling",
    )


def graph_cache_for(cache_dir: Optional[str], max_graphs: int = 2) -> GraphCache:
    """The bench's graph cache, backed by the persistent cache in ``cache_dir`` when one is given."""
    return GraphCache(max_graphs=max_graphs, persistent=PersistentCache(cache_dir) if cache_dir else None)


def cache_section(entry: GraphEntry) -> Dict[str, Any]:
    """``{"hit", "compile_s"}`` for an entry after its first call (plus ``"problem"`` when an entry was refused)."""
    if entry.stored is None:
        raise ValueError("the graph cache has no persistent cache (no --cache-dir)")
    if entry.compile_s is None:
        raise ValueError("the compiled graph has not been called yet")
    section: Dict[str, Any] = {"hit": bool(entry.cache_hit), "compile_s": round(entry.compile_s, 3)}
    if entry.cache_problem:
        section["problem"] = entry.cache_problem
    return section


def run(cache_dir: str, preset: str = "tiny", seed: int = 0, backend: str = "inductor") -> Dict[str, Any]:
    """Build ``preset`` with weights from ``seed``, get its graph through the persistent cache, call it once and
    compare with eager on the same weights (a graph from the cache must use the current weights)."""
    torch.set_grad_enabled(False)
    unet = build_preset(preset, seed=seed)
    inputs = example_inputs(unet)
    eager = inputs.call(unet)
    cache = graph_cache_for(cache_dir)
    lookup = cache.get(unet, backend)
    print(f"  {lookup.summary()}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with count_new_graphs() as counted:
        compiled = inputs.call(lookup.unet)
    first_call_s = time.perf_counter() - start
    return {
        "cache": cache_section(lookup.entry),
        "preset": preset,
        "seed": seed,
        "first_call_s": round(first_call_s, 3),
        "graphs": counted.new_graphs,
        "max_abs_diff": (compiled - eager).abs().max().item(),
        "cache_bytes": cache.persistent.size_bytes(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onediff_sd_webui_extensions.bench.cache")
    add_cache_argument(parser)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0, help="weights of the UNet (same structure for any seed)")
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args(argv)
    if not args.cache_dir:
        parser.error("--cache-dir is required")
    print(json.dumps(run(args.cache_dir, args.preset, args.seed, args.backend)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
