"""The bench's "controlnet" section: a UNet step with a ControlNet unit, eager against compiled, and the graphs
compiled when units change (must be 0 once the first controlled call of a shape has run).

- diffusers UNets (the presets, ``--checkpoint``): a random-weight ``ControlNetModel`` built from the UNet's
  config (``ControlNetModel.from_unet``, its zero-initialised output convolutions given small random weights
  so the residuals matter), whose residuals go to the UNet as ``down_block_additional_residuals`` /
  ``mid_block_additional_residual``, as SD.Next's ControlNet pipelines call it. The ControlNet is compiled
  too (its own graph in the same cache); timed: both eager, compiled UNet with the eager ControlNet, both
  compiled.
- the webui's ldm/sgm UNets (``--repositories``): the residuals a ControlNet would give (random, of each
  block's shape) go into the graph the webui's jobs use (:class:`compile.control.ResidualUNet`): the same
  graph as calls without them. The control network itself is sd-webui-controlnet's, which the bench does not
  carry; its time is not in these rows.

Changes counted for new graphs: control images, strengths, a second control model of the same structure
(weights bound in place) and calls without the unit in between; before them, apart, the first strength changes
(diffusers' ControlNet takes the strength as a Python float, which dynamo turns into a symbolic input once).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch

from compile import count_new_graphs
from compile.control import Residuals

from .timing import median_ms


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _randn_like(tensor: torch.Tensor, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(tensor.shape, generator=generator) * scale).to(tensor.device, tensor.dtype)


def _random_controlnet(unet, seed: int):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet).to(device=unet.device, dtype=unet.dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                parameter.copy_(_randn_like(parameter, generator, 0.02))
    return controlnet


def diffusers_section(unet, lookup, inputs, cache, backend, options, device, warmup: int, repeat: int,
                      seed: int = 0) -> Dict[str, Any]:
    """``lookup``: the graph cache's answer for ``unet``; ``inputs``: a :class:`compile.models.UNetInputs`."""
    controlnet = _random_controlnet(unet, seed)
    other_controlnet = _random_controlnet(unet, seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    size = inputs.sample.shape[-1] * 8
    images = [_randn_like(torch.empty(inputs.sample.shape[0], 3, size, size, device=unet.device, dtype=unet.dtype),
                          generator) for _ in range(3)]
    extra = {"added_cond_kwargs": inputs.added_cond_kwargs} if inputs.added_cond_kwargs is not None else {}

    def step(control_model, compiled_unet, image, scale):
        down, mid = control_model(inputs.sample, inputs.timestep, inputs.encoder_hidden_states, controlnet_cond=image,
                                  conditioning_scale=scale, return_dict=False, **extra)
        return compiled_unet(inputs.sample, inputs.timestep, encoder_hidden_states=inputs.encoder_hidden_states,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             return_dict=False, **extra)[0]

    eager = step(controlnet, unet, images[0], 1.0)
    with count_new_graphs() as first_call:
        compiled_unet_only = step(controlnet, lookup.unet, images[0], 1.0)  # the UNet's first call with residuals
    control_lookup = cache.get(controlnet, backend, options)
    both = step(control_lookup.unet, lookup.unet, images[0], 1.0)
    control_compile_s = control_lookup.entry.compile_s

    with count_new_graphs() as strengths:  # a Python float to the ControlNet: dynamo makes it symbolic once
        for scale in (0.3, 0.8, 1.2):
            step(control_lookup.unet, lookup.unet, images[0], scale)
    with count_new_graphs() as changes:
        for image in images[1:]:
            step(control_lookup.unet, lookup.unet, image, 1.0)
        for scale in (0.5, 0.9):
            step(control_lookup.unet, lookup.unet, images[0], scale)
        inputs.call(lookup.unet)  # a call without the unit in between
        other_eager = step(other_controlnet, unet, images[1], 0.8)
        switched = cache.get(other_controlnet, backend, options)  # another control model, same structure
        other_compiled = step(switched.unet, lookup.unet, images[1], 0.8)
    timings = {
        "eager_ms": median_ms(lambda: step(controlnet, unet, images[0], 1.0), device, warmup, repeat),
        "compiled_unet_ms": median_ms(lambda: step(controlnet, lookup.unet, images[0], 1.0), device, warmup, repeat),
        "compiled_ms": median_ms(lambda: step(control_lookup.unet, lookup.unet, images[0], 1.0), device, warmup,
                                 repeat),
    }
    return {
        "control_model": "diffusers ControlNetModel.from_unet (random weights)",
        **timings,
        "speedup": round(timings["eager_ms"] / timings["compiled_ms"], 3),
        "unet_graphs_first_controlled_call": first_call.new_graphs,
        "controlnet_compile_s": None if control_compile_s is None else round(control_compile_s, 2),
        "new_graphs_on_changes": changes.new_graphs,
        "new_graphs_first_strength_changes": strengths.new_graphs,
        "control_model_switch_reused": switched.reused,
        "max_abs_diff": max(_max_abs_diff(compiled_unet_only, eager), _max_abs_diff(both, eager)),
        "switch_max_abs_diff": _max_abs_diff(other_compiled, other_eager),
    }


def webui_unet_section(unet, lookup, inputs, device, warmup: int, repeat: int, seed: int = 0) -> Dict[str, Any]:
    """The webui's UNet (``lookup`` from the graph cache, ``inputs`` a ``compile.webui_unets.WebUIUNetInputs``)
    called with ControlNet-shaped residuals in the graph its plain calls use."""
    residual_unet = lookup.entry.residual_unet
    if residual_unet is None:
        return {"unavailable": "the UNet is not of ldm's layout"}
    args = (inputs.sample, inputs.timestep)
    kwargs = {"context": inputs.context, "y": inputs.y}
    zeros = residual_unet.zero_residuals(*args, inputs.context, inputs.y)
    generator = torch.Generator().manual_seed(seed)

    def residuals(scale: float) -> Residuals:
        return Residuals([_randn_like(z, generator, scale) for z in zeros.control],
                         [_randn_like(z, generator, scale) for z in zeros.adapter])

    unit = residuals(0.1)
    call: Callable[[Residuals], torch.Tensor] = lambda r: lookup.unet(*args, **kwargs, residuals=r)  # noqa: E731
    with count_new_graphs() as changes:
        compiled = call(unit)
        for scale in (0.05, 0.2, 0.0):
            call(residuals(scale))
        lookup.unet(*args, **kwargs)  # without units
    # the eager reference: the UNet's blocks with the same residuals, as ControlNet's forward adds them
    eager = residual_unet(*args, inputs.context, inputs.y, unit)
    return {
        "control_model": "residuals of each block's shape (the webui's ControlNet extension runs the control model)",
        "plain_ms": median_ms(lambda: lookup.unet(*args, **kwargs), device, warmup, repeat),
        "controlled_ms": median_ms(lambda: call(unit), device, warmup, repeat),
        "eager_controlled_ms": median_ms(lambda: residual_unet(*args, inputs.context, inputs.y, unit), device,
                                         warmup, repeat),
        "new_graphs_on_changes": changes.new_graphs,
        "max_abs_diff": _max_abs_diff(compiled, eager),
    }


def format_rows(section: Dict[str, Any]):
    if "unavailable" in section:
        return [("controlnet", f"not run: {section['unavailable']}")]
    if "compiled_ms" in section:
        return [
            ("controlnet step, eager", f"{section['eager_ms']:.2f} ms (ControlNet + UNet)"),
            ("controlnet, UNet compiled", f"{section['compiled_unet_ms']:.2f} ms (ControlNet eager)"),
            ("controlnet, both compiled", f"{section['compiled_ms']:.2f} ms ({section['speedup']:.2f}x), ControlNet "
                                          f"compile {section['controlnet_compile_s']} s"),
            ("controlnet changes", f"new graphs {section['new_graphs_on_changes']} (images, strengths, a second "
                                   f"model, calls without it); before that: UNet's first call with residuals "
                                   f"{section['unet_graphs_first_controlled_call']}, first strength changes "
                                   f"{section['new_graphs_first_strength_changes']}"),
            ("controlnet vs eager", f"max abs diff {section['max_abs_diff']:.2e}, second model "
                                    f"{section['switch_max_abs_diff']:.2e}"),
        ]
    return [
        ("controlnet residuals", f"compiled {section['controlled_ms']:.2f} ms (without: {section['plain_ms']:.2f} ms), "
                                 f"eager {section['eager_controlled_ms']:.2f} ms"),
        ("controlnet changes", f"new graphs {section['new_graphs_on_changes']} (other residuals, none), max abs diff "
                               f"{section['max_abs_diff']:.2e}"),
    ]
