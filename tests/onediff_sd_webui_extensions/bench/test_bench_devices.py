"""Device and dtype placement of the bench's helpers, without a GPU.

A UNet on the ``meta`` device stands in for one on CUDA, in float16 as the bench runs it there. The meta device
alone is not as strict as CUDA: it refuses a CPU tensor in ``a + b`` or ``cat``, but lets ``a.add_(cpu)`` and
``a @ cpu`` through. :class:`RefuseMixedDevices` applies CUDA's rule to every op instead: all tensor operands on
one device (0-d CPU scalars and explicit transfers excepted), and a random generator on the device it fills. A
helper that builds something on the CPU and applies it to the UNet then fails here as it failed on the H100
("Expected all tensors to be on the same device").
"""

import os

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from compile.lora import (LoraFuser, apply_lora_reference, attention_and_ff_modules, ldm_module_name, random_kohya_lora,
                          save_random_kohya_lora)
from compile.models import build_preset, example_inputs, load_checkpoint_unet
from compile.webui_unets import webui_unet_inputs
from onediff_sd_webui_extensions.bench import _perturbed_copy
from onediff_sd_webui_extensions.bench.quant import with_deltas

META = torch.device("meta")
_TRANSFERS = {torch.ops.aten._to_copy, torch.ops.aten.copy_, torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy}


class RefuseMixedDevices(TorchDispatchMode):
    """Raise, as CUDA does, when one op mixes devices."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket not in _TRANSFERS:
            devices = {t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0}
            if kwargs.get("device") is not None:
                devices.add(torch.device(kwargs["device"]))
            generator = kwargs.get("generator")
            if generator is not None and devices and devices != {generator.device}:
                raise RuntimeError(f"{func}: a generator on {generator.device} cannot fill a tensor on {devices}")
            if len(devices) > 1:
                raise RuntimeError(f"Expected all tensors to be on the same device: {func} got {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def placed(tensors, dtype=torch.float16):
    tensors = list(tensors)
    return bool(tensors) and all(t.device == META and t.dtype == dtype for t in tensors)


def meta_unet(preset="tiny"):
    return build_preset(preset, device=META, dtype=torch.float16)


def test_the_stand_in_is_as_strict_as_cuda():
    weight = torch.empty(4, 4, device=META)
    with RefuseMixedDevices():
        weight.add_(torch.randn(4, 4).to(META))  # moved first: fine
        weight.mul_(torch.tensor(2.0))  # a 0-d CPU scalar: CUDA takes it too
        for mixed in (lambda: weight.add_(torch.randn(4, 4)), lambda: weight @ torch.randn(4, 4),
                      lambda: torch.randn(4, generator=torch.Generator(), device=META)):
            with pytest.raises(RuntimeError):
                mixed()


def test_lora_reference_applies_a_cpu_lora_file_to_a_unet_elsewhere():
    unet = meta_unet()
    lora = random_kohya_lora(build_preset("tiny"), rank=4)  # as loaded from a file: on the CPU
    assert all(tensor.device.type == "cpu" for tensor in lora.values())
    with RefuseMixedDevices():
        apply_lora_reference(unet, [(lora, 1.0)])
    assert placed(unet.parameters())


def test_lora_fuser_takes_a_cpu_lora_file_into_a_unet_elsewhere(tmp_path):
    unet = meta_unet()
    path = save_random_kohya_lora(os.path.join(tmp_path, "a.safetensors"), build_preset("tiny"), rank=4)
    fuser = LoraFuser(unet)
    with RefuseMixedDevices():
        fuser.fuse([(fuser.load(path), 1.0)])
        fuser.unfuse()
    assert placed(unet.parameters())


def test_inputs_and_a_second_checkpoint_are_made_where_the_unet_is():
    for preset in ("tiny", "tiny-sdxl"):
        unet = meta_unet(preset)
        with RefuseMixedDevices():
            inputs = example_inputs(unet)
            second = _perturbed_copy(unet, seed=1)
        assert placed([inputs.sample, inputs.timestep, inputs.encoder_hidden_states,
                       *(inputs.added_cond_kwargs or {}).values()])
        assert placed(second.parameters())


def test_int8_lora_reference_adds_cpu_deltas_where_the_unet_is():
    unet = meta_unet()
    names = attention_and_ff_modules(unet)
    deltas = {name: torch.randn(unet.get_submodule(name).weight.shape) for name in names}  # as the CPU masters give
    with RefuseMixedDevices():
        patched = with_deltas(unet, deltas)
    assert patched is not unet and placed(patched.parameters())


def _ldm_checkpoint(folder, unet) -> str:
    """``unet`` (the tiny preset) written as an A1111 checkpoint: ldm key names, with its ldm yaml beside it."""
    state = {}
    for key, tensor in unet.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        state[f"model.diffusion_model.{ldm_module_name(module_name, unet.config)}.{leaf}"] = tensor.contiguous()
    path = os.path.join(folder, "tiny.safetensors")
    save_file(state, path)
    unet_params = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                       attention_resolutions=[1], transformer_depth=1, num_heads=8, context_dim=32)
    config = {"model": {"params": {"unet_config": {"params": unet_params},
                                   "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with open(os.path.join(folder, "tiny.yaml"), "w") as handle:
        yaml.safe_dump(config, handle)
    return path


def test_checkpoint_unet_is_loaded_onto_the_device_and_dtype_asked_for(tmp_path):
    original = build_preset("tiny", seed=5)
    path = _ldm_checkpoint(tmp_path, original)

    unet, description = load_checkpoint_unet(path, dtype=torch.float16, device=META)
    assert description == "tiny.safetensors (config tiny.yaml)"
    assert placed([*unet.parameters(), *unet.buffers()])

    # the same file in float64 on the CPU: every weight is the checkpoint's, converted
    unet, _ = load_checkpoint_unet(path, dtype=torch.float64)
    expected = original.state_dict()
    assert unet.state_dict().keys() == expected.keys()
    assert all(tensor.dtype == torch.float64 and torch.equal(tensor, expected[key].double())
               for key, tensor in unet.state_dict().items())


class _LdmLikeUNet(torch.nn.Module):
    """What :func:`webui_unet_inputs` reads of sgm's SDXL UNetModel: in_channels, a sequential label embedding and
    a cross attention's key projection."""

    in_channels = 4
    num_classes = "sequential"

    def __init__(self):
        super().__init__()
        self.label_emb = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(16, 8)))
        self.block = torch.nn.Module()
        self.block.attn2 = torch.nn.Module()
        self.block.attn2.to_k = torch.nn.Linear(32, 8)


def test_webui_unet_inputs_are_made_where_the_unet_is():
    unet = _LdmLikeUNet().to(META, torch.float16)
    with RefuseMixedDevices():
        inputs = webui_unet_inputs(unet, latent=8)
    assert placed([inputs.sample, inputs.context, inputs.y])
    assert inputs.context.shape == (2, 77, 32) and inputs.y.shape == (2, 16)
    assert inputs.timestep.device == META and inputs.timestep.dtype == torch.long
