"""sd-webui-controlnet (Mikubill) units in compiled jobs: their residuals become inputs of the UNet's graph.

For each job, ControlNet's ``UnetHook.hook`` (``scripts/hook.py``) replaces the UNet *instance's* ``forward``
with a new closure (``forward_webui``). That forward first computes every unit's contribution (it runs the
control models, applies weights, soft injection, guidance start/end, control modes, masks) into residual lists,
then runs the UNet's blocks itself, adding them. Compiling that forward would bake one job's hook into the
graph. Instead, before every compiled call, :meth:`ControlNetJob.capture` runs ControlNet's own forward with a
stand-in for the UNet whose time embedding, the first block the UNet body calls, stops it there and hands
over the forward's locals: the inputs as ControlNet changed them (``x``, ``context``, ``y``), the residual
lists and the inpainting channel flag. The compiled graph then computes the body with those residuals as
inputs (:class:`compile.control.ResidualUNet`): one graph for jobs with and without units.

The seam is that forward's code: its name, where it reaches the UNet body, and the names of those locals.
:func:`support` checks them (and the version) once ControlNet is loaded; a ControlNet whose forward differs
runs its jobs eagerly with the reason, never half-understood. Units whose effect is not a residual (reference
and other attention injection, IP-Adapter, ControlLLLite, revision, style adapters), post-processing that needs
the UNet's output (colorfix, inpaint_only) and ControlNet's batch options run eagerly too, with the reason.

Nothing from ControlNet is imported: its modules are found through the hook it installed or ``sys.modules``.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from typing import Any, Dict, List, Optional, Tuple

import torch

from compile.control import Residuals, ResidualUNet

TESTED_VERSIONS = ("v1.1.455",)
HOOK_MODULE = "scripts.hook"  # sd-webui-controlnet's scripts/ folder is imported as the package ``scripts``
VERSION_MODULE = "scripts.controlnet_version"
FORWARD_QUALNAME = "UnetHook.hook.<locals>.forward_webui"
# what the seam reads from ControlNet's inner forward when it reaches the UNet body
BODY_LOCALS = ("x", "timesteps", "context", "y", "total_controlnet_embedding", "total_t2i_adapter_embedding",
               "require_inpaint_hijack")
# unit types whose whole effect is the residuals the body adds (ControlModelType names)
RESIDUAL_UNIT_TYPES = ("ControlNet", "ControlLoRA", "ControlNetUnion", "T2I_Adapter")
# units whose control network runs at every step (a T2I-Adapter runs once per job and caches its features)
PER_STEP_UNIT_TYPES = ("ControlNet", "ControlLoRA", "ControlNetUnion")
# preprocessors whose post-processing reads the UNet's output inside ControlNet's forward
OUTPUT_POST_PROCESSING = ("colorfix", "inpaint_only")
# attributes ControlNet leaves on the UNet and its blocks as per-job state (for the graph cache's signature)
RUNTIME_ATTRIBUTES = frozenset({
    "cond_mark", "is_in_high_res_fix", "current_sampling_percent", "current_h_shape",  # the UNet, every job
    "bank", "style_cfgs", "attn_weight", "mean_bank", "var_bank", "gn_weight", "original_forward_cn_hijack",
    "lllite_list",  # blocks, once a reference / ControlLLLite unit ran
})


@dataclasses.dataclass(frozen=True)
class Support:
    """Whether the loaded sd-webui-controlnet's units can run compiled, and why not."""

    loaded: bool
    version: str = ""
    problem: str = ""  # empty when its units run compiled

    def describe(self) -> str:
        if not self.loaded:
            return "not loaded"
        return f"{self.version}: " + (f"units run eagerly ({self.problem})" if self.problem else "units run compiled")


def _inner_forward_code(hook_class) -> Optional[types.CodeType]:
    """The code of ``forward``, the function ``UnetHook.hook`` defines that runs the UNet body."""
    return next((const for const in hook_class.hook.__code__.co_consts
                 if isinstance(const, types.CodeType) and const.co_name == "forward"), None)


def support(modules: Optional[Dict[str, Any]] = None) -> Support:
    """Check the loaded sd-webui-controlnet against the seam (run once its scripts are loaded)."""
    modules = sys.modules if modules is None else modules
    hook_module = modules.get(HOOK_MODULE)
    hook_class = getattr(hook_module, "UnetHook", None)
    if hook_class is None:
        return Support(loaded=False)
    version = str(getattr(modules.get(VERSION_MODULE), "version_flag", "unknown version"))
    code = _inner_forward_code(hook_class)
    if code is None:
        return Support(True, version, "its UnetHook.hook has no inner forward")
    missing = [name for name in BODY_LOCALS if name not in code.co_varnames]
    if missing:
        return Support(True, version, f"its hooked forward has no local {', '.join(missing)}")
    if version not in TESTED_VERSIONS:
        return Support(True, version, f"not tested with this version (tested: {', '.join(TESTED_VERSIONS)})")
    return Support(True, version)


def is_controlnet_forward(forward: Any) -> bool:
    return getattr(getattr(forward, "__func__", None), "__qualname__", "") == FORWARD_QUALNAME


def replaced_forward(module: torch.nn.Module) -> Optional[Any]:
    """An instance-level forward that computes something else than the module's class: another extension's
    patch. A forward put back as the instance's own bound class method (ControlNet restores them that way)
    is the class's computation."""
    forward = vars(module).get("forward")
    if forward is None:
        return None
    if isinstance(forward, types.MethodType) and forward.__self__ is module and \
            forward.__func__ is getattr(type(module).forward, "__func__", type(module).forward):
        return None
    return forward


def _describe(function: Any) -> str:
    function = getattr(function, "__func__", function)
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


class _BodyReached(BaseException):
    """Raised by the stand-in's time embedding: ControlNet's forward reached the UNet body. A BaseException, so
    ControlNet's ``except Exception`` (which moves every control model to the CPU) does not take it."""

    def __init__(self, body_locals: Dict[str, Any]):
        super().__init__("ControlNet reached the UNet body")
        self.body_locals = body_locals


class _UNetStandIn:
    """``self`` for ControlNet's forward: attribute reads go to the UNet and writes land on it (ControlNet keeps
    per-job state there), except the time embedding, whose call ends the forward with its locals."""

    def __init__(self, unet: torch.nn.Module, body_code: types.CodeType):
        object.__setattr__(self, "_unet", unet)
        object.__setattr__(self, "_body_code", body_code)

    def __getattr__(self, name: str) -> Any:
        if name == "time_embed":
            return self._stop
        return getattr(self._unet, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._unet, name, value)

    def _stop(self, _t_emb) -> None:
        frame = sys._getframe(1)
        if frame.f_code is not self._body_code:
            raise RuntimeError(f"the UNet's time embedding was called from {frame.f_code.co_name}, not ControlNet's forward")
        values = frame.f_locals
        raise _BodyReached({name: values[name] for name in BODY_LOCALS})


class NetworkStandIn(torch.nn.Module):
    """What takes a control network's place in its ``PlugableControlModel`` for a compiled call: the network
    is its submodule ``eager`` (ControlNet's device moves reach it) and its attributes read through
    (ControlNet reads ``input_blocks`` of the network it holds to recognise inpainting UNets)."""

    def __init__(self, eager: torch.nn.Module):
        super().__init__()
        self.eager = eager

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["eager"], name)


@dataclasses.dataclass
class ControlledCall:
    """A compiled call's inputs as ControlNet prepared them, its residuals aligned to the graph's slots."""

    x: torch.Tensor
    timesteps: torch.Tensor
    context: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    residuals: Residuals

    def arguments(self) -> Tuple[tuple, dict]:
        """(args, kwargs) for the compiled UNet."""
        return (self.x, self.timesteps), {"context": self.context, "y": self.y, "residuals": self.residuals}


class ControlNetJob:
    """ControlNet's hook on the UNet of one job: whether its units can run compiled, and their residuals."""

    def __init__(self, unet: torch.nn.Module, forward: Any):
        self.unet = unet
        self.forward = forward
        self.hook_globals = forward.__func__.__globals__
        closure = inspect.getclosurevars(forward.__func__).nonlocals
        self.outer = closure.get("outer")  # the UnetHook
        self.inner = closure.get("forward")
        self.body_code = getattr(self.inner, "__code__", None)
        self.replaced_block: Optional[str] = None  # a block's forward another patch replaced, in words
        self.compiled_networks: Dict[int, torch.nn.Module] = {}  # id(control network) -> its compiled stand-in

    @property
    def units(self) -> List[Any]:
        return list(getattr(self.outer, "control_params", None) or [])

    def eager_reason(self, support_now: Support) -> Optional[str]:
        """Why this job's units cannot run compiled, in a few words; None when they can."""
        if support_now.problem:
            return f"ControlNet {support_now.version} not supported: {support_now.problem}"
        if self.outer is None or self.body_code is None or any(name not in self.body_code.co_varnames for name in BODY_LOCALS):
            return "ControlNet's hook is not the one checked at start-up"
        for unit in self.units:
            kind = getattr(getattr(unit, "control_model_type", None), "name", "unknown")
            if kind not in RESIDUAL_UNIT_TYPES:
                return f"ControlNet {kind} units change the UNet's attention or inputs; run eagerly"
            preprocessor = str((getattr(unit, "preprocessor", None) or {}).get("name", ""))
            if any(marker in preprocessor for marker in OUTPUT_POST_PROCESSING):
                return f"ControlNet preprocessor {preprocessor} post-processes the UNet's output; runs eagerly"
        if getattr(self.outer, "attn_module_list", None) or getattr(self.outer, "gn_module_list", None):
            return "ControlNet patched attention or normalisation (reference / style align) runs eagerly"
        if inspect.getclosurevars(self.inner).nonlocals.get("batch_option_uint_separate"):
            return "ControlNet batch option 'separate units' runs eagerly"
        batch = self.hook_globals.get("batch_hijack") or sys.modules.get("scripts.batch_hijack")
        if getattr(getattr(batch, "instance", None), "is_batch", False):
            return "ControlNet batch mode runs eagerly"
        return self.replaced_block

    def control_networks(self) -> List[Tuple[Any, torch.nn.Module]]:
        """(holder, network) for each unit whose control network runs every step: sd-webui-controlnet's
        ``PlugableControlModel`` and the ``ControlNet`` module in its ``control_model``. Not with ControlNet's
        per-unit low-VRAM option, which moves the network between devices around each step."""
        if getattr(self.outer, "lowvram", False):
            return []
        found = []
        for unit in self.units:
            holder = getattr(unit, "control_model", None)
            network = getattr(holder, "control_model", None)
            kind = getattr(getattr(unit, "control_model_type", None), "name", "")
            if kind in PER_STEP_UNIT_TYPES and isinstance(network, torch.nn.Module):
                found.append((holder, network))
        return found

    def capture(self, args: tuple, kwargs: dict, residual_unet: ResidualUNet) -> ControlledCall:
        """Run ControlNet's forward up to the UNet body and return the compiled call it asks for. Control
        networks with a compiled stand-in (:attr:`compiled_networks`) run it for this call."""
        swapped = []
        try:
            for holder, network in self.control_networks():
                stand_in = self.compiled_networks.get(id(network))
                if stand_in is not None:
                    holder.control_model = stand_in
                    swapped.append((holder, network))
            self.forward.__func__(_UNetStandIn(self.unet, self.body_code), *args, **kwargs)
        except _BodyReached as reached:
            found = reached.body_locals
        else:
            raise RuntimeError("ControlNet's forward returned without reaching the UNet body")
        finally:
            for holder, network in swapped:
                holder.control_model = network
        # ControlNet strips its cond/uncond mark as a view (``context[:, 1:]``): the graph guards on strides,
        # so the inputs are passed in the contiguous layout the webui's plain calls have
        x, timesteps, context, y = (_contiguous(found[name]) for name in ("x", "timesteps", "context", "y"))
        zeros = residual_unet.zero_residuals(x, timesteps, context, y)
        control = list(found["total_controlnet_embedding"])
        if len(control) < len(zeros.control):
            raise RuntimeError(f"ControlNet gave {len(control)} residuals for a UNet with {len(zeros.control)} slots")
        # ControlNet pops from the end: the last one goes after the middle block, the ones before it to the skips
        control = control[len(control) - len(zeros.control):]
        adapter = list(found["total_t2i_adapter_embedding"])[:len(zeros.adapter)]
        inpaint = bool(found["require_inpaint_hijack"])
        aligned = Residuals([self._aligned(zero, value, inpaint) for zero, value in zip(zeros.control, control)],
                            [self._aligned(zero, value, inpaint) for zero, value in zip(zeros.adapter, adapter)])
        return ControlledCall(x, timesteps, context, y, aligned)

    def _aligned(self, zero: torch.Tensor, value: Any, inpaint: bool) -> torch.Tensor:
        """``value`` as a full tensor of the slot's shape: ControlNet's own ``aligned_adding`` onto zeros
        (channel padding for inpainting UNets, resizing, broadcasting), in the graph's dtype."""
        if isinstance(value, float):
            if value != 0.0:
                raise RuntimeError("ControlNet gave a non-zero constant residual")
            return zero
        return self.hook_globals["aligned_adding"](zero, value, inpaint).to(zero.dtype)


def _contiguous(value: Any) -> Any:
    return value.contiguous() if isinstance(value, torch.Tensor) else value


def job_for(unet: torch.nn.Module) -> Tuple[Optional[ControlNetJob], Optional[str]]:
    """(ControlNet's hook on ``unet`` for this job, None), (None, None) for a plain UNet, or (None, why the job
    must run eagerly) when its forward or a block's was replaced by something else. With ControlNet's hook,
    a replaced block is left for :meth:`ControlNetJob.eager_reason` to report after the units' own reasons
    (ControlNet's reference units replace blocks' forwards)."""
    job = None
    forward = replaced_forward(unet)
    if forward is not None:
        if not is_controlnet_forward(forward):
            return None, f"the UNet's forward was replaced by {_describe(forward)}"
        job = ControlNetJob(unet, forward)
    for name, module in unet.named_modules():
        if name and replaced_forward(module) is not None:
            reason = f"{name}.forward was replaced by {_describe(vars(module)['forward'])}"
            if job is None:
                return None, reason
            job.replaced_block = reason
            break
    return job, None

