"""Per-job state that extensions put on a UNet is not structure, and a clone never runs an instance's forward."""

import types

import torch

from compile import aliasing_clone, structure_signature


def _unet():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))


def test_an_instance_forward_is_not_structure():
    unet = _unet()
    before = structure_signature(unet)
    unet.forward = lambda x: x  # ControlNet's per-job hook replaces the UNet instance's forward like this
    assert structure_signature(unet) == before


def test_runtime_attributes_named_by_the_host_are_left_out():
    unet = _unet()
    before = structure_signature(unet)
    unet.is_in_high_res_fix = True  # set by sd-webui-controlnet on the UNet during its jobs
    assert structure_signature(unet) != before  # unknown attributes count, unless the host names them
    assert structure_signature(unet, {"is_in_high_res_fix"}) == before


def test_a_clone_drops_instance_forwards_and_rebinds_methods_to_itself():
    unet = _unet()
    unet.forward = types.MethodType(lambda self, x: x * 0, unet)  # an override bound to the original
    inner = unet[1]
    inner.forward = types.MethodType(type(inner).forward, inner)  # a restored forward, bound on the instance
    clone = aliasing_clone(unet)
    assert "forward" not in vars(clone) and "forward" not in vars(clone[1])
    x = torch.randn(3, 4)
    assert torch.equal(clone(x), torch.nn.Sequential.forward(unet, x))  # the class's computation

    unet[0].describe = types.MethodType(lambda self: self, unet[0])
    clone = aliasing_clone(unet)
    assert clone[0].describe() is clone[0]
