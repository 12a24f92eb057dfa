"""The ControlNet seam (a1111/controlnet.py) against a stand-in for sd-webui-controlnet's ``UnetHook``.

The stand-in below is shaped like ``scripts/hook.py`` of v1.1.455 where the seam reads it: ``UnetHook.hook``
sets the UNet instance's ``forward`` to a ``forward_webui`` closure over an inner ``forward`` that computes the
units' residuals into ``total_controlnet_embedding`` / ``total_t2i_adapter_embedding`` and then runs the UNet
body itself, adding them. Its eager result is the reference: the residuals the seam captures, run through
:class:`compile.control.ResidualUNet`, must give the same output. The real extension is exercised by the
integration tests."""

import enum
import sys
import types

import pytest
import torch
from toy_ldm import ToyUNet, timestep_embedding

from compile.control import ResidualUNet
from onediff_sd_webui_extensions.a1111 import controlnet


class ControlModelType(enum.Enum):
    ControlNet = "ControlNet"
    T2I_Adapter = "T2I_Adapter"
    IPAdapter = "IPAdapter"


def aligned_adding(base, x, require_channel_alignment):
    """ControlNet's: a float 0.0 adds nothing; a tensor is resized to the base's size before adding."""
    if isinstance(x, float):
        return base if x == 0.0 else base + x
    if x.shape[-2:] != base.shape[-2:] and (x.shape[-1] > 1 or x.shape[-2] > 1):
        x = torch.nn.functional.interpolate(x, size=base.shape[-2:], mode="nearest")
    return base + x


class Unit:
    def __init__(self, kind, features, weight=1.0, preprocessor="none", control_model=None):
        self.control_model_type = kind
        self.features = features  # the residuals a control model would compute: one per slot
        self.control_model = control_model  # or a holder whose control network computes them
        self.weight = weight
        self.preprocessor = {"name": preprocessor}
        self.guidance_stopped = False


class UnetHook:
    def hook(self, model, control_params, batch_option_uint_separate=False):
        outer = self
        self.control_params = control_params
        self.attn_module_list, self.gn_module_list = [], []

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            context = context[:, 1:, :]  # ControlNet strips its cond/uncond mark token: a view, not contiguous
            total_t2i_adapter_embedding = [0.0] * 4
            total_controlnet_embedding = [0.0] * 13
            require_inpaint_hijack = False
            for param in outer.control_params:
                if param.guidance_stopped:
                    continue
                target = (total_controlnet_embedding if param.control_model_type == ControlModelType.ControlNet
                          else total_t2i_adapter_embedding)
                if param.control_model is not None:  # as ControlNet: reads the held network, then calls the holder
                    assert param.control_model.control_model.input_blocks
                    features = param.control_model(x=x)
                else:
                    features = param.features
                for index, feature in enumerate(features):
                    if batch_option_uint_separate:  # ControlNet zeroes other units' batch items here
                        feature = feature.clone()
                    target[index] = feature * param.weight + target[index]
            self.is_in_high_res_fix = False  # per-job state ControlNet writes on the UNet
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
            hs, h = [], x
            for index, module in enumerate(self.input_blocks):
                h = module(h, emb, context)
                if index in [2, 5, 8, 11]:
                    h = aligned_adding(h, total_t2i_adapter_embedding.pop(0), require_inpaint_hijack)
                hs.append(h)
            h = self.middle_block(h, emb, context)
            h = aligned_adding(h, total_controlnet_embedding.pop(), require_inpaint_hijack)
            for module in self.output_blocks:
                h = torch.cat([h, aligned_adding(hs.pop(), total_controlnet_embedding.pop(), require_inpaint_hijack)], 1)
                h = module(h, emb, context)
            return self.out(h.type(x.dtype))

        def forward_webui(*args, **kwargs):
            try:
                return forward(*args, **kwargs)
            except Exception as error:  # ControlNet moves its models to the CPU here
                outer.moved_to_cpu = True
                raise error

        model._original_forward = model.forward
        model.forward = forward_webui.__get__(model, type(model))


@pytest.fixture()
def hook_modules(monkeypatch):
    """This test module registered as ControlNet's ``scripts.hook`` (the seam finds the real one there)."""
    this = sys.modules[__name__]
    modules = {controlnet.HOOK_MODULE: this, controlnet.VERSION_MODULE: types.SimpleNamespace(version_flag="v1.1.455")}
    monkeypatch.setattr(controlnet, "RESIDUAL_UNIT_TYPES", ("ControlNet", "T2I_Adapter"))
    return modules


def _inputs(seed=0):
    """x, timesteps and a context with ControlNet's mark token in front (its forward strips it)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([999.0, 500.0]),
            torch.randn(2, 8, 8, generator=generator))


def _unmarked(inputs):
    return inputs[0], inputs[1], inputs[2][:, 1:, :]


def _units(toy, inputs, seed=1):
    """A ControlNet unit with a residual for the middle block and the last skips, the rest 0.0 as when a
    control model has fewer outputs, and an adapter unit with coarse features ControlNet resizes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [shape for shape, _ in ResidualUNet(toy).block_outputs(*_unmarked(inputs))]
    control = [0.0] * 6 + [torch.randn(shape, generator=generator) for shape in shapes]  # 13 slots, as in SD1
    adapter = [torch.randn(shapes[2][0], shapes[2][1], 4, 4, generator=generator),
               torch.randn(shapes[5], generator=generator)]
    return [Unit(ControlModelType.ControlNet, control, weight=0.7), Unit(ControlModelType.T2I_Adapter, adapter)]


def _hooked(units, **hook_options):
    torch.manual_seed(0)
    toy = ToyUNet().eval()
    UnetHook().hook(toy, units(toy) if callable(units) else units, **hook_options)
    return toy


def test_support_names_the_version_and_checks_the_forwards_locals(hook_modules):
    assert controlnet.support(hook_modules) == controlnet.Support(True, "v1.1.455")
    assert controlnet.support({}).loaded is False
    other = dict(hook_modules, **{controlnet.VERSION_MODULE: types.SimpleNamespace(version_flag="v1.2.0")})
    assert "not tested with this version" in controlnet.support(other).problem


def test_support_refuses_a_forward_without_the_locals_it_reads(hook_modules, monkeypatch):
    monkeypatch.setattr(controlnet, "BODY_LOCALS", controlnet.BODY_LOCALS + ("hint_residuals",))
    assert controlnet.support(hook_modules).problem == "its hooked forward has no local hint_residuals"


def test_captured_residuals_give_controlnets_own_output(hook_modules):
    inputs = _inputs()
    toy = _hooked(lambda unet: _units(unet, inputs))
    job, reason = controlnet.job_for(toy)
    assert reason is None and job is not None
    assert job.eager_reason(controlnet.support(hook_modules)) is None
    expected = toy(inputs[0], inputs[1], context=inputs[2])  # ControlNet's forward, eagerly
    residual_unet = ResidualUNet(toy)
    call = job.capture((inputs[0], inputs[1]), {"context": inputs[2]}, residual_unet)
    args, kwargs = call.arguments()
    assert kwargs["context"].is_contiguous()  # as the webui's plain calls: the graph guards on strides
    assert torch.allclose(residual_unet(*args, kwargs["context"], kwargs["y"], kwargs["residuals"]), expected,
                          atol=1e-5)
    plain = residual_unet(*_unmarked(inputs))  # the same UNet without units differs
    assert not torch.allclose(plain, expected, atol=1e-3)
    assert not getattr(job.outer, "moved_to_cpu", False)  # stopping the forward is not an error to ControlNet


def test_units_that_stopped_guiding_give_zero_residuals(hook_modules):
    inputs = _inputs()
    toy = _hooked(lambda unet: _units(unet, inputs))
    job, _ = controlnet.job_for(toy)
    for unit in job.units:
        unit.guidance_stopped = True
    residual_unet = ResidualUNet(toy)
    call = job.capture((inputs[0], inputs[1]), {"context": inputs[2]}, residual_unet)
    assert all(torch.count_nonzero(r) == 0 for r in [*call.residuals.control, *call.residuals.adapter])
    assert torch.equal(toy(inputs[0], inputs[1], context=inputs[2]), ToyUNet.forward(toy, *_unmarked(inputs)))


@pytest.mark.parametrize("change, reason", [
    (lambda job: setattr(job.units[0], "control_model_type", ControlModelType.IPAdapter),
     "ControlNet IPAdapter units change the UNet's attention or inputs; run eagerly"),
    (lambda job: job.units[0].preprocessor.update(name="inpaint_only+lama"),
     "ControlNet preprocessor inpaint_only+lama post-processes the UNet's output; runs eagerly"),
    (lambda job: job.outer.attn_module_list.append(object()),
     "ControlNet patched attention or normalisation (reference / style align) runs eagerly"),
])
def test_units_that_are_not_residuals_run_eagerly_with_the_reason(hook_modules, change, reason):
    inputs = _inputs()
    job, _ = controlnet.job_for(_hooked(lambda unet: _units(unet, inputs)))
    change(job)
    assert job.eager_reason(controlnet.support(hook_modules)) == reason


def test_the_separate_units_batch_option_runs_eagerly(hook_modules):
    inputs = _inputs()
    job, _ = controlnet.job_for(_hooked(lambda unet: _units(unet, inputs), batch_option_uint_separate=True))
    assert job.eager_reason(controlnet.support(hook_modules)) == "ControlNet batch option 'separate units' runs eagerly"


def test_other_forward_replacements_run_eagerly_and_restored_ones_do_not():
    torch.manual_seed(0)
    toy = ToyUNet().eval()
    assert controlnet.job_for(toy) == (None, None)
    block = toy.input_blocks[1]
    block.forward = types.MethodType(type(block).forward, block)  # put back as ControlNet restores it
    assert controlnet.job_for(toy) == (None, None)
    block.forward = types.MethodType(lambda self, h, emb, context: h, block)
    job, reason = controlnet.job_for(toy)
    assert job is None and reason.startswith("input_blocks.1.forward was replaced by")
    toy.forward = lambda *args, **kwargs: None
    assert controlnet.job_for(toy)[1].startswith("the UNet's forward was replaced by")


def test_a_block_replaced_beside_controlnets_hook_is_reported_by_the_job(hook_modules):
    """ControlNet's reference units replace blocks' forwards: the job reports the unit's reason first, and a
    replaced block only when no unit explains it."""
    inputs = _inputs()
    toy = _hooked(lambda unet: _units(unet, inputs))
    block = toy.input_blocks[4]
    block.forward = types.MethodType(lambda self, h, emb, context: h, block)
    job, reason = controlnet.job_for(toy)
    assert reason is None
    assert job.eager_reason(controlnet.support(hook_modules)).startswith("input_blocks.4.forward was replaced by")
    job.units[0].control_model_type = ControlModelType.IPAdapter
    assert job.eager_reason(controlnet.support(hook_modules)).startswith("ControlNet IPAdapter units")


class Holder(torch.nn.Module):
    """Shaped like sd-webui-controlnet's PlugableControlModel: the network in ``control_model``."""

    def __init__(self, network):
        super().__init__()
        self.control_model = network

    def forward(self, *args, **kwargs):
        return self.control_model(*args, **kwargs)


class FixedNetwork(torch.nn.Module):
    """A control network that returns given residuals (scaled by a weight, so it has a parameter)."""

    def __init__(self, residuals):
        super().__init__()
        self.residuals = residuals
        self.gain = torch.nn.Parameter(torch.ones(()))

    input_blocks = "the network's blocks"  # ControlNet reads attributes of the network it holds

    def forward(self, x):
        return [r * self.gain if isinstance(r, torch.Tensor) else r for r in self.residuals]


class Recording(controlnet.NetworkStandIn):
    """Stands in for a compiled network as the webui's CompiledControlNetwork does, counting calls."""

    def __init__(self, network):
        super().__init__(network)
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.eager(*args, **kwargs)


def test_a_controlnets_network_runs_its_compiled_stand_in_during_the_call(hook_modules):
    inputs = _inputs()
    units = []

    def make_units(unet):
        control = _units(unet, inputs)[0]
        holder = Holder(FixedNetwork(control.features))
        units.append(Unit(ControlModelType.ControlNet, None, weight=0.7, control_model=holder))
        return units

    toy = _hooked(make_units)
    expected = toy(inputs[0], inputs[1], context=inputs[2])
    job, _ = controlnet.job_for(toy)
    [(holder, network)] = job.control_networks()
    stand_in = job.compiled_networks[id(network)] = Recording(network)
    residual_unet = ResidualUNet(toy)
    call = job.capture((inputs[0], inputs[1]), {"context": inputs[2]}, residual_unet)
    args, kwargs = call.arguments()
    assert stand_in.calls == 1 and holder.control_model is network  # swapped in for the call only
    assert torch.allclose(residual_unet(*args, kwargs["context"], kwargs["y"], kwargs["residuals"]), expected,
                          atol=1e-5)
    job.outer.lowvram = True  # ControlNet's per-unit low VRAM moves the network around each step: left eager
    assert job.control_networks() == []
