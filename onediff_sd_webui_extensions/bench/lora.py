"""The bench's "lora" section: a rank-16 kohya LoRA on every attention and feed-forward projection, fused in
place into the weights a compiled UNet captured.

Reported: median fuse / switch / unfuse times, the graphs compiled by all of it (must be 0), the compiled
fused output against eager on reference-patched weights, and whether unfusing restored every tensor bit for
bit.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
from typing import Any, Dict

import torch

from compile import count_new_graphs
from compile.lora import LoraFuser, apply_lora_reference, random_kohya_lora, save_random_kohya_lora
from compile.weights import tensors_by_name


def _same_tensors(module: torch.nn.Module, other: torch.nn.Module) -> bool:
    theirs = tensors_by_name(other)
    return all(torch.equal(tensor, theirs[name]) for name, tensor in tensors_by_name(module).items())


def lora_section(unet: torch.nn.Module, compiled_unet, inputs, *, rank: int = 16, seed: int = 0,
                 repeat: int = 5) -> Dict[str, Any]:
    """Measure LoRA fusing into ``compiled_unet``.

    ``unet`` must be the module whose tensors ``compiled_unet`` captured (``CompiledUNet.eager``), holding
    LoRA-free weights; it is left as it was. ``inputs`` is a :class:`compile.models.UNetInputs`. Each of
    ``repeat`` rounds fuses LoRA A (weight 1), switches to LoRA B (weight 0.5) and unfuses, calling the
    compiled UNet after every step so that any recompile would be counted. Needs one extra copy of the UNet
    in memory (the eager reference).
    """
    pristine = copy.deepcopy(unet)
    fuser = LoraFuser(unet)
    with tempfile.TemporaryDirectory() as folder:  # through files, as a host loads them
        path_a = save_random_kohya_lora(os.path.join(folder, "bench_a.safetensors"), unet, rank=rank, seed=seed)
        path_b = save_random_kohya_lora(os.path.join(folder, "bench_b.safetensors"), unet, rank=rank, seed=seed + 1)
        network_a, network_b = fuser.load(path_a), fuser.load(path_b)
    fuse_ms, switch_ms, unfuse_ms = [], [], []
    with count_new_graphs() as counted:
        for _ in range(repeat):
            fuse_ms.append(fuser.fuse([(network_a, 1.0)]).ms)
            inputs.call(compiled_unet)
            switch_ms.append(fuser.fuse([(network_b, 0.5)]).ms)
            inputs.call(compiled_unet)
            unfuse_ms.append(fuser.unfuse().ms)
            inputs.call(compiled_unet)
        fuser.fuse([(network_a, 1.0)])
        fused_output = inputs.call(compiled_unet)
        fuser.unfuse()
        inputs.call(compiled_unet)
    restored_exactly = _same_tensors(unet, pristine)

    apply_lora_reference(pristine, [(random_kohya_lora(unet, rank=rank, seed=seed), 1.0)])
    eager_output = inputs.call(pristine)
    return {
        "fuse_ms": round(statistics.median(fuse_ms), 3),
        "switch_ms": round(statistics.median(switch_ms), 3),
        "unfuse_ms": round(statistics.median(unfuse_ms), 3),
        "new_graphs": counted.new_graphs,
        "max_abs_diff": (fused_output.float() - eager_output.float()).abs().max().item(),
        "restored_exactly": restored_exactly,
        "modules": len(network_a.modules),
        "rank": rank,
    }
