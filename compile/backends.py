"""Compile backends, all reached through onediff's backend registry.

``onediff.infer_compiler.compile(module, backend=NAME, options=...)`` is the one entry point. onediff ships
``oneflow`` and ``nexfort``; we register ``inductor`` (plain ``torch.compile``) so the same call works on every
machine. A backend that cannot run here raises :class:`BackendUnavailable` naming the backend, the reason and
what to install: a missing backend is never replaced silently by another one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch

INDUCTOR = "inductor"
ONEFLOW = "oneflow"
NEXFORT = "nexfort"
AUTO = "auto"
KNOWN_BACKENDS = (INDUCTOR, ONEFLOW, NEXFORT)
AUTO_ORDER = (ONEFLOW, NEXFORT, INDUCTOR)  # what ``auto`` tries: onediff's own backends on CUDA first

# torch.compile modes. ``AUTO_MODE`` resolves per device (:func:`resolve_mode`): CUDA graphs on CUDA, where a
# step without them is bound by kernel launches, and inductor's default elsewhere (CUDA graphs need CUDA).
AUTO_MODE = "auto"
CUDA_GRAPHS_MODE = "reduce-overhead"
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs

_INSTALL_HINTS = {
    ONEFLOW: "install OneFlow for your CUDA version (see https://github.com/siliconflow/onediff#installation)",
    NEXFORT: "install nexfort (needs CUDA and torch <= 2.5.1; see onediff's README)",
    INDUCTOR: "install torch >= 2.1",
}


class BackendUnavailable(RuntimeError):
    """A compile backend was asked for but cannot be used on this machine."""

    def __init__(self, backend: str, reason: str):
        hint = _INSTALL_HINTS.get(backend, f"choose one of {', '.join(KNOWN_BACKENDS)}")
        super().__init__(f"compile backend '{backend}' is not available: {reason}. To use it, {hint}.")
        self.backend = backend
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Options that change the compiled graph; they are part of the graph cache key.

    ``mode`` is torch.compile's mode (None, "max-autotune-no-cudagraphs", ...). ``dynamic`` lets dynamo compile
    one graph with symbolic batch/height/width instead of one per shape. ``quantization`` names a weight
    quantization applied before compiling ("" for none).
    """

    mode: Optional[str] = None
    dynamic: Optional[bool] = None
    fullgraph: bool = False
    quantization: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_mode(mode: Optional[str], device: Any) -> Optional[str]:
    """The concrete torch.compile mode for ``mode`` on ``device``: ``auto`` is :data:`CUDA_GRAPHS_MODE` on CUDA
    and None (inductor's default) elsewhere; ``"default"`` and ``""`` are None; any other mode is kept."""
    if mode in (None, "", "default"):
        return None
    if mode == AUTO_MODE:
        return CUDA_GRAPHS_MODE if torch.device(device).type == "cuda" else None
    return mode


def uses_cuda_graphs(mode: Optional[str], device: Any) -> bool:
    """Whether a graph compiled with the resolved ``mode`` on ``device`` replays CUDA graphs."""
    return torch.device(device).type == "cuda" and mode in CUDA_GRAPH_MODES


# Inductor settings for a quantized graph only (passed to its torch.compile, never set process-wide, so float
# graphs and their cache keys are untouched). torchao's int8 dynamic linear on CUDA is ``torch._int_mm`` followed
# by a multiply with the row and weight scales; without this flag inductor writes the int32 product to memory
# (twice the bytes of an fp16 output) and reads it back to scale it. With it, the multiply is fused into the
# int8 GEMM's epilogue. Its pattern only matches CUDA tensors: elsewhere the flag changes nothing but the key.
QUANTIZED_INDUCTOR_CONFIG = {"force_fuse_int_mm_with_mul": True}


def _inductor_backend(torch_module, *, options: Optional[Dict[str, Any]] = None):
    """torch.compile with inductor. Never with inductor ``freezing``: it turns parameters into constants, and
    then weights written in place (checkpoint switch, LoRA) are silently ignored by the graph.

    ``options["inductor_config"]``: inductor settings for this graph. torch.compile takes a mode or options,
    not both, so the mode is then expanded into its options (``torch._inductor.list_mode_options``)."""
    import torch._inductor
    import torch._inductor.config as inductor_config

    options = dict(options or {})
    if options.pop("freezing", False) or inductor_config.freezing:
        raise ValueError("inductor freezing bakes weights into the graph; in-place weight updates need it off")
    mode, extra = options.get("mode"), options.get("inductor_config")
    if extra:
        mode_options = torch._inductor.list_mode_options(mode) if mode not in (None, "default") else {}
        compile_options = {"mode": None, "options": {**mode_options, **extra}}
    else:
        compile_options = {"mode": mode}
    return torch.compile(
        torch_module,
        backend="inductor",
        dynamic=options.get("dynamic"),
        fullgraph=bool(options.get("fullgraph", False)),
        **compile_options,
    )


def _register_inductor() -> None:
    from onediff.infer_compiler.backends import registry

    if INDUCTOR not in registry._BACKENDS:  # registering a name twice raises in onediff
        registry.register_backend(INDUCTOR)(_inductor_backend)


def availability(backend: str) -> Optional[str]:
    """None when ``backend`` can be used here, else the reason it cannot."""
    if backend not in KNOWN_BACKENDS:
        return f"unknown backend (known: {', '.join(KNOWN_BACKENDS)}, or '{AUTO}')"
    try:
        from onediff.infer_compiler.backends import registry
    except Exception as error:  # onediff itself missing or broken
        return f"onediff cannot be imported ({type(error).__name__}: {error})"
    if backend == INDUCTOR:
        _register_inductor()
        return None
    try:
        registry.lookup_backend(backend)
        if backend == ONEFLOW:
            import oneflow  # noqa: F401  (onediff imports it lazily, at first compile)

            if not hasattr(oneflow, "nn"):
                return "the installed 'oneflow' package is a placeholder without OneFlow's native library"
        if backend == NEXFORT:
            import nexfort  # noqa: F401
    except Exception as error:
        if isinstance(error, ModuleNotFoundError) and error.name in (ONEFLOW, NEXFORT):
            return f"onediff's {backend} backend needs the {error.name} package, which is not installed"
        return f"{type(error).__name__}: {error}"
    if backend in (ONEFLOW, NEXFORT) and not torch.cuda.is_available():
        return "it needs a CUDA GPU and none is visible"
    return None


def available_backends() -> Dict[str, Optional[str]]:
    """Every known backend mapped to None (usable) or the reason it is not."""
    return {name: availability(name) for name in KNOWN_BACKENDS}


def auto_choice(reasons: Dict[str, Optional[str]]) -> Optional[str]:
    """The backend ``auto`` picks given :func:`available_backends`' answer, or None when none is usable."""
    return next((name for name in AUTO_ORDER if name in reasons and reasons[name] is None), None)


def resolve_backend(name: str = AUTO) -> str:
    """The concrete backend for ``name``; ``auto`` picks the best usable one (onediff's own on CUDA first)."""
    name = (name or AUTO).strip().lower()
    if name == AUTO:
        reasons = available_backends()
        chosen = auto_choice(reasons)
        if chosen is None:
            raise BackendUnavailable(INDUCTOR, reasons[INDUCTOR] or "no backend usable")
        return chosen
    reason = availability(name)
    if reason is not None:
        raise BackendUnavailable(name, reason)
    return name


def compile_module(module: torch.nn.Module, backend: str, options: CompileOptions):
    """Compile ``module`` with onediff's registry entry for ``backend`` (already resolved)."""
    from onediff.infer_compiler import compile as onediff_compile

    if backend == INDUCTOR:
        _register_inductor()
        backend_options = {"mode": options.mode, "dynamic": options.dynamic, "fullgraph": options.fullgraph,
                           "inductor_config": QUANTIZED_INDUCTOR_CONFIG if options.quantization else None}
    else:
        backend_options = {"mode": options.mode} if options.mode else None
    return onediff_compile(module, backend=backend, options=backend_options)
