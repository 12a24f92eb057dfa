"""What the extension shows and reads in the webui whatever the host: its settings section, the status route,
the quantization checkbox's text. Imported only inside a webui (``modules.shared``, ``modules.devices``);
the job logic is per host (``a1111/``, ``sdnext/``; ``hosts.py`` picks one).
"""

from __future__ import annotations

import html
import logging
import os
import traceback
from typing import Optional

import gradio as gr

from compile import BackendUnavailable, available_backends
from modules import devices, shared

from . import api_auth, api_form
from .state import (
    COMPILE_MODE_CHOICES,
    DEFAULT_CACHE_DIR,
    OPTION_BACKEND,
    OPTION_CACHE_DIR,
    OPTION_CLEAR_CACHE,
    OPTION_COMPILE_MODE,
    OPTION_DYNAMIC,
    OPTION_MAX_GRAPHS,
    OPTION_QUANTIZATION,
    QUANTIZATION_CHOICES,
    QUANTIZATION_SPEED_FILE,
    SCRIPT_TITLE,
    STATE,
    JobRecord,
    Settings,
    backend_choices,
    backend_label,
    backend_name,
    device_name,
    graph_kind,
    quantization_checkbox as quantization_checkbox_text,
    read_quantization_speed_file,
)

logger = logging.getLogger("onediff_sd_webui_extensions")
INFO_KEY = "OneDiff"  # the job's line in the image's generation parameters

def quantization_unavailable(request: str) -> Optional[str]:
    """None when ``request`` (int8 or fp8) runs on the webui's device and UNet dtype, else why not. Imports
    torchao (the first quantized job does; start-up does not)."""
    from compile.quantization import int8_availability

    return int8_availability(devices.device, request, devices.dtype_unet)


def quantization_checkbox() -> dict:
    """The checkbox's label, info and interactivity (``state.quantization_checkbox``), without importing
    torchao: start-up stays quiet and fast; whether the scheme's kernels run is checked by the first job."""
    from compile.quantization import torchao_installed

    settings = read_settings()
    device = device_name(str(devices.device))
    measured = read_quantization_speed_file(os.path.join(settings.cache_dir, QUANTIZATION_SPEED_FILE)).get(device) \
        if settings.cache_dir else None
    return quantization_checkbox_text(settings.quantization, torchao_installed(), measured, device)


def read_settings() -> Settings:
    defaults = Settings()
    opts = shared.opts
    return Settings(
        backend=backend_name(opts.data.get(OPTION_BACKEND, defaults.backend)),
        compile_mode=str(opts.data.get(OPTION_COMPILE_MODE, defaults.compile_mode) or defaults.compile_mode),
        dynamic=bool(opts.data.get(OPTION_DYNAMIC, defaults.dynamic)),
        cache_dir=str(opts.data.get(OPTION_CACHE_DIR, defaults.cache_dir) or ""),
        max_graphs=int(opts.data.get(OPTION_MAX_GRAPHS, defaults.max_graphs) or defaults.max_graphs),
        quantization=str(opts.data.get(OPTION_QUANTIZATION, defaults.quantization) or defaults.quantization),
    )


def compiled_unet_lookup(unet, job: JobRecord, quantization: str = ""):
    """(the graph cache's lookup for ``unet`` under the current settings, None) or (None, why the job runs
    eagerly): a backend that cannot run here, a compile that could not be prepared, a graph that failed before."""
    try:
        lookup = STATE.cache.get(unet, STATE.settings.backend, STATE.settings.compile_options(quantization))
    except BackendUnavailable as error:  # the image's info says so briefly; the status route and console fully
        if str(error) not in job.details:  # once per job, not per batch or sampling call
            job.details.append(str(error))
            logger.warning("OneDiff: %s", error)
        return None, f"backend {error.backend} not available"
    except Exception as error:  # noqa: BLE001
        logger.error("OneDiff: could not prepare a compiled UNet\n%s", traceback.format_exc())
        return None, f"compile failed ({type(error).__name__}: {error})"
    if lookup.entry.key in STATE.failed_graphs:
        return None, f"this graph failed before: {STATE.failed_graphs[lookup.entry.key]}"
    return lookup, None


def announce_first_call(entry) -> None:
    """Say on the console, before the long silent first call, that a graph is being built and for how long."""
    expected = f"; took about {entry.expected_s:.0f} s last time" if entry.expected_s else ""
    if entry.cache_hit:
        what = f"loading a compiled {graph_kind(entry)} graph from the compile cache"
    else:
        problem = f" ({entry.cache_problem})" if entry.cache_problem else ""
        what = (f"compiling a new {graph_kind(entry)} graph with {entry.key.backend}, once per model structure and "
                f"size{problem}")
    print(f"OneDiff: {what} {entry.signature.short()}{expected} ...", flush=True)


# Graphs one UNet structure may need: its image sizes, batch sizes (A1111 runs cond and uncond apart when their
# lengths differ), context lengths and hires fix's second size.
GRAPHS_PER_STRUCTURE = 8


def ensure_recompile_limit(max_graphs: int) -> int:
    """Raise dynamo's recompile limit to what the graph cache may legitimately hold, and return it.

    torch keeps config overrides in a context variable, and the webui runs each API request in a copied
    context, so this is set at the start of every job, in the thread that compiles.

    Dynamo keeps its compiled graphs per *code object*, and every ldm/sgm UNet runs A1111's one
    ``sd_unet.UNetModel_forward`` (every diffusers UNet ``UNet2DConditionModel.forward``): all structures and
    all shapes share one list of at most ``recompile_limit`` (8) graphs, after which dynamo silently runs
    eagerly. Measured in the webui: a 64x64 graph, its hires size,
    a 154-token prompt (two batch-1 graphs) and a second structure already make 6.
    """
    import torch._dynamo.config as dynamo_config

    wanted = GRAPHS_PER_STRUCTURE * max(1, int(max_graphs))
    if dynamo_config.recompile_limit < wanted:
        dynamo_config.recompile_limit = wanted
    return dynamo_config.recompile_limit


def show_in_progress_bar(text: Optional[str]) -> None:
    """The line the webui's progress bar shows beside the percentage (``compile_progress``)."""
    shared.state.textinfo = text


def on_ui_settings():
    section = ("onediff", "OneDiff")
    reasons = available_backends()
    options = {
        # Plain strings as choices, given by a callable: the backends that cannot run here say why. The stored
        # value is the entry's text; read_settings maps it back to the backend's name.
        OPTION_BACKEND: shared.OptionInfo(
            backend_label("auto", reasons), "Compile backend (auto: oneflow, then nexfort, then inductor)",
            gr.Dropdown, lambda: {"choices": backend_choices(available_backends())}, section=section,
        ),
        OPTION_COMPILE_MODE: shared.OptionInfo(
            "auto", "Compile mode (auto: CUDA graphs on a CUDA GPU; default: never CUDA graphs)",
            gr.Dropdown, {"choices": COMPILE_MODE_CHOICES}, section=section,
        ),
        OPTION_QUANTIZATION: shared.OptionInfo(
            "int8", "Quantization the script's checkbox asks for (int8: dynamic int8 where the device runs int8 "
            "matmuls, else int8 weights only; fp8: CUDA GPUs of compute capability 8.9+, about 2% error per step "
            "against 0.6% for int8, see README)", gr.Radio, {"choices": QUANTIZATION_CHOICES}, section=section,
        ),
        OPTION_DYNAMIC: shared.OptionInfo(
            False, "Dynamic shapes (one graph for all sizes; off: one graph per size, up to dynamo's recompile limit)",
            section=section,
        ),
        OPTION_MAX_GRAPHS: shared.OptionInfo(
            2, "Compiled graphs kept in memory (one per UNet structure)", gr.Slider,
            {"minimum": 1, "maximum": 8, "step": 1}, section=section,
        ),
        OPTION_CACHE_DIR: shared.OptionInfo(
            DEFAULT_CACHE_DIR,
            "Compile cache folder: compiled graphs kept across restarts (empty: none; used for graphs built after "
            "the change)", section=section,
        ),
        OPTION_CLEAR_CACHE: shared.OptionInfo(
            False, "Clear the compile cache when these settings are applied", onchange=clear_compile_cache,
            section=section,
        ),
    }
    if hasattr(shared, "OptionHTML"):  # A1111; SD.Next has no HTML settings line (its status route shows the cache)
        options["onediff_compile_cache_size"] = _live_html(compile_cache_html, section)
    for key, info in options.items():
        if key not in (OPTION_CLEAR_CACHE, "onediff_compile_cache_size"):
            info.onchange = apply_settings  # the status line tells the new settings before the next job
        shared.opts.add_option(key, info)
    # the stored choice shown as today's entry for its backend (availability may have changed since it was saved);
    # SD.Next keeps defaults out of opts.data
    stored = shared.opts.data.get(OPTION_BACKEND)
    if stored is not None:
        shared.opts.data[OPTION_BACKEND] = backend_label(backend_name(stored), reasons)


def apply_settings() -> None:
    """Take the OneDiff settings into ``STATE`` (at start-up and when they change in Settings)."""
    STATE.apply_settings(read_settings())


def compile_cache_html() -> str:
    return f"<p>{html.escape(STATE.compile_cache_text())}</p>"


def clear_compile_cache() -> None:
    """Settings action: empty the compile cache folder, then untick the box (it is an action, not a state)."""
    if shared.opts.data.get(OPTION_CLEAR_CACHE) and STATE.cache.persistent is not None:
        removed, freed = STATE.cache.persistent.clear()
        print(f"OneDiff: compile cache cleared: {removed} graph(s), {freed / 2**20:.1f} MB", flush=True)
    shared.opts.data[OPTION_CLEAR_CACHE] = False


def _live_html(render, section):
    """A settings line whose HTML is computed on every page load (gradio calls a callable value)."""
    option = shared.OptionHTML("")
    # javascript/onediff_status.js renders it again after Settings are applied, by its elem_id
    option.component = lambda **kwargs: gr.HTML(value=render, elem_classes="settings-info",
                                                elem_id=kwargs.get("elem_id"))
    option.section = section
    return option


def on_app_started(_demo, app):
    users = api_auth.credentials(shared.cmd_opts)  # the webui's API credentials, read once (an auth file too)
    api_form.install(app, SCRIPT_TITLE, authorized=api_auth.scope_check(users))

    def onediff_status():
        return STATE.status()

    api_auth.route(app, "/onediff/v1/status", onediff_status, users)  # 401 where /sdapi/v1/* is
