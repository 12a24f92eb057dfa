"""Control residuals as inputs of a compiled ldm-layout UNet (ldm's ``UNetModel`` for SD1/SD2, sgm's for SDXL).

ControlNet and T2I-Adapter steer a UNet by adding tensors to its activations: an adapter feature after some
input blocks, a ControlNet residual to every skip connection and after the middle block. Compiling a
controller's replacement ``forward`` bakes its per-job state into the graph (and recompiles whenever it
changes); here the residuals are plain inputs of one graph instead. :class:`ResidualUNet` runs the UNet's own
blocks, in the order and with the additions of ldm's ``forward``:

- adapter residual ``k`` after input block ``ADAPTER_BLOCKS[k]`` (SD1/SD2: 2, 5, 8, 11; SDXL: 3, 5, 8 and
  one more after the middle block),
- control residual ``i`` to the skip of input block ``i`` before it is concatenated in the decoder, and the
  last one after the middle block.

Every call passes every residual, zeros where none is given (:meth:`ResidualUNet.zero_residuals`, sized by a
shape-only pass on the ``meta`` device), so the same graph serves jobs with and without control: switching
units on, off, or to other images, weights or models changes input values, never the graph.

The block functions come from the UNet's own module at call time (``timestep_embedding``, ``th.cat``), so a
host's patches to them (A1111 patches both) are traced exactly as its eager forward runs them.
"""

from __future__ import annotations

import collections
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

ADAPTER_BLOCKS = (2, 5, 8, 11)
ADAPTER_BLOCKS_SDXL = (3, 5, 8)  # and the fourth adapter residual after the middle block
_LAYOUT = ("time_embed", "input_blocks", "middle_block", "output_blocks", "out", "model_channels")
_ZEROS_KEPT = 4  # input shapes whose zero residuals are kept (a job and its hires pass, with room to spare)


def is_ldm_layout(module: torch.nn.Module) -> bool:
    """Whether ``module`` is built like ldm's / sgm's UNetModel (the blocks :class:`ResidualUNet` runs)."""
    return all(hasattr(module, name) for name in _LAYOUT) and isinstance(module.input_blocks, torch.nn.ModuleList)


class Residuals(collections.namedtuple("Residuals", "control adapter")):
    """The additive inputs of one call: ``control`` (one per input block's skip, then the middle block) and
    ``adapter`` (one per adapter slot of :attr:`ResidualUNet.adapter_blocks`, then the middle block on SDXL)."""


class ResidualUNet(torch.nn.Module):
    """``unet``'s forward with control residuals as inputs; the module :func:`compile_module` compiles for an
    ldm-layout UNet. ``forward(x, timesteps, context, y, residuals)``; ``residuals=None`` adds nothing (the
    shape pass), compiled calls always pass a :class:`Residuals`."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        blocks = len(unet.input_blocks)
        self.sdxl_adapters = getattr(unet, "num_classes", None) is not None  # SDXL's label embedding (y)
        slots = ADAPTER_BLOCKS_SDXL if self.sdxl_adapters else ADAPTER_BLOCKS
        self.adapter_blocks = tuple(index for index in slots if index < blocks)
        # ldm's forward casts the input to the UNet's dtype, sgm's does not
        self.casts_input = type(unet).__module__.startswith("ldm.")
        self._zeros: "collections.OrderedDict[Tuple, Residuals]" = collections.OrderedDict()

    @property
    def control_count(self) -> int:
        return len(self.unet.input_blocks) + 1

    @property
    def adapter_count(self) -> int:
        return len(self.adapter_blocks) + (1 if self.sdxl_adapters else 0)

    def forward(self, x, timesteps, context=None, y=None, residuals: Optional[Residuals] = None):
        unet = self.unet
        namespace = vars(sys.modules[type(unet).__module__])
        emb = unet.time_embed(namespace["timestep_embedding"](timesteps, unet.model_channels, repeat_only=False))
        if getattr(unet, "num_classes", None) is not None:
            emb = emb + unet.label_emb(y)
        h = x.type(unet.dtype) if self.casts_input else x
        skips = []
        adapter = list(residuals.adapter) if residuals is not None else []
        for index, block in enumerate(unet.input_blocks):
            h = block(h, emb, context)
            if adapter and index in self.adapter_blocks:
                h = h + adapter.pop(0)
            skips.append(h)
        h = unet.middle_block(h, emb, context)
        control = list(residuals.control) if residuals is not None else []
        if control:
            h = h + control.pop()
        if adapter:  # SDXL: the last adapter residual goes after the middle block
            h = h + adapter.pop(0)
        cat = namespace["th"].cat if "th" in namespace else torch.cat
        for block in unet.output_blocks:
            skip = skips.pop()
            h = cat([h, skip + control.pop() if control else skip], dim=1)
            h = block(h, emb, context)
        return unet.out(h.type(x.dtype))

    def call_arguments(self, args: tuple, kwargs: dict) -> tuple:
        """A call of the UNet's forward signature ``(x, timesteps, context, y)`` (other keywords are ignored, as
        ldm's forward ignores them) as the positional arguments of :meth:`forward`; ``residuals=`` is taken
        when given, zeros otherwise."""
        values = dict(zip(("x", "timesteps", "context", "y"), args))
        values.update({name: kwargs[name] for name in ("x", "timesteps", "context", "y") if name in kwargs})
        inputs = tuple(values.get(name) for name in ("x", "timesteps", "context", "y"))
        residuals = kwargs.get("residuals")
        return (*inputs, residuals if residuals is not None else self.zero_residuals(*inputs))

    def zero_residuals(self, x, timesteps, context=None, y=None) -> Residuals:
        """Zeros shaped like every residual of a call with these inputs (kept for the last few input shapes)."""
        key = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in (x, timesteps, context, y))
        if key in self._zeros:
            self._zeros.move_to_end(key)
            return self._zeros[key]
        outputs = self.block_outputs(x, timesteps, context, y)
        control = [torch.zeros(shape, dtype=dtype, device=x.device) for shape, dtype in outputs]
        slots = [*self.adapter_blocks, *([len(outputs) - 1] if self.sdxl_adapters else [])]
        # a tensor of its own per slot: a graph input that aliases another is guarded apart from a real residual
        zeros = Residuals(control, [torch.zeros_like(control[index]) for index in slots])
        self._zeros[key] = zeros
        while len(self._zeros) > _ZEROS_KEPT:
            self._zeros.popitem(last=False)
        return zeros

    def block_outputs(self, x, timesteps, context=None, y=None) -> List[Tuple[torch.Size, torch.dtype]]:
        """(shape, dtype) of every input block's output, then the middle block's, for these inputs: computed on
        the ``meta`` device (shapes only, no arithmetic, no memory), or by an eager call where some block
        cannot run on ``meta`` (one that makes tensors on a fixed device)."""
        recorded: List[Tuple[torch.Size, torch.dtype]] = []

        def record(_module, _inputs, output):
            recorded.append((output.shape, output.dtype))

        blocks = [*self.unet.input_blocks, self.unet.middle_block]
        handles = [block.register_forward_hook(record) for block in blocks]
        try:
            try:
                meta = {name: _on_meta(tensor) for name, tensor in _state(self).items()}
                torch.func.functional_call(self, meta, tuple(_on_meta(t) for t in (x, timesteps, context, y)))
            except Exception:  # noqa: BLE001 (a block that cannot run on meta: measure the shapes eagerly)
                recorded.clear()
                with torch.no_grad():
                    self(x, timesteps, context, y)
        finally:
            for handle in handles:
                handle.remove()
        return recorded


def _state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    return state


def _on_meta(tensor: Any) -> Any:
    """A plain ``meta`` tensor of ``tensor``'s shape and dtype (tensor subclasses, e.g. torchao's int8 weights,
    become plain tensors of their logical shape)."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
