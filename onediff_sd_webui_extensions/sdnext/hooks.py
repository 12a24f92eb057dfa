"""The part that knows SD.Next (diffusers backend): route the pipeline's UNet to its compiled graph for a job.

Imported only inside SD.Next (it imports ``modules.*``). All state is in ``state.STATE``.

When to decide: ``processing.process_images`` applies ``override_settings`` (a checkpoint switch loads a new
pipeline) inside itself, after the script's ``run`` started, and then calls
``processing_diffusers.process_diffusers(p)`` once per batch, looking the function up in its module at every
call. So the job replaces that module attribute for its duration and picks the compiled graph there, for the
pipeline loaded at that moment: ``shared.sd_model.unet`` is looked up in the graph cache (a checkpoint of the
same structure reuses its graph, weights bound in place) and its forward routed to it
(:class:`unet_router.UNetRouter`) until the batch is done, whatever happens in it.

What is not accelerated: models without a UNet (transformer models: FLUX, SD3, ...), the refiner (its own
pipeline), model offload modes that move the UNet between devices around each use, and SD.Next's own "Compile
Model". Each runs eagerly with the reason in the job's info.

Control tab (``/sdapi/v1/control``): SD.Next sets its ControlNet / T2I-Adapter pipeline, built around the same UNet
object, as ``shared.sd_model`` (``modules/control/run.py``, ``set_pipe`` and ``control_run``) and runs the selected
script through ``processing.process_images`` as txt2img does (``control_process``). It offers an extension's
script there only if the script's title is in ``installer.control_extensions`` ("extensions marked as safe for
control ui", checked in ``modules/scripts_manager.py``), so importing this module adds ours
(:func:`allow_in_control_tab`). The controlled UNet calls pass the residuals as diffusers' optional kwargs; the
router serves them with the same compiled entry (see ``unet_router``).
"""

from __future__ import annotations

import logging
import traceback
from typing import Optional

from compile import compiled_graph_count, graph_break_count
from modules import processing, shared

from ..state import SCRIPT_TITLE, STATE, JobRecord, ScriptArgs
from ..webui_common import (
    INFO_KEY,
    announce_first_call,
    compiled_unet_lookup,
    ensure_recompile_limit,
    quantization_unavailable,
    read_settings,
    show_in_progress_bar,
)
from .unet_router import UNetRouter

logger = logging.getLogger("onediff_sd_webui_extensions")


def allow_in_control_tab() -> bool:
    """Add the script's title to SD.Next's ``installer.control_extensions``: SD.Next skips every other external
    extension's script in its Control tab and for ``/sdapi/v1/control`` ("title=... skip" in its debug log), and
    reads that list when it builds the control script runner, after the extensions' scripts were imported.
    False where this SD.Next has no such list (nothing to do)."""
    try:
        from installer import control_extensions
    except ImportError:
        return False
    if SCRIPT_TITLE not in control_extensions:
        control_extensions.append(SCRIPT_TITLE)
    return True


allow_in_control_tab()


def current_pipeline():
    """The diffusers pipeline SD.Next runs now (some models wrap it as ``.pipe``)."""
    return getattr(shared.sd_model, "pipe", shared.sd_model)


def eager_reason(pipeline) -> Optional[str]:
    """Why the job cannot run ``pipeline``'s UNet compiled, or None."""
    from diffusers import UNet2DConditionModel

    unet = getattr(pipeline, "unet", None)
    if unet is None:
        return f"{type(pipeline).__name__} has no UNet (only SD1.x/SD2.x/SDXL UNets are accelerated)"
    if not isinstance(unet, UNet2DConditionModel):
        return f"the UNet is a {type(unet).__name__}, not a diffusers UNet2DConditionModel (SD.Next's own " \
               "Compile Model or a quantizer may have wrapped it)"
    offload = getattr(shared.opts, "diffusers_offload_mode", "none")
    if offload not in ("none", None, ""):
        return f"model offload mode '{offload}' moves the UNet between devices around each use; set Settings > " \
               "Model offload mode to 'none'"
    if "forward" in vars(unet):
        return "the UNet's forward is already replaced (an offload hook or another extension)"
    return None


class CompiledBatch:
    """The compiled UNet of one ``process_diffusers`` call (one batch of a job, hires pass included)."""

    def __init__(self, job: JobRecord, script_args: ScriptArgs):
        self.job = job
        self.script_args = script_args
        self.router: Optional[UNetRouter] = None
        self.first_call = False
        self.counters_before = (compiled_graph_count(), graph_break_count(),
                                len(STATE.cache.recompile_limit_watcher.messages))

    def _quantization(self) -> str:
        if not self.script_args.quantization:
            return ""
        request = STATE.settings.quantization
        missing = quantization_unavailable(request)
        if missing:
            self._note(f"{request} requested but {missing}; compiled without it")
            return ""
        return request

    def start(self) -> None:
        """Route the current pipeline's UNet to its graph; on any obstacle the batch runs eagerly, noted."""
        pipeline = current_pipeline()
        reason = eager_reason(pipeline)
        lookup = None
        if reason is None:
            lookup, reason = compiled_unet_lookup(pipeline.unet, self.job, self._quantization())
        if lookup is not None:
            try:
                self._route(pipeline.unet, lookup)
                return
            except Exception as error:  # noqa: BLE001 (never lose the job to the routing)
                logger.error("OneDiff: could not route the UNet\n%s", traceback.format_exc())
                reason = f"could not route the UNet ({type(error).__name__}: {error})"
        self.job.accelerated = False
        self._note(reason)
        logger.warning("OneDiff: generating eagerly: %s", reason)

    def _route(self, unet, lookup) -> None:
        job = self.job
        entry = lookup.entry
        if job.reused is None:  # the job's first batch says what the job cost
            job.accelerated = True
            job.reused = lookup.reused
            job.backend = entry.key.backend
            job.graph = entry.signature.short()
            job.quantization = entry.binding.weights.mode if entry.key.options.quantization else ""
            job.cuda_graphs = entry.cuda_graphs
            job.from_compile_cache = not lookup.reused and bool(entry.cache_hit)
        job.bind_ms += lookup.bind_ms
        self.first_call = entry.compile_s is None
        if self.first_call:
            announce_first_call(entry)
        router = UNetRouter(unet, lookup, job, show_in_progress_bar)
        router.install()
        self.router = router

    def finish(self, p) -> None:
        """Give the UNet its own forward back, also after errors, and write the job's info."""
        job = self.job
        if self.router is not None:
            self.router.remove()
            entry = self.router.lookup.entry
            if self.first_call and entry.compile_s is not None:
                print(f"OneDiff: graph {entry.signature.short()} ready in {entry.compile_s:.1f} s", flush=True)
                job.compile_s = entry.compile_s
            graphs_before, breaks_before, limit_hits_before = self.counters_before
            new_graphs = compiled_graph_count() - graphs_before
            job.new_graphs += new_graphs
            job.graph_breaks += graph_break_count() - breaks_before
            if entry.cache_notice and (self.first_call or new_graphs):
                self._note(entry.cache_notice)  # this job compiled, and the compile cache could not keep it
            if len(STATE.cache.recompile_limit_watcher.messages) > limit_hits_before:
                job.recompile_limit_hit = True
                self._note("dynamo hit its recompile limit: part of this job ran eagerly (see the status route)")
        p.extra_generation_params[INFO_KEY] = job.info_text()

    def _note(self, text: str) -> None:
        if text and text not in self.job.notices:
            self.job.notices.append(text)


def process_images(p, script_args: ScriptArgs):
    """``processing.process_images(p)`` with the UNet routed to its compiled graph around every batch."""
    from modules import processing_diffusers  # not at start-up: importing it reads shared.sd_model (a model load)

    STATE.apply_settings(read_settings())
    STATE.dynamo_recompile_limit = ensure_recompile_limit(STATE.settings.max_graphs)
    job = STATE.start_job()
    original = processing_diffusers.process_diffusers

    def process_diffusers_compiled(p_batch, *args, **kwargs):
        batch = CompiledBatch(job, script_args)
        try:
            batch.start()
            return original(p_batch, *args, **kwargs)
        finally:
            batch.finish(p_batch)

    processing_diffusers.process_diffusers = process_diffusers_compiled
    try:
        return processing.process_images(p)
    finally:
        processing_diffusers.process_diffusers = original
        STATE.finish_job(job)
