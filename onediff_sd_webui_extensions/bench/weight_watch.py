"""The bench's "replaced weights" section: LoRA applied the way SD.Next applies it (a new ``torch.nn.Parameter``
per layer, ``W + dW``), found by :class:`compile.weight_watch.WeightWatch` and written into the compiled graph's
storage (SD.Next's diffusers backend, :mod:`onediff_sd_webui_extensions.unet_router`).

Reported: the quick check's time per UNet call (what every compiled call pays), the thorough value check, the
rebind of every replaced projection, the graphs compiled by all of it (must be 0), the compiled output against
eager with the LoRA, and whether removing it (SD.Next assigns its own weights back) restored the graph's
storage bit for bit.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from compile import count_new_graphs
from compile.weight_watch import WeightWatch
from compile.weights import tensors_by_name

from .timing import median_ms

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def _projections(unet: torch.nn.Module) -> List[torch.nn.Module]:
    return [module for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(PROJECTIONS)]


def _replace(layers: List[torch.nn.Module], weights: List[torch.Tensor]) -> None:
    for layer, weight in zip(layers, weights):
        layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)


def replaced_weights_section(unet: torch.nn.Module, lookup, inputs, *, rank: int = 16, seed: int = 0,
                             repeat: int = 50) -> Dict[str, Any]:
    """Measure SD.Next-style LoRA on ``unet``, the eager module bound to ``lookup``'s float graph (its tensors
    share the graph's storage). ``unet`` is left with its own weights; ``inputs`` is a UNetInputs."""
    layers = _projections(unet)
    originals = [layer.weight.detach().clone() for layer in layers]
    generator = torch.Generator().manual_seed(seed)
    with_lora = []
    for weight in originals:
        down = torch.randn(rank, weight.shape[1], generator=generator).to(weight) * 0.05
        up = torch.randn(weight.shape[0], rank, generator=generator).to(weight) * 0.05
        with_lora.append(weight + up @ down)
    watch = WeightWatch(unet)
    binding, captured = lookup.entry.binding, lookup.entry.module
    host = torch.device("cpu")  # the checks are host work (wall time) wherever the UNet runs
    quick_ms = median_ms(watch.quick_changes, host, warmup=1, repeat=repeat)
    thorough_ms = median_ms(lambda: watch.value_changes(captured), host, warmup=1, repeat=max(3, repeat // 10))

    rebind_ms, found = [], 0
    with count_new_graphs() as counted:
        for target in (with_lora, originals):
            _replace(layers, target)
            found = len(watch.quick_changes().changed)
            rebind_ms.append(binding.bind(unet).bind_ms)
            watch.snapshot()
            if target is with_lora:
                compiled_output = inputs.call(lookup.unet)
                eager_output = inputs.call(unet)
        inputs.call(lookup.unet)
    captured_tensors = tensors_by_name(captured)
    names = {id(layer): name for name, layer in unet.named_modules()}
    restored_exactly = all(torch.equal(captured_tensors[f"{names[id(layer)]}.weight"], weight)
                           for layer, weight in zip(layers, originals))
    return {
        "layers": len(layers),
        "tensors_found": found,
        "quick_check_ms": quick_ms,
        "value_check_ms": thorough_ms,
        "rebind_ms": round(rebind_ms[0], 3),
        "restore_rebind_ms": round(rebind_ms[1], 3),
        "new_graphs": counted.new_graphs,
        "max_abs_diff": (compiled_output.float() - eager_output.float()).abs().max().item(),
        "restored_exactly": restored_exactly,
    }


def format_rows(section: Dict[str, Any]) -> List[tuple]:
    return [
        ("replaced weights: checks", f"quick {section['quick_check_ms']:.3f} ms per call, "
                                     f"thorough {section['value_check_ms']:.2f} ms"),
        (f"replaced weights: {section['layers']} layers",
         f"rebind {section['rebind_ms']:.1f} ms, restore {section['restore_rebind_ms']:.1f} ms, "
         f"new graphs {section['new_graphs']}, max abs diff vs eager {section['max_abs_diff']:.2e}, "
         f"restored exactly={section['restored_exactly']}"),
    ]
