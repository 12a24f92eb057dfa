"""Device placement of the bench's helpers, without a GPU: a UNet on the ``meta`` device stands in for one on
CUDA. torch refuses to mix a CPU tensor into a meta tensor exactly as it refuses to mix one into a CUDA tensor
("Expected all tensors to be on the same device"), so a helper that builds something on the CPU and applies it
to the UNet fails here as it failed on the H100."""

import os

import torch

from compile.lora import LoraFuser, apply_lora_reference, random_kohya_lora, save_random_kohya_lora
from compile.models import build_preset, example_inputs
from onediff_sd_webui_extensions.bench import _perturbed_copy

META = torch.device("meta")


def on_meta(module_or_tensors):
    tensors = list(module_or_tensors.parameters()) if isinstance(module_or_tensors, torch.nn.Module) else module_or_tensors
    return all(tensor.device == META for tensor in tensors)


def test_lora_reference_applies_a_cpu_lora_file_to_a_unet_elsewhere():
    unet = build_preset("tiny", device=META)
    lora = random_kohya_lora(build_preset("tiny"), rank=4)  # as loaded from a file: on the CPU
    assert all(tensor.device.type == "cpu" for tensor in lora.values())
    apply_lora_reference(unet, [(lora, 1.0)])
    assert on_meta(unet)


def test_lora_fuser_takes_a_cpu_lora_file_into_a_unet_elsewhere(tmp_path):
    unet = build_preset("tiny", device=META)
    path = save_random_kohya_lora(os.path.join(tmp_path, "a.safetensors"), build_preset("tiny"), rank=4)
    fuser = LoraFuser(unet)
    fuser.fuse([(fuser.load(path), 1.0)])
    fuser.unfuse()
    assert on_meta(unet)


def test_inputs_and_a_second_checkpoint_are_made_where_the_unet_is():
    for preset in ("tiny", "tiny-sdxl"):
        unet = build_preset(preset, device=META, dtype=torch.float16)
        inputs = example_inputs(unet)
        tensors = [inputs.sample, inputs.timestep, inputs.encoder_hidden_states, *(inputs.added_cond_kwargs or {}).values()]
        assert on_meta(tensors) and all(tensor.dtype == torch.float16 for tensor in tensors)
        second = _perturbed_copy(unet, seed=1)
        assert on_meta(second) and second.dtype == torch.float16
