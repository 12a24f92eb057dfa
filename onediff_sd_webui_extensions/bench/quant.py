"""The bench's ``--quant int8|fp8`` section: the quantized compiled UNet against float, with LoRA and a
checkpoint switch. ``scheme`` says what ran on this device (``int8-dynamic``, ``int8-weight-only``,
``fp8-rowwise``, ``fp8-tensorwise``: see ``compile.quantization``).

``max_rel_err`` = max |int8 compiled - float eager| / max |float eager| on the same inputs; the LoRA and switch
errors are the same metric against float eager on the LoRA-fused / switched weights. Graph counts come from
torch's own dynamo counters and must be 0.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional

import torch

from compile import CompileOptions, GraphCache, count_new_graphs
from compile.quantization import INT8, Int8Weights, int8_availability

from .timing import median_ms, progress


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def random_lora_deltas(weights: Int8Weights, rank: int = 16, strength: float = 0.5, seed: int = 3):
    """A rank-``rank`` delta for every quantized attention and feed-forward Linear, ``strength`` times the
    weight's standard deviation (a strong LoRA, so that fused and unfused outputs clearly differ)."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, layer in weights.layers.items():
        if ".attn" not in name and ".ff." not in name:
            continue
        out_features, in_features = layer.master.shape
        delta = torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)
        deltas[name] = delta * (strength * layer.master.float().std() / delta.std())
    return deltas


@torch.no_grad()
def with_deltas(unet: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``unet`` with each delta added to the weight of the Linear it names: the float reference for
    the int8 graph's LoRA. The deltas are made on the CPU in float32 (:func:`random_lora_deltas`, from the CPU
    masters); each goes to its weight's device and dtype, which on a GPU are not the CPU's."""
    patched = copy.deepcopy(unet)
    for name, delta in deltas.items():
        weight = patched.get_submodule(name).weight
        weight.add_(delta.to(weight.device, weight.dtype))
    return patched


@torch.no_grad()
def quant_section(
    unet: torch.nn.Module,
    second: torch.nn.Module,
    inputs,
    backend: str,
    float_compiled_ms: float,
    *,
    options: Optional[CompileOptions] = None,
    warmup: int = 3,
    repeat: int = 10,
    cache: Optional[GraphCache] = None,
    request: str = INT8,
) -> Dict[str, Any]:
    """Compile ``unet`` with quantized Linears (``request``: int8 or fp8) and measure it (see the module
    docstring); ``second`` is a model of the same structure for the switch. Neither module is modified.
    ``cache`` defaults to a cache of its own, so that the quantized graph does not evict the bench's float
    graphs. When the request cannot run here the section says why (``{"unavailable": reason}``) instead of
    failing the bench."""
    first = next(unet.parameters())
    reason = int8_availability(first.device, request, first.dtype)
    if reason is not None:
        return {"unavailable": reason}
    options = CompileOptions(**{**(options or CompileOptions()).as_dict(), "quantization": request})
    cache = cache or GraphCache(max_graphs=1)

    reference = inputs.call(unet)
    lookup = cache.get(unet, backend, options)
    with progress(f"compiling the {request} graph with {backend}"):
        output = inputs.call(lookup.unet)
    step_ms = median_ms(lambda: inputs.call(lookup.unet), first.device, warmup, repeat)
    weights: Int8Weights = lookup.entry.binding.weights
    memory = weights.memory_mb()

    deltas = random_lora_deltas(weights)
    lora_reference = inputs.call(with_deltas(unet, deltas))
    saved = weights.int8_snapshot()
    with count_new_graphs() as lora_graphs:
        weights.fuse_deltas(deltas)
        lora_output = inputs.call(lookup.unet)
        weights.restore()
        inputs.call(lookup.unet)
    restored = weights.matches_snapshot(saved)

    second_reference = inputs.call(second)
    with count_new_graphs() as switch_graphs:
        switched = cache.get(second, backend, options)
        second_output = inputs.call(switched.unet)

    return {
        "scheme": weights.mode,
        "quantized_layers": len(weights.layers),
        "compile_s": round(lookup.entry.compile_s, 2),
        "step_ms": step_ms,
        "speedup_vs_float_compiled": round(float_compiled_ms / step_ms, 3),
        "max_rel_err": _relative_error(output, reference),
        "weight_mb_float": round(memory["float"], 3),
        "weight_mb_int8": round(memory["int8"], 3),
        "lora_new_graphs": lora_graphs.new_graphs,
        "lora_max_rel_err": _relative_error(lora_output, lora_reference),
        "lora_restored_exactly": restored,
        "switch_new_graphs": switch_graphs.new_graphs,
        "switch_max_rel_err": _relative_error(second_output, second_reference),
        "switch_bind_ms": round(switched.bind_ms, 3),
    }
