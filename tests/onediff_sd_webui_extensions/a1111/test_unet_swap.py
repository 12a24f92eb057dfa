"""The job's stand-in UNet as the webui sees it: state dicts and moves reach the eager UNet only, and weights
the webui loads through it reach the graph's captured tensors before the next compiled call."""

import torch

from compile.graph_cache import FloatBinding
from compile.models import build_preset
from compile.weights import data_pointers
from onediff_sd_webui_extensions.a1111.unet_swap import EagerUNetView


class Wrapper(torch.nn.Module):
    """ldm's DiffusionWrapper: the model holds the UNet as ``diffusion_model``."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


def swapped_model():
    eager = build_preset("tiny", seed=0)
    binding = FloatBinding(eager)
    captured = binding.template  # what a graph reads: the same storage as the eager UNet
    model = torch.nn.Sequential()
    model.model = Wrapper(EagerUNetView(eager, compiled=captured, binding=binding))
    return model, eager, captured


def other_checkpoint():
    other = torch.nn.Sequential()
    other.model = Wrapper(build_preset("tiny", seed=5))
    return other.state_dict(), other.model.diffusion_model.state_dict()


def assert_captured_holds(captured, unet_state):
    for name, tensor in unet_state.items():
        assert torch.equal(captured.state_dict()[name], tensor), name


def test_state_dict_keys_are_the_unets_own():
    model, eager, _ = swapped_model()
    plain = torch.nn.Sequential()
    plain.model = Wrapper(build_preset("tiny", seed=0))
    assert list(model.state_dict()) == list(plain.state_dict())


def test_a_checkpoint_loaded_into_the_live_model_reaches_the_captured_weights():
    """What the refiner does with a checkpoint of the same config: load_state_dict(strict=False)."""
    model, eager, captured = swapped_model()
    view = model.model.diffusion_model
    pointers = data_pointers(captured)
    assert view.bind_pending_weights() is None  # nothing loaded yet: nothing to bind
    model_state, unet_state = other_checkpoint()
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    assert missing == [] and unexpected == []
    assert view.bind_pending_weights() is not None
    assert_captured_holds(captured, unet_state)
    assert data_pointers(captured) == pointers  # written in place
    assert data_pointers(eager) == pointers  # and still shared with the eager UNet
    assert view.bind_pending_weights() is None


def test_a_checkpoint_loaded_between_device_moves_reaches_the_captured_weights():
    """A1111's reload_model_weights on a GPU: the model goes to the CPU, the weights load there, and the model
    goes back, with new tensors the graph never read. Simulated here with a round trip through float64, which
    also gives every tensor new storage; only the bind before the next call gets the weights to the graph."""
    model, eager, captured = swapped_model()
    pointers = data_pointers(captured)
    model.to(torch.float64)
    model_state, unet_state = other_checkpoint()
    model.load_state_dict(model_state, strict=False)
    model.to(torch.float32)
    assert data_pointers(eager) != pointers
    assert not torch.equal(captured.state_dict()["conv_in.weight"], unet_state["conv_in.weight"])
    model.model.diffusion_model.bind_pending_weights()
    assert_captured_holds(captured, unet_state)
    assert data_pointers(captured) == pointers
    assert data_pointers(eager) == pointers  # the eager UNet reads the captured storage again


def test_moving_the_model_leaves_the_captured_weights_where_they_are():
    """A1111 moves an unloaded model to the meta device: the graph must keep its weights for the next job."""
    model, eager, captured = swapped_model()
    model.to("meta")
    assert all(p.device.type == "meta" for p in eager.parameters())
    assert all(p.device.type == "cpu" for p in captured.parameters())
