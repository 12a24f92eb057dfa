"""Routing a diffusers UNet's calls to its compiled graph for one job (SD.Next's diffusers backend).

SD.Next's pipelines call ``pipe.unet(...)``; SD.Next itself walks the same object by name (LoRA assigns
``network_layer_name`` to ``unet.named_modules()`` and applies networks by those names), rebuilds pipelines
around it (``AutoPipelineFor*.from_pipe`` for img2img and hires) and reads its config, dtype and device. So
the UNet object stays where it is, with its names, attributes and class: only its ``forward`` is routed, by
an instance attribute that :meth:`UNetRouter.remove` deletes again, whatever happened in the job.

Before every compiled call the router gives the graph the UNet's current weights if they changed
(:class:`compile.weight_watch.WeightWatch`): SD.Next applies and removes LoRA by assigning new
``torch.nn.Parameter`` objects, which the graph, reading the storage it captured, would never see. Their
values are copied into that storage (the graph's binding), no graph is compiled; removing the LoRA restores
SD.Next's own weights, which are copied in the same way, so the graph always serves exactly the weights the
eager UNet holds. A change binding cannot express (a layer wrapped, a bias added) or any failure of the
compiled call finishes the job with the eager UNet, with the reason in the job's info.

ControlNet and T2I-Adapter pipelines (SD.Next's Control tab) call the same UNet with control residuals as
optional kwargs; they are inputs of the compiled graph (:func:`graph_call_kwargs` gives every pipeline's calls
one set of kwargs and one memory layout, so a control job adds at most one graph, once).

Nothing here imports SD.Next: it is tested with a plain diffusers UNet.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
import traceback
from typing import Any, Callable, Optional

import torch

from compile.weight_watch import WeightWatch

from ..state import STATE, JobRecord

logger = logging.getLogger("onediff_sd_webui_extensions")


class UNetStructureChanged(RuntimeError):
    """The UNet no longer has the compiled graph's structure (layers wrapped or added during the job)."""


@dataclasses.dataclass
class WeightRebind:
    """Weights the host replaced during a job (SD.Next's LoRA) and written into the graph's storage; recorded
    in the status route as the last LoRA application."""

    tensors: int
    apply_ms: float
    value_check_ms: float

    def as_dict(self):
        return {"host": "sdnext", "tensors": self.tensors, "apply_ms": self.apply_ms,
                "value_check_ms": self.value_check_ms}


class UNetRouter:
    """Sends ``unet``'s calls to ``lookup``'s compiled graph while installed (see the module docstring).

    ``lookup`` is the :class:`compile.graph_cache.Lookup` for ``unet`` (its weights already bound). The first
    call of a float graph also compares values where the UNet does not share the graph's storage (the
    thorough check); later calls run only the quick check. ``show_progress`` gets the text to show while a call
    builds a graph (``STATE.watch_compile``), None when it ends.
    """

    def __init__(self, unet: torch.nn.Module, lookup: Any, job: JobRecord,
                 show_progress: Callable[[Optional[str]], None] = lambda text: None):
        self.unet = unet
        self.lookup = lookup
        self.job = job
        self.show_progress = show_progress
        self.watch = WeightWatch(unet)
        self.optional_kwargs = optional_kwargs(unet)
        self.value_check_pending = not lookup.entry.key.options.quantization  # int8 copies hold other values
        self.failed: Optional[str] = None
        self.compiled_calls = 0
        self.eager_calls = 0

    # --- installing -------------------------------------------------------------------------------------

    def install(self) -> None:
        if "forward" in vars(self.unet):
            raise RuntimeError("the UNet's forward is already replaced (an offload hook or another extension)")
        self.unet.forward = self.forward

    def remove(self) -> None:
        if vars(self.unet).get("forward") == self.forward:
            del self.unet.forward

    # --- calls --------------------------------------------------------------------------------------------

    def _eager(self, *args, **kwargs):
        self.eager_calls += 1
        return type(self.unet).forward(self.unet, *args, **kwargs)

    def sync_weights(self) -> None:
        """Give the graph the UNet's weights where they changed since it last got them."""
        changes = self.watch.quick_changes()
        if changes.structure_changed:
            raise UNetStructureChanged(f"the UNet's structure changed during the job ({changes.describe()})")
        value_check_ms = 0.0
        if self.value_check_pending:
            self.value_check_pending = False
            start = time.perf_counter()
            differing = self.watch.value_changes(self.lookup.entry.module)
            value_check_ms = (time.perf_counter() - start) * 1000.0
            changes.changed.extend(name for name in differing if name not in changes.changed)
        if not changes.changed:
            return
        report = self.lookup.entry.binding.bind(self.unet)
        self.watch.snapshot()
        self.job.bind_ms += report.bind_ms
        STATE.record_lora(WeightRebind(len(changes.changed), report.bind_ms, value_check_ms))
        note = f"{len(changes.changed)} replaced weight tensor(s) (LoRA) written into the graph"
        if note not in self.job.notices:
            self.job.notices.append(note)

    def forward(self, *args, **kwargs):
        if self.failed is None:
            try:
                self.sync_weights()
                args = _contiguous_sample(args, kwargs)
                graph_kwargs = graph_call_kwargs(kwargs, self.optional_kwargs)
                with STATE.watch_compile(self.lookup.entry, args, graph_kwargs, self.show_progress):
                    output = self.lookup.unet(*args, **graph_kwargs)
                self.compiled_calls += 1
                return output
            except UNetStructureChanged as error:
                self._fail(str(error))
            except Exception as error:  # noqa: BLE001 (any failure of the compiled path must not lose the job)
                logger.error("OneDiff: compiled UNet failed; finishing this job eagerly\n%s", traceback.format_exc())
                STATE.compiled_call_failures += 1
                reason = f"compiled UNet failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                STATE.failed_graphs[self.lookup.entry.key] = reason
                self._fail(reason)
        return self._eager(*args, **kwargs)

    def _fail(self, reason: str) -> None:
        self.failed = reason
        self.job.accelerated = False
        if reason not in self.job.notices:
            self.job.notices.append(reason)
        logger.warning("OneDiff: generating eagerly from here: %s", reason)


def _contiguous_sample(args: tuple, kwargs: dict) -> tuple:
    """The call's arguments with the latent ``sample`` in the default memory layout (``kwargs`` updated in place).

    SD.Next's img2img latents come from the VAE encoder in channels-last layout; dynamo guards on strides, so
    they would cost a second graph for the same sizes (measured in SD.Next: "stride mismatch at index 1"). The
    copy is one latent per call."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    sample = kwargs.get("sample")
    if isinstance(sample, torch.Tensor) and not sample.is_contiguous():
        kwargs["sample"] = sample.contiguous()
    return args


# The additive control inputs of diffusers' UNet2DConditionModel.forward: ControlNet residuals (a list per skip
# connection, one tensor after the middle block) and T2I-Adapter features (a list the UNet pops from).
RESIDUAL_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals")


def optional_kwargs(unet: torch.nn.Module) -> frozenset:
    """The keyword parameters of ``unet``'s own forward that default to None (passing None is leaving them out)."""
    try:
        parameters = inspect.signature(type(unet).forward).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(parameter.name for parameter in parameters
                     if parameter.default is None and parameter.kind is not inspect.Parameter.POSITIONAL_ONLY)


def graph_call_kwargs(kwargs: dict, optional: frozenset) -> dict:
    """The kwargs for the compiled call: optional ones given as None left out, control residuals in the default
    memory layout, their lists copied. ``kwargs`` itself is left as it is, for an eager retry.

    Dynamo guards on the set of keyword arguments, and diffusers' pipelines pass different sets for the same
    computation: txt2img and the ControlNet txt2img pipeline pass ``timestep_cond=None``, the ControlNet img2img
    and inpaint pipelines leave it out, the T2I-Adapter pipeline leaves out ``added_cond_kwargs`` (measured in
    SD.Next: "len(kwargs) == 7" failed, a new graph for its img2img control job). Without the Nones, a call's
    set is what it really passes. The first call with control residuals still costs one more graph (they are
    inputs of that graph from then on: other control images, strengths or models change values only). In
    img2img control jobs the ControlNet runs on the channels-last latents and returns channels-last residuals,
    which dynamo would serve with another graph (strides are guarded): they are copied into the default layout,
    as the latents are. Lists are shallow-copied because the UNet pops the adapter features from its list."""
    graph_kwargs = {name: value for name, value in kwargs.items() if value is not None or name not in optional}
    for name in RESIDUAL_KWARGS:
        value = graph_kwargs.get(name)
        if isinstance(value, torch.Tensor):
            graph_kwargs[name] = value if value.is_contiguous() else value.contiguous()
        elif isinstance(value, (list, tuple)):
            graph_kwargs[name] = type(value)(
                item.contiguous() if isinstance(item, torch.Tensor) and not item.is_contiguous() else item
                for item in value)
    return graph_kwargs
