"""Everything the webui side of the extension remembers, in one object.

The txt2img and img2img tabs each create their own ``Script`` instance, but there is one UNet in memory and one
set of compiled graphs, so the graph cache, the settings and the counters live in a single
:class:`OneDiffState` (``STATE``) that both instances and the status route read. Nothing here imports the
webui: the pieces that do are ``webui_common.py`` and the host subpackages (``a1111/``, ``sdnext/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from typing import Any, Dict, List, Optional

import torch

from compile import (
    AUTO,
    AUTO_MODE,
    KNOWN_BACKENDS,
    CompileOptions,
    GraphCache,
    PersistentCache,
    auto_choice,
    available_backends,
    compiled_graph_count,
    graph_break_count,
)
from compile.backends import availability
from compile.graph_cache import call_shapes

from .compile_progress import CompileProgress, Show, image_size

SCRIPT_TITLE = "onediff_diffusion_model"  # the Script dropdown entry and the API's script_name

# Settings keys in A1111's shared.opts (section "OneDiff").
OPTION_BACKEND = "onediff_backend"
OPTION_COMPILE_MODE = "onediff_compile_mode"
OPTION_DYNAMIC = "onediff_dynamic_shapes"
OPTION_CACHE_DIR = "onediff_cache_dir"
OPTION_MAX_GRAPHS = "onediff_max_graphs"
OPTION_CLEAR_CACHE = "onediff_clear_compile_cache"
OPTION_QUANTIZATION = "onediff_quantization"
# Compiled graphs kept across restarts, by default inside the extension's folder (ignored by its git).
DEFAULT_CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "compile_cache")

BACKEND_CHOICES = [AUTO, *KNOWN_BACKENDS]
# "auto": CUDA graphs on CUDA, inductor's default elsewhere; "default": inductor's default everywhere (the
# behaviour before CUDA graphs were the default).
COMPILE_MODE_CHOICES = [AUTO_MODE, "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]

# What the quantization checkbox asks for (compile.quantization: the device picks the scheme that runs).
QUANTIZATION_CHOICES = ["int8", "fp8"]
# Measured step times of quantized against float graphs, per device, kept in the compile cache folder so the
# checkbox can say at the next start what quantization does on this device.
QUANTIZATION_SPEED_FILE = "quantization-speed.json"
CONTROL_NETWORK_GRAPHS = 2  # compiled ControlNet networks kept (two units with models of other structures)

_TRUE_STRINGS = {"1", "true", "yes", "on"}
_FALSE_STRINGS = {"", "0", "false", "no", "off", "none", "null"}


class ScriptArgsError(ValueError):
    """``script_args`` that cannot be read as the script's arguments; the message says what is accepted."""


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS | _FALSE_STRINGS:
        return value.strip().lower() in _TRUE_STRINGS
    if isinstance(value, dict) and len(value) == 1:  # {"0": true}: clients that send the gradio form's shape
        return _as_bool(next(iter(value.values())), what)
    raise ScriptArgsError(
        f"onediff_diffusion_model: {what} must be a boolean (true/false, 1/0, \"true\"/\"false\" or "
        f"{{\"0\": true}}), got {json.dumps(value, default=repr)}"
    )


@dataclasses.dataclass(frozen=True)
class ScriptArgs:
    """The script's arguments after tolerant parsing: ``script_args`` = ``[quantization]``.

    A missing argument takes its default. A1111 itself cuts ``script_args`` to the script's slice of the UI's
    components, so a longer list from a client written for another version arrives as its first element.
    """

    quantization: bool = False

    @classmethod
    def parse(cls, args: Any) -> "ScriptArgs":
        if args is None:
            return cls()
        if not isinstance(args, (list, tuple)):
            args = [args]
        if not args:
            return cls()
        return cls(quantization=_as_bool(args[0], "script_args[0] (int8 quantization)"))


@dataclasses.dataclass(frozen=True)
class Settings:
    """The user's choices from the "OneDiff" settings section, read at the start of every job."""

    backend: str = AUTO
    compile_mode: str = AUTO_MODE
    dynamic: bool = False  # see README: inductor on CPU cannot lower ldm's 1x1 convs with symbolic sizes
    cache_dir: str = DEFAULT_CACHE_DIR
    max_graphs: int = 2
    quantization: str = QUANTIZATION_CHOICES[0]  # what the checkbox asks for: int8 or fp8

    def compile_options(self, quantization: str = "") -> CompileOptions:
        mode = self.compile_mode or AUTO_MODE
        return CompileOptions(mode=None if mode == "default" else mode, dynamic=self.dynamic, quantization=quantization)


@dataclasses.dataclass
class JobRecord:
    """What happened in one generation job, for the job's info and the status route."""

    started: float
    backend: str = ""
    accelerated: bool = False
    graph: str = ""
    reused: Optional[bool] = None
    from_compile_cache: bool = False  # a new graph loaded from the persistent compile cache
    compile_s: Optional[float] = None  # the first call of a new graph in this job (compiling or loading it)
    quantization: str = ""
    cuda_graphs: bool = False
    bind_ms: float = 0.0
    new_graphs: int = 0
    new_size_compile_s: float = 0.0  # time spent compiling new sizes of a reused graph
    graph_breaks: int = 0  # the compiled UNet runs in pieces: a host or user setting dynamo cannot trace
    attention_replaced: str = ""  # the webui's attention forward the graph was traced without (a1111/attention.py)
    recompile_limit_hit: bool = False
    control_units: int = 0  # ControlNet / T2I-Adapter units enabled for the job
    control_networks: int = 0  # their control networks that ran compiled (a ControlNet's, every step)
    control_eager_reason: str = ""  # why those units made the job run eagerly
    notices: List[str] = dataclasses.field(default_factory=list)  # short, for the image's info line
    details: List[str] = dataclasses.field(default_factory=list)  # the full reasons (status route, console)
    seconds: float = 0.0

    def info_text(self) -> str:
        """One line for the image's generation parameters ("OneDiff: ...")."""
        if not self.accelerated:
            return "eager (" + "; ".join(self.notices or ["not accelerated"]) + ")"
        verb = "reused" if self.reused else "loaded" if self.from_compile_cache else "compiled"
        took = f" in {self.compile_s:.1f} s" if self.compile_s is not None and not self.reused else ""
        parts = [self.backend, *(["CUDA graphs"] if self.cuda_graphs else []), f"{verb} {self.graph}{took}"]
        if self.quantization:
            parts.append(f"{self.quantization} quantized")
        if self.new_graphs and self.reused and self.new_size_compile_s:
            parts.append(f"compiled {self.new_graphs} new size(s) in {self.new_size_compile_s:.1f} s")
        elif self.new_graphs:
            parts.append(f"{self.new_graphs} new graph(s)")
        if self.graph_breaks:
            parts.append(f"{self.graph_breaks} graph break(s)")
        if self.attention_replaced:
            parts.append(f"sdp attention (for {self.attention_replaced})")
        if self.control_units:
            parts.append(f"{self.control_units} ControlNet unit(s) compiled")
        if self.control_networks:
            parts.append(f"{self.control_networks} control network(s) compiled")
        parts.extend(self.notices)
        return ", ".join(parts)


class OneDiffState:
    """The graph cache, the current settings, the last job and the counters, shared by both tabs."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.cache = GraphCache(max_graphs=self.settings.max_graphs)
        # ControlNet units' control networks: graphs of their own, so they never evict a UNet's
        self.control_cache = GraphCache(max_graphs=CONTROL_NETWORK_GRAPHS)
        self.lock = threading.Lock()
        self.jobs = 0
        self.accelerated_jobs = 0
        self.eager_jobs = 0
        self.compiled_call_failures = 0
        self.failed_graphs: Dict[Any, str] = {}  # GraphKey -> why its compile or call failed
        self.last_job: Optional[JobRecord] = None
        self.running_job: Optional[JobRecord] = None  # the job running now (also last_job), None between jobs
        self.compile_progress = CompileProgress()
        self.last_lora: Optional[Dict[str, Any]] = None  # a1111.lora_bridge.LoraApplyReport.as_dict() of the last change
        self.lora_applications = 0
        self.dynamo_recompile_limit: Optional[int] = None  # as set for the last job (a per-context torch setting)
        # a1111.hooks.CompiledSampling of the p.sample call running now (the webui runs one job at a time): the
        # denoiser's per-step callback hands it the model the webui switched to (the refiner)
        self.active_sampling: Any = None
        self.controlnet_support: Any = None  # a1111.controlnet.Support, once checked
        self.controlnet_compiled_jobs = 0
        self.controlnet_eager_jobs = 0
        self.controlnet_eager_reasons: Dict[str, int] = {}  # why ControlNet jobs ran eagerly, with their counts

    def apply_settings(self, settings: Settings) -> None:
        """Take new settings; a changed cache folder is used for graphs built from now on (graphs in memory
        keep the folder they were opened in)."""
        self.settings = settings
        self.cache.max_graphs = max(1, int(settings.max_graphs))
        folder = os.path.abspath(os.path.expanduser(settings.cache_dir)) if settings.cache_dir else None
        if folder != (self.cache.persistent.folder if self.cache.persistent is not None else None):
            self.cache.persistent = PersistentCache(folder) if folder else None
        self.control_cache.persistent = self.cache.persistent

    def start_job(self) -> JobRecord:
        self.jobs += 1
        self.last_job = self.running_job = JobRecord(started=time.time())
        return self.last_job

    def finish_job(self, job: JobRecord) -> None:
        job.seconds = time.time() - job.started
        self.running_job = None
        if job.accelerated:
            self.accelerated_jobs += 1
            self.save_quantization_speed()
        else:
            self.eager_jobs += 1
        if job.control_units and job.accelerated:
            self.controlnet_compiled_jobs += 1
        elif job.control_units:
            self.controlnet_eager_jobs += 1
            reason = job.control_eager_reason or "; ".join(job.notices) or "not accelerated"
            self.controlnet_eager_reasons[reason] = self.controlnet_eager_reasons.get(reason, 0) + 1

    def save_quantization_speed(self) -> None:
        """Write what the graph cache measured of quantized against float graphs (both used at one size) to
        the cache folder, per device, for the checkbox's label at the next start."""
        comparisons = self.cache.quantization_speed()
        if not comparisons or not self.settings.cache_dir:
            return
        path = os.path.join(self.settings.cache_dir, QUANTIZATION_SPEED_FILE)
        records = read_quantization_speed_file(path)
        for comparison in comparisons:
            records[device_name(comparison["device"])] = {**comparison, "measured": time.strftime("%Y-%m-%d")}
        try:
            os.makedirs(self.settings.cache_dir, exist_ok=True)
            with open(path + ".tmp", "w") as handle:
                json.dump(records, handle, indent=1)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # a read-only cache folder: the status route still shows the measurement

    def watch_compile(self, entry: Any, args: tuple, kwargs: dict, show: Show):
        """A context for one call of ``entry``'s compiled UNet: when the call is expected to build a graph (its
        first call, or new input shapes), ``show`` gets the progress text until it returns."""
        if not entry.will_compile(args, kwargs):
            return contextlib.nullcontext()
        verb = "loading" if entry.compile_s is None and entry.cache_hit else "compiling"
        shape = call_shapes(args, kwargs)[0]
        return self.compile_progress.watch(graph_kind(entry), shape, show, verb, entry.expected_s)

    def compile_cache_text(self) -> str:
        """The Settings' compile cache line: folder, graphs and size on disk."""
        persistent = self.cache.persistent
        if persistent is None:
            return "Compile cache: off (no folder set)."
        status = persistent.status()
        if status["untrusted"]:
            return f"Compile cache: not used, {status['untrusted']} (it must be writable by you only)."
        return (f"Compile cache: {status['entries']} graph(s), {status['size_bytes'] / 2**20:.1f} MB in "
                f"{status['folder']}")

    def summary(self, reasons: Optional[Dict[str, Optional[str]]] = None) -> str:
        """The script's status line: the backend (what ``auto`` is here), the graphs kept, and the job running
        now (what it compiles) or the last one."""
        reasons = available_backends() if reasons is None else reasons
        graphs = [graph_label(entry) for entry in self.cache.entries()]
        text = f"OneDiff: backend {backend_label(self.settings.backend, reasons)}, {len(graphs)} graph(s) cached"
        text += (": " + "; ".join(graphs) + ".") if graphs else "."
        if self.running_job is not None:
            build = self.compile_progress.current()
            doing = build.describe(self.compile_progress.clock()) if build is not None else "running"
            return f"{text} Job {doing}..."
        if self.last_job is None:
            return f"{text} No job yet."
        return f"{text} Last job: {self.last_job.info_text()}."

    def record_lora(self, report: Any) -> None:
        """Remember an application of A1111's LoRA networks into the compiled UNet's weights."""
        self.last_lora = report.as_dict()
        self.lora_applications += 1

    def status(self) -> Dict[str, Any]:
        """JSON for ``GET /onediff/v1/status``."""
        cache = self.cache.status()
        last = dataclasses.asdict(self.last_job) if self.last_job else None
        reasons = available_backends()
        build = self.compile_progress.current()
        return {
            "summary": self.summary(reasons),
            "busy": self.running_job is not None,
            "compiling": None if build is None else build.as_dict(self.compile_progress.clock()),
            "backend": self.settings.backend,
            "backend_resolved": resolved_backend(self.settings.backend, reasons),
            "backends_available": {name: reason is None for name, reason in reasons.items()},
            "backends_unavailable": {name: reason for name, reason in reasons.items() if reason is not None},
            "settings": dataclasses.asdict(self.settings),
            "compile_cache": self.compile_cache_text(),
            "graphs": [{"label": graph_label(entry), **described}
                       for entry, described in zip(self.cache.entries(), cache["graphs"])],
            "compiles": cache["compiles"],
            "reuses": cache["reuses"],
            "evictions": cache["evictions"],
            "recompiles": cache["recompiles"],
            "recompile_limit_hits": cache["recompile_limit_hits"],
            "persistent_cache": cache["persistent_cache"],
            "dynamo_graphs_total": compiled_graph_count(),
            "dynamo_graph_breaks_total": graph_break_count(),
            "dynamo_recompile_limit": self.dynamo_recompile_limit or _dynamo_recompile_limit(),
            "jobs": self.jobs,
            "accelerated_jobs": self.accelerated_jobs,
            "eager_jobs": self.eager_jobs,
            "compiled_call_failures": self.compiled_call_failures,
            "failed_graphs": list(self.failed_graphs.values()),
            "last_job": last,
            "quantization_speed": cache["quantization_speed"],
            "last_lora_fuse_ms": None if self.last_lora is None else round(self.last_lora["apply_ms"], 3),
            "last_lora": self.last_lora,
            "lora_applications": self.lora_applications,
            "controlnet": {
                "extension": None if self.controlnet_support is None else self.controlnet_support.describe(),
                "compiled_jobs": self.controlnet_compiled_jobs,
                "eager_jobs": self.controlnet_eager_jobs,
                "eager_reasons": dict(self.controlnet_eager_reasons),
                "control_network_graphs": [graph_label(entry) for entry in self.control_cache.entries()],
            },
            "device_memory_mb": _device_memory_mb(),
            "torch": torch.__version__,
        }


def quantization_scheme(entry: Any) -> str:
    """The quantization scheme a cached graph runs ("int8-dynamic", ...), "" for a float graph."""
    weights = getattr(entry.binding, "weights", None)
    return getattr(weights, "mode", "") or entry.key.options.quantization


def graph_kind(entry: Any) -> str:
    """What the progress bar calls a graph: "UNet", "int8-dynamic UNet", or "ControlNet" (a unit's network)."""
    if "ControlNet" in entry.signature.class_name:
        return "ControlNet"
    scheme = quantization_scheme(entry)
    return f"{scheme} UNet" if scheme else "UNet"


def graph_label(entry: Any) -> str:
    """What tells cached graphs apart: the structure, the quantization scheme, the compile mode and the image
    sizes compiled so far, e.g. "UNetModel:c1374a2ad35c int8-dynamic default 512x512,768x512"."""
    options = entry.key.options
    mode = (options.mode or "default") + (" dynamic" if options.dynamic else "")
    sizes = ",".join(dict.fromkeys(image_size(shape) for shape in entry.compiled_shapes)) or "(not compiled yet)"
    return f"{entry.signature.short()} {quantization_scheme(entry) or 'float'} {mode} {sizes}"


def resolved_backend(name: str, reasons: Dict[str, Optional[str]]) -> Optional[str]:
    """The backend a job with the ``name`` setting compiles with here, None when it cannot compile."""
    if name == AUTO:
        return auto_choice(reasons)
    return name if _reason(name, reasons) is None else None


def _reason(name: str, reasons: Dict[str, Optional[str]]) -> Optional[str]:
    return reasons[name] if name in reasons else availability(name)


def backend_label(name: str, reasons: Dict[str, Optional[str]]) -> str:
    """A backend as the Settings dropdown and the status line name it: ``auto`` with the backend it picks here,
    one that cannot run here with the reason (``reasons``: :func:`compile.available_backends`)."""
    if name == AUTO:
        chosen = auto_choice(reasons)
        return f"{AUTO} ({chosen} here)" if chosen else f"{AUTO} (no backend can run here)"
    reason = _reason(name, reasons)
    return name if reason is None else f"{name} (not available: {reason})"


def backend_choices(reasons: Dict[str, Optional[str]]) -> List[str]:
    """The Settings dropdown's entries, plain strings (A1111's settings need them so): see :func:`backend_label`."""
    return [backend_label(name, reasons) for name in BACKEND_CHOICES]


def backend_name(choice: Any) -> str:
    """The backend a setting's value names: a dropdown entry ("oneflow (not available: ...)") or a plain name
    (as the API may set it)."""
    return str(choice or "").split(" (", 1)[0].strip().lower() or AUTO


def device_name(device: str) -> str:
    """The device's model name (the GPU's, or "CPU"): quantization speed is measured and kept per model."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"


def read_quantization_speed_file(path: str) -> Dict[str, Any]:
    try:
        with open(path) as handle:
            records = json.load(handle)
        return records if isinstance(records, dict) else {}
    except (OSError, ValueError):
        return {}


def quantization_checkbox(request: str, installed: bool, measured: Optional[Dict[str, Any]],
                          device: str) -> Dict[str, Any]:
    """Label, info and interactivity of the quantization checkbox: "Speed Up" only where this device was
    measured faster with it; otherwise what it does here (smaller weights), and the measurement if there is
    one (``measured``: this device's record from :data:`QUANTIZATION_SPEED_FILE`)."""
    name = f"Model Quantization ({request})"
    if not installed:
        return {"label": f"{name}: not available", "interactive": False,
                "info": "torchao is not installed (the extension's install.py installs it); jobs run unquantized"}
    if not measured:
        return {"label": f"{name}: smaller weights", "interactive": True,
                "info": f"Its speed on this {device} is not measured yet: run one job with and one without it at "
                        "the same size; the status line then compares them, and this label says it after a restart."}
    faster = measured["speedup"] >= 1.0
    comparison = (f"{measured['scheme']} measured on this {device} ({measured['measured']}): "
                  f"{measured['speedup']:.2f}x the float graph's speed at {measured['shape']} "
                  f"({measured['quantized_ms']:.1f} vs {measured['float_ms']:.1f} ms a step), "
                  f"weights {measured['weight_share']:.0%} of float")
    label = f"{name} Speed Up" if faster else f"{name}: smaller weights, not faster here"
    return {"label": label, "info": comparison, "interactive": True}


def _device_memory_mb() -> Optional[Dict[str, float]]:
    """torch's CUDA allocator totals (compiled graphs' pools included), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return {"allocated": round(torch.cuda.memory_allocated() / 2**20, 1),
            "reserved": round(torch.cuda.memory_reserved() / 2**20, 1)}


def _dynamo_recompile_limit() -> int:
    import torch._dynamo.config as dynamo_config

    return int(dynamo_config.recompile_limit)


STATE = OneDiffState()
