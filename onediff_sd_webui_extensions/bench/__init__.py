"""``python -m onediff_sd_webui_extensions bench``: what compilation buys, measured, without a webui.

It builds a UNet (a deterministic random-weight preset, or the UNet of an A1111 ``.safetensors`` checkpoint),
times eager and compiled denoising calls on the same inputs, checks that they agree, and then switches to a
second model of the same structure (served by the cached graph, weights written in place: no new graph) and to
one of another structure (a 9-channel inpainting variant: never served by that graph).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Dict

import torch

from compile import AUTO_MODE, BackendUnavailable, CompileOptions, count_new_graphs, resolve_backend, resolve_mode
from compile.models import PRESET_LATENT, PRESETS, build_preset, build_unet, example_inputs, load_checkpoint_unet

from .arguments import DTYPES, DEVICES, MODES, BenchArgumentError, resolve_dtype, validate
from .cache import add_cache_argument, cache_section, graph_cache_for
from .compare import compare_modes, mode_name
from .timing import Timing, iterations_per_second, measure_ms, peak_memory, progress, speedup_noise


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _perturbed_copy(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A new module object of the same structure with other weights (stands in for a second checkpoint)."""
    import copy

    other = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype)
            parameter.add_(noise * 0.02)
    return other


def _webui_unets(args: argparse.Namespace, dtype, device):
    """The webui's own UNet class for the preset (ldm's or sgm's, from ``--repositories``): the model, a second
    of the same structure, a 9-channel one, their inputs and a name."""
    from compile.webui_unets import WEBUI_UNETS, build_webui_unet, webui_unet_inputs

    def build(seed, **overrides):
        with contextlib.redirect_stdout(sys.stderr):  # sgm prints every block it constructs
            return build_webui_unet(args.preset, args.repositories, seed=seed, dtype=dtype, device=device, **overrides)

    unet = build(0)
    inputs = webui_unet_inputs(unet, batch=args.batch, latent=args.latent or PRESET_LATENT[args.preset])
    package = WEBUI_UNETS[args.preset][0]
    return unet, build(1), build(2, in_channels=9), inputs, f"webui {package} UNetModel:{args.preset} (SDP attention)"


def inductor_cache_hits() -> int:
    """Graphs inductor loaded from its own on-disk cache so far in this process (torch's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"])


def first_call_source(entry, inductor_hits: int, cold: bool) -> str:
    """What the first compiled call did: compiled cold, loaded from ``--cache-dir``, or compiled with code that
    inductor found in its own cache (a second run: much faster than a cold compile)."""
    if cold:
        return "compile, cold: caches off"
    if entry.cache_hit:
        return "loaded from --cache-dir"
    if inductor_hits:
        return "compile, kernels from inductor's cache; --cold for a cold compile"
    return "compile"


def run_bench(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device.type)
    backend = resolve_backend(args.backend)
    mode = resolve_mode(args.mode, device)
    options = CompileOptions(mode=mode)
    torch.set_grad_enabled(False)

    if args.repositories:
        unet, second, other, inputs, model_name = _webui_unets(args, dtype, device)
        latent = inputs.sample.shape[-1]
    elif args.checkpoint:
        unet, model_name = load_checkpoint_unet(args.checkpoint, dtype=dtype, device=device)
        second = _perturbed_copy(unet, seed=1)
        latent = args.latent or 64
        other = build_unet(dict(unet.config, in_channels=9), seed=2, dtype=dtype, device=device)
    else:
        model_name = f"preset:{args.preset}"
        unet = build_preset(args.preset, seed=0, dtype=dtype, device=device)
        second = build_preset(args.preset, seed=1, dtype=dtype, device=device)
        other = build_preset(args.preset, seed=2, dtype=dtype, device=device, in_channels=9)
        latent = args.latent or PRESET_LATENT[args.preset]
    if not args.repositories:
        inputs = example_inputs(unet, batch=args.batch, latent=latent)
    print(f"model {model_name} on {device} ({dtype}), backend {backend}, mode {mode_name(mode)}, batch {args.batch}, "
          f"latent {latent}", file=sys.stderr)

    with peak_memory(device) as eager_peak:
        eager = measure_ms(lambda: inputs.call(unet), device, args.warmup, args.repeat)
    eager_ms = eager.median
    eager_output = inputs.call(unet)

    cache = graph_cache_for(args.cache_dir)
    lookup = cache.get(unet, backend, options)
    if args.cold:
        torch._inductor.config.force_disable_caches = True  # neither inductor's own nor a persistent cache is read
    inductor_hits = inductor_cache_hits()
    with peak_memory(device) as compiled_peak:
        with progress(f"first compiled call: compiling with {backend}, or loading from a cache"):
            compiled_output = inputs.call(lookup.unet)
        compiled = measure_ms(lambda: inputs.call(lookup.unet), device, args.warmup, args.repeat)
    compiled_ms = compiled.median
    compile_s = lookup.entry.compile_s
    first_call = first_call_source(lookup.entry, inductor_cache_hits() - inductor_hits, args.cold)
    cache_report = cache_section(lookup.entry) if args.cache_dir else None
    compare = None
    if args.compare:
        compare = compare_modes(unet, inputs, backend, device, warmup=args.warmup, repeat=args.repeat,
                                measured={"eager": (eager_ms, None), mode_name(mode): (compiled_ms, compile_s)})
    lora = replaced = None
    if args.lora:
        from .lora import lora_section

        with progress("LoRA: fuse, switch, unfuse into the compiled graph", every_s=30.0):
            lora = lora_section(lookup.entry.module, lookup.unet, inputs)
        from .weight_watch import replaced_weights_section

        with progress("LoRA as SD.Next applies it: new Parameters, rebound into the graph", every_s=30.0):
            replaced = replaced_weights_section(unet, lookup, inputs)
    control = None
    if args.controlnet:
        from .control import diffusers_section, webui_unet_section

        with progress("ControlNet: a unit's residuals into the compiled graph", every_s=30.0):
            if args.repositories:
                control = webui_unet_section(unet, lookup, inputs, device, args.warmup, args.repeat)
            else:
                control = diffusers_section(unet, lookup, inputs, cache, backend, options, device, args.warmup,
                                            args.repeat)
    quant = None
    if args.quant != "none":
        from .quant import quant_section

        quant = quant_section(unet, second, inputs, backend, compiled_ms, options=options,
                              warmup=args.warmup, repeat=args.repeat, request=args.quant)

    # Checkpoint switch: the second model's weights go into the captured storage; eager reference first,
    # because binding points the second model's parameters at that storage.
    second_eager = inputs.call(second)
    with count_new_graphs() as switch_graphs:
        switched = cache.get(second, backend, options)
        second_compiled = inputs.call(switched.unet)
    refused = cache.get(other, backend, options)  # lazily compiled: never called here

    report = {
        "model": model_name,
        "backend": backend,
        "mode": mode_name(mode),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "speedup": round(eager_ms / compiled_ms, 3),
        **speedup_noise(eager, compiled),
        "eager_spread_ms": eager.as_dict(),
        "compiled_spread_ms": compiled.as_dict(),
        "it_s": iterations_per_second(compiled_ms),
        "eager_it_s": iterations_per_second(eager_ms),
        "peak_memory_mb": {"eager": eager_peak["mb"], "compiled": compiled_peak["mb"]},
        "compile_s": round(compile_s, 2),
        "first_call": first_call,
        "max_abs_diff": _max_abs_diff(compiled_output, eager_output),
        "switch": {
            "same_structure": {
                "reused": switched.reused,
                "new_graphs": switch_graphs.new_graphs,
                "bind_ms": round(switched.bind_ms, 3),
                "max_abs_diff": _max_abs_diff(second_compiled, second_eager),
            },
            "other_structure": {"reused": refused.reused},
        },
    }
    if compare is not None:
        report["compare"], report["compare_skipped"] = compare
    if cache_report is not None:
        report["cache"] = cache_report
    if lora is not None:
        report["lora"] = lora
        report["replaced_weights"] = replaced
    if control is not None:
        report["controlnet"] = control
    if quant is not None:
        report["quant"] = quant
    return report


def format_table(report: Dict[str, Any]) -> str:
    same = report["switch"]["same_structure"]
    rows = [
        ("model", report["model"]),
        ("device / dtype", f"{report['device']} / {report['dtype']}  (torch {report['torch']})"),
        ("backend / mode", f"{report['backend']} / {report['mode']}"),
        ("eager step", f"{Timing(**report['eager_spread_ms']).text()}, {report['eager_it_s']:.1f} it/s"),
        ("compiled step", f"{Timing(**report['compiled_spread_ms']).text()}, {report['it_s']:.1f} it/s"),
        ("speed-up", f"{report['speedup']:.2f}x (range {report['speedup_range'][0]:.2f}-{report['speedup_range'][1]:.2f}x)"
                     + (f"  {report['noisy']}" if report["noisy"] else "")),
        (f"first call ({report['first_call']})", f"{report['compile_s']:.1f} s"),
        ("compiled vs eager", f"max abs diff {report['max_abs_diff']:.2e}"),
        ("switch, same structure", f"reused={same['reused']}, new graphs {same['new_graphs']}, "
                                   f"bind {same['bind_ms']:.1f} ms, max abs diff {same['max_abs_diff']:.2e}"),
        ("switch, other structure", f"reused={report['switch']['other_structure']['reused']} "
                                    "(9-channel inpainting UNet gets its own graph)"),
    ]
    peak = report["peak_memory_mb"]
    if peak["compiled"] is not None:
        rows.append(("peak device memory", f"eager {peak['eager']:.0f} MB, compiled {peak['compiled']:.0f} MB"))
    for name, timing in report.get("compare", {}).items():
        compiled = "" if timing["compile_s"] is None else f", compile {timing['compile_s']:.1f} s"
        rows.append((f"compare: {name}", f"{timing['step_ms']:.2f} ms ({timing['it_s']:.1f} it/s){compiled}"))
    for name, why in report.get("compare_skipped", {}).items():
        rows.append((f"compare: {name}", f"not run: {why}"))
    if "lora" in report:
        lora = report["lora"]
        rows += [
            (f"LoRA rank {lora['rank']} x {lora['modules']} modules",
             f"fuse {lora['fuse_ms']:.1f} ms, switch {lora['switch_ms']:.1f} ms, unfuse {lora['unfuse_ms']:.1f} ms"),
            ("LoRA under the graph", f"new graphs {lora['new_graphs']}, max abs diff vs eager {lora['max_abs_diff']:.2e}, "
                                     f"restored exactly={lora['restored_exactly']}"),
        ]
    if "replaced_weights" in report:
        from .weight_watch import format_rows

        rows += format_rows(report["replaced_weights"])
    if "controlnet" in report:
        from .control import format_rows as control_rows

        rows += control_rows(report["controlnet"])
    if "cache" in report:
        cache = report["cache"]
        rows.append(("compile cache", ("hit: loaded" if cache["hit"] else "miss: compiled and stored")
                     + f" in {cache['compile_s']:.1f} s" + (f" ({cache['problem']})" if "problem" in cache else "")))
    quant = report.get("quant")
    if quant and "unavailable" in quant:
        rows.append(("quantization", f"not available: {quant['unavailable']}"))
    elif quant:
        scheme = quant["scheme"]
        rows += [
            (f"{scheme} compiled step", f"{quant['step_ms']:.2f} ms ({quant['speedup_vs_float_compiled']:.2f}x vs "
                                        f"float compiled), max rel err {quant['max_rel_err']:.4f}, "
                                        f"compile {quant['compile_s']:.1f} s"),
            (f"{scheme} weights", f"{quant['weight_mb_float']:.1f} MB float -> {quant['weight_mb_int8']:.1f} MB"),
            (f"{scheme} LoRA / switch", f"new graphs {quant['lora_new_graphs']} / {quant['switch_new_graphs']}, "
                                        f"LoRA max rel err {quant['lora_max_rel_err']:.4f}"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="random-weight UNet to build (default: tiny, compiles in about a minute on a CPU)")
    source.add_argument("--checkpoint", help="an A1111 .safetensors checkpoint to take the UNet from (offline)")
    parser.add_argument("--repositories", metavar="DIR",
                        help="time the webui's own UNet class for --preset (ldm's for tiny/sd15, sgm's for "
                             "tiny-sdxl/sdxl; random weights, SDP attention) from DIR, a webui's repositories/ "
                             "folder; needs einops; with --no-lora")
    parser.add_argument("--backend", default="auto", help="auto, inductor, oneflow or nexfort (default: auto)")
    parser.add_argument("--mode", default=AUTO_MODE,
                        help=f"torch.compile mode, one of {', '.join(MODES)} (auto: CUDA graphs, i.e. reduce-overhead, on CUDA; "
                             "default elsewhere)")
    parser.add_argument("--compare", action="store_true",
                        help="also time every compile mode that runs on the device (default and, on CUDA, "
                             "reduce-overhead) in this run, side by side with eager")
    parser.add_argument("--device", default="auto", help=f"{', '.join(DEVICES)} (default auto: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    parser.add_argument("--latent", type=int, default=None, help="latent size (image size / 8)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                        help="fuse a rank-16 LoRA into the compiled graph and time it (default: on)")
    parser.add_argument("--controlnet", action=argparse.BooleanOptionalAction, default=False,
                        help="also time a step with a ControlNet unit, eager and compiled, and count the graphs "
                             "compiled when its image, strength or model change (default: off)")
    parser.add_argument("--quant", default="none", choices=["none", "int8", "fp8"],
                        help="also compile a quantized (torchao) graph and compare it with float: int8 (dynamic "
                             "where the device runs int8 matmuls, else weight-only) or fp8 (CUDA compute "
                             "capability >= 8.9) (default: none)")
    add_cache_argument(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--cold", action="store_true",
                        help="compile with torch's caches off, to time a cold compile (a second run otherwise "
                             "reuses inductor's on-disk cache)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also with ONEDIFF_DEBUG=1)")


def main(args: argparse.Namespace) -> int:
    """Run the bench: 2 for arguments it cannot run with, 1 for a failure while running, each said in one line
    (``--debug`` or ``ONEDIFF_DEBUG=1`` re-raise it with its traceback)."""
    debug = args.debug or os.environ.get("ONEDIFF_DEBUG", "") not in ("", "0")
    try:
        validate(args)
        report = run_bench(args)
    except (BenchArgumentError, BackendUnavailable) as error:
        if debug:
            raise
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 (one line for the user; --debug has the traceback)
        if debug:
            raise
        print(f"bench: error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
