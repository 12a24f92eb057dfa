"""The part that knows A1111: swap the compiled UNet in for a job (settings and the status route: ``webui_common``).

Imported only inside the webui (it imports ``modules.*``). All state is in ``state.STATE``.

When to decide: ``processing.process_images`` applies ``override_settings`` and reloads the checkpoint *inside*
itself, after a script's ``run`` has started. So ``run`` does not look at the model; it wraps ``p.sample`` (the
call that does all denoising of a batch, hires fix included) and picks the compiled UNet there, for the model
that is loaded at that moment, then puts the eager UNet back on the same model object when sampling ends.

What the compiled graph sees: ldm's ``DiffusionWrapper`` / sgm's ``OpenAIWrapper`` call
``diffusion_model(x, timesteps, context, ...)``; A1111 has replaced ``UNetModel.forward`` with
``sd_unet.UNetModel_forward`` (which defers to a selected "SD Unet" such as TensorRT) and patched
``timestep_embedding``, ``SpatialTransformer.forward``, the attention forwards and ``torch.cat``. Dynamo traces
through all of these, so the graph computes exactly what the eager webui computes; with another "SD Unet"
selected we stay eager.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from typing import Any, List, Optional

import torch

from compile import CompileOptions, compiled_graph_count, graph_break_count
from modules import devices, processing, sd_unet, shared

from ..state import STATE, JobRecord, ScriptArgs, graph_kind
from ..webui_common import (
    INFO_KEY,
    announce_first_call,
    compiled_unet_lookup,
    ensure_recompile_limit,
    quantization_unavailable,
    read_settings,
    show_in_progress_bar,
)
from . import attention, controlnet, lora_bridge
from .unet_swap import EagerUNetView

logger = logging.getLogger("onediff_sd_webui_extensions")
STATE.cache.runtime_attributes |= controlnet.RUNTIME_ATTRIBUTES


def controlnet_support() -> controlnet.Support:
    """sd-webui-controlnet checked against the seam once it is loaded (its scripts load after this one)."""
    if STATE.controlnet_support is None or not STATE.controlnet_support.loaded:
        STATE.controlnet_support = controlnet.support()
    return STATE.controlnet_support


def on_app_started(_demo, _app) -> None:
    """Every extension's scripts are loaded: say on the console whether ControlNet's units run compiled."""
    found = controlnet_support()
    if found.loaded:
        print(f"OneDiff: sd-webui-controlnet {found.describe()}", flush=True)


_NOT_APPLIED_YET = object()  # equal to no networks fingerprint: the first call of a job always applies


class GuardedUNet(EagerUNetView):
    """Stands in for the eager UNet during a job: calls the compiled UNet, and if that raises, logs why, marks
    the graph as failed and finishes the job with the eager UNet (same inputs, so no step is lost).

    LoRA: A1111's Lora extension applies networks lazily inside its patched ``forward`` methods, which a
    compiled graph does not run. Before every compiled call the job's networks are applied eagerly into the
    captured weights (a no-op check per layer when nothing changed; hires fix may change them between passes),
    and the call runs with the original forwards so the LoRA state never becomes part of the graph.

    To the rest of the webui it is the eager UNet (:class:`unet_swap.EagerUNetView`): a checkpoint loaded
    during the job (a refiner of the same config) is bound to the graph before the next call, and LoRA is
    applied again, as A1111 resets it on a load.

    ControlNet: with ``control`` (the job's :class:`controlnet.ControlNetJob`), each call first runs
    ControlNet's own forward up to the UNet body, eagerly as in any job, and the compiled graph gets the
    inputs and residuals it prepared.
    """

    def __init__(self, compiled: torch.nn.Module, eager: torch.nn.Module, captured: torch.nn.Module,
                 job: JobRecord, graph_key: Any, binding: Any, control: Optional[controlnet.ControlNetJob] = None):
        super().__init__(eager, compiled, binding)
        object.__setattr__(self, "captured", captured)
        object.__setattr__(self, "job", job)
        object.__setattr__(self, "graph_key", graph_key)
        object.__setattr__(self, "control", control)
        self.failed = False
        self.lora_fingerprint: Any = _NOT_APPLIED_YET

    def _bind_pending_weights(self) -> None:
        report = self.bind_pending_weights()
        if report is not None:
            self.job.bind_ms += report.bind_ms
            self.lora_fingerprint = _NOT_APPLIED_YET  # new weights (a load also resets A1111's LoRA state): apply again

    def _apply_lora(self) -> None:
        # The first call of the job applies; later calls only when the loaded networks changed (hires fix may
        # activate others). Walking every LoRA-able layer again cost 0.4 ms (SD1.5) / 1.1 ms (SDXL) per step.
        fingerprint = lora_bridge.networks_fingerprint()
        if fingerprint == self.lora_fingerprint:
            return
        self.lora_fingerprint = fingerprint
        options: CompileOptions = self.graph_key.options
        if options.quantization:
            # An int8 graph has its own int8 copy: fuse into the float eager UNet, then bind the copy to it, which
            # re-quantizes exactly the layers whose weights changed since the last bind (0 recompiles). Bind
            # every time, not only when this call changed something: an eager job may already have applied
            # the same LoRA to the float UNet, and then nothing changes here while the int8 copy lacks it.
            report = lora_bridge.apply_networks_to_unet(self.eager, self.eager)
            self.binding.bind(self.eager)
        else:
            report = lora_bridge.apply_networks_to_unet(self.eager, self.captured)
        if report.networks or report.updated_modules or report.dropped_biases:
            STATE.record_lora(report)
            comment = report.comment()
            if comment and comment not in self.job.notices:
                self.job.notices.append(comment)

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                self._bind_pending_weights()
                self._apply_lora()
                call_args, call_kwargs = args, kwargs
                if self.control is not None:  # ControlNet's units, computed as in an eager job
                    controlled = self.control.capture(args, kwargs, self.compiled.entry.residual_unet)
                    call_args, call_kwargs = controlled.arguments()
                traceable = attention.traceable_attention(devices.device.type)
                with lora_bridge.original_forwards(), traceable as replaced:
                    self.job.attention_replaced = self.job.attention_replaced or replaced or ""
                    with STATE.watch_compile(self.compiled.entry, call_args, call_kwargs, show_in_progress_bar):
                        return self.compiled(*call_args, **call_kwargs)
            except Exception as error:  # noqa: BLE001 (any failure of the compiled path must not lose the job)
                self.failed = True
                reason = f"compiled UNet failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                logger.error("OneDiff: %s; finishing this job eagerly\n%s", reason, traceback.format_exc())
                STATE.compiled_call_failures += 1
                STATE.failed_graphs[self.graph_key] = reason
                self.job.accelerated = False
                self.job.notices.append(reason)
        return self.eager(*args, **kwargs)


# A1111 replaces ldm's and sgm's UNetModel.forward with this (modules/sd_unet.py); the compiled graph runs the
# UNet's blocks instead, as that forward does when no other "SD Unet" is selected (checked in _eager_reason)
A1111_UNET_FORWARD = "create_unet_forward.<locals>.UNetModel_forward"


class CompiledControlNetwork(controlnet.NetworkStandIn):
    """A ControlNet unit's control network compiled (its own graph, from ``STATE.control_cache``), standing in
    for it in sd-webui-controlnet's ``PlugableControlModel`` during a compiled call (see
    :meth:`controlnet.ControlNetJob.capture`). The eager network stays its submodule, so ControlNet's device
    moves reach it; if the compiled network fails, the job goes on with the eager one."""

    def __init__(self, lookup: Any, eager: torch.nn.Module, job: JobRecord):
        super().__init__(eager)
        object.__setattr__(self, "lookup", lookup)
        object.__setattr__(self, "job", job)
        self.failed = False

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                traceable = attention.traceable_attention(devices.device.type)
                with lora_bridge.original_forwards(), traceable:
                    with STATE.watch_compile(self.lookup.entry, args, kwargs, show_in_progress_bar):
                        return self.lookup.unet(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 (the unit runs eagerly; the UNet stays compiled)
                self.failed = True
                reason = f"compiled control network failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                logger.error("OneDiff: %s; it runs eagerly for this job\n%s", reason, traceback.format_exc())
                STATE.failed_graphs[self.lookup.entry.key] = reason
                self.job.notices.append(reason)
        return self.eager(*args, **kwargs)


def _eager_reason(sd_model) -> Optional[str]:
    if shared.cmd_opts.lowvram:
        return "--lowvram moves UNet blocks during the forward, which a compiled graph cannot follow"
    if getattr(sd_model, "lowvram", False):  # A1111 sets it for --medvram (and --medvram-sdxl on SDXL)
        return "--medvram moves the UNet between CPU and GPU around each use; not supported yet"
    if sd_unet.current_unet is not None:
        return f"another SD Unet is active ({sd_unet.current_unet_option.label})"
    if isinstance(sd_model.model.diffusion_model, GuardedUNet):
        return "UNet already swapped by a job that is still running"
    unet_class = type(sd_model.model.diffusion_model)
    if unet_class.forward.__qualname__ not in (f"{unet_class.__qualname__}.forward", A1111_UNET_FORWARD):
        return f"{unet_class.__qualname__}.forward was replaced by {unet_class.forward.__qualname__}"
    return None


@dataclasses.dataclass
class _Swap:
    """One model whose UNet a :class:`CompiledSampling` swapped: what to put back, and the graph's counters
    before the swap (for the job's info)."""

    wrapper: Any  # the model's DiffusionWrapper / OpenAIWrapper, holding ``diffusion_model``
    eager: torch.nn.Module
    stand_in: GuardedUNet
    lookup: Any  # compile.graph_cache.Lookup
    first_call: bool  # the graph had not run yet: its first call compiles (or loads) it
    moves_before: int
    recompile_s_before: float


class CompiledSampling:
    """The compiled UNets of one ``p.sample`` call (all denoising of a batch, hires fix included).

    The model loaded when sampling starts gets its compiled UNet (:meth:`start`). The webui may switch models
    in the middle of sampling: the refiner (``sd_samplers_common.apply_refiner``, run by the denoiser before a
    step) calls ``sd_models.reload_model_weights``, which either loads the refiner into the same model object
    (same config: the load goes through the stand-in and is bound to the graph, see
    :class:`unet_swap.EagerUNetView`) or makes another model object current (another config, or one kept
    loaded with ``sd_checkpoints_limit`` > 1). :meth:`follow`, called before every denoiser step, swaps the
    compiled UNet of its structure into such a model too: a refiner of the same structure reuses the job's
    graph with its own weights bound, no compile. Every model gets its eager UNet back in :meth:`finish`.
    """

    def __init__(self, p, job: JobRecord, script_args: ScriptArgs):
        self.p = p
        self.job = job
        self.script_args = script_args
        self.settings = STATE.settings
        self.quantization = ""
        self.swaps: List[_Swap] = []
        self.model = None  # the model the denoiser runs now, and its checkpoint
        self.checkpoint = None
        self.counters_before = (compiled_graph_count(), graph_break_count(),
                                len(STATE.cache.recompile_limit_watcher.messages))

    def start(self) -> None:
        job = self.job
        sd_model = self.p.sd_model
        self.model, self.checkpoint = sd_model, sd_model.sd_checkpoint_info
        reason = _eager_reason(sd_model)
        if reason is None and self.script_args.quantization:
            request = self.settings.quantization
            missing = quantization_unavailable(request)
            if missing:
                job.notices.append(f"{request} requested but {missing}; compiled without it")
            else:
                self.quantization = request
        lookup = control = None
        if reason is None:
            lookup, control, reason = self._lookup(sd_model)
        if lookup is None:
            job.accelerated = False
            job.notices.append(reason)
            logger.warning("OneDiff: generating eagerly: %s", reason)
            return
        job.accelerated = True
        job.backend = lookup.entry.key.backend
        job.graph = lookup.entry.signature.short()
        job.quantization = lookup.entry.binding.weights.mode if self.quantization else ""  # the scheme that ran
        job.cuda_graphs = lookup.entry.cuda_graphs
        job.reused = lookup.reused if job.reused is None else job.reused
        job.from_compile_cache = job.from_compile_cache or (not lookup.reused and bool(lookup.entry.cache_hit))
        self._swap_in(sd_model, lookup, control)

    def _lookup(self, sd_model):
        """(the compiled UNet's lookup for ``sd_model``, ControlNet's hook on it or None, None) or (None, None,
        why it runs eagerly). A UNet whose
        forward another extension replaced runs compiled only when that is ControlNet with units the graph can
        take as residuals (:mod:`controlnet`)."""
        unet = sd_model.model.diffusion_model
        control, reason = controlnet.job_for(unet)
        if control is not None:
            reason = control.eager_reason(controlnet_support())
            self.job.control_units = len(control.units)
        if reason is not None:
            if control is not None:
                self.job.control_eager_reason = reason
            return None, None, reason
        lookup, reason = compiled_unet_lookup(unet, self.job, self.quantization)
        if lookup is not None and control is not None:
            if lookup.entry.residual_unet is None:
                return None, None, "ControlNet needs a UNet of ldm's layout"
            for _holder, network in control.control_networks():
                if id(network) not in control.compiled_networks:  # two units may share one loaded model
                    control.compiled_networks[id(network)] = self._compiled_network(network)
        return lookup, control, reason

    def _compiled_network(self, network: torch.nn.Module) -> Optional[CompiledControlNetwork]:
        """The compiled stand-in of a unit's control network, or None (it then runs eagerly, as in the webui)."""
        try:
            lookup = STATE.control_cache.get(network, self.settings.backend, self.settings.compile_options())
        except Exception as error:  # noqa: BLE001 (the control network stays eager; the UNet is compiled)
            self._note(f"control network eager ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            return None
        if lookup.entry.key in STATE.failed_graphs:
            return None
        if lookup.entry.compile_s is None:
            announce_first_call(lookup.entry)
        self.job.control_networks += 1
        return CompiledControlNetwork(lookup, network, self.job)

    def _swap_in(self, sd_model, lookup, control) -> None:
        entry = lookup.entry
        if entry.compile_s is None:
            announce_first_call(entry)
        self.job.bind_ms += lookup.bind_ms
        wrapper = sd_model.model
        eager = wrapper.diffusion_model
        stand_in = GuardedUNet(lookup.unet, eager, entry.module, self.job, entry.key, entry.binding, control)
        wrapper.diffusion_model = stand_in
        self.swaps.append(_Swap(wrapper, eager, stand_in, lookup, entry.compile_s is None, entry.moves_after_capture,
                                entry.recompile_s))

    def follow(self, sd_model) -> None:
        """Keep the UNet the denoiser runs compiled after the webui switched models (the refiner)."""
        if sd_model is self.model and sd_model.sd_checkpoint_info is self.checkpoint:
            return
        title = sd_model.sd_checkpoint_info.short_title
        switched_object = sd_model is not self.model
        self.model, self.checkpoint = sd_model, sd_model.sd_checkpoint_info
        if not self.job.accelerated:
            self._note(f"refiner {title}: eager")
        elif not switched_object:  # loaded into the model object the job runs, through the stand-in
            self._note(f"refiner {title}: compiled, loaded into graph {self.job.graph}")
        else:
            self._follow_model_object(sd_model, title)

    def _follow_model_object(self, sd_model, title: str) -> None:
        stand_in = sd_model.model.diffusion_model
        for swap in self.swaps:
            if swap.stand_in is stand_in:  # back to a model swapped before: the graph must get its weights again
                stand_in.weights_pending = True
                return
        lookup, control, reason = None, None, _eager_reason(sd_model)
        if reason is None:
            lookup, control, reason = self._lookup(sd_model)
        if lookup is None:
            self._note(f"refiner {title}: eager ({reason})")
            return
        self._swap_in(sd_model, lookup, control)
        how = "reused" if lookup.reused else "new graph"
        self._note(f"refiner {title}: compiled, {how} {lookup.entry.signature.short()}")

    def _note(self, text: str) -> None:
        if text not in self.job.notices:
            self.job.notices.append(text)

    def finish(self) -> None:
        """Put every eager UNet back, also after errors, and write the job's info."""
        for swap in reversed(self.swaps):
            swap.wrapper.diffusion_model = swap.eager
        job = self.job
        for swap in self.swaps:
            entry = swap.lookup.entry
            if swap.first_call and entry.compile_s is not None:
                print(f"OneDiff: {graph_kind(entry)} graph {entry.signature.short()} ready in {entry.compile_s:.1f} s",
                      flush=True)
                if entry.signature.short() == job.graph:
                    job.compile_s = entry.compile_s
            if entry.cache_notice and (swap.first_call or entry.recompile_s > swap.recompile_s_before):
                self._note(entry.cache_notice)  # this job compiled, and the compile cache could not keep it
            job.new_size_compile_s += entry.recompile_s - swap.recompile_s_before
        if self.swaps:
            graphs_before, breaks_before, limit_hits_before = self.counters_before
            job.new_graphs += compiled_graph_count() - graphs_before
            job.graph_breaks += graph_break_count() - breaks_before
            if len(STATE.cache.recompile_limit_watcher.messages) > limit_hits_before:
                job.recompile_limit_hit = True
                job.notices.append("dynamo hit its recompile limit: part of this job ran eagerly (see the status "
                                   "route)")
            if any(swap.lookup.entry.moves_after_capture > swap.moves_before for swap in self.swaps):
                job.notices.append("CUDA graphs re-recorded: the compiled graph's weights were moved to other "
                                   "addresses")
        self.p.extra_generation_params[INFO_KEY] = job.info_text()


def process_images(p, script_args: ScriptArgs):
    """``processing.process_images(p)`` with the compiled UNet swapped in around every ``p.sample`` call."""
    STATE.apply_settings(read_settings())
    STATE.dynamo_recompile_limit = ensure_recompile_limit(STATE.settings.max_graphs)
    job = STATE.start_job()
    original_sample = p.sample  # the bound method; restored by deleting the instance attribute below

    def sample_with_compiled_unet(*args, **kwargs):
        sampling = CompiledSampling(p, job, script_args)
        try:
            sampling.start()
            STATE.active_sampling = sampling
            return original_sample(*args, **kwargs)
        finally:
            STATE.active_sampling = None
            sampling.finish()

    p.sample = sample_with_compiled_unet
    try:
        return processing.process_images(p)
    finally:
        del p.sample
        STATE.finish_job(job)


def on_cfg_denoiser(_params) -> None:
    """Before every denoiser step of every job: a running compiled job follows a model switch (the refiner)."""
    sampling = STATE.active_sampling
    if sampling is not None:
        sampling.follow(shared.sd_model)
