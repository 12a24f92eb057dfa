"""The job's stand-in UNet as the webui sees it: state dicts and moves reach the eager UNet only."""

import torch

from compile.models import build_preset
from compile.weights import aliasing_clone, data_pointers
from onediff_sd_webui_extensions.unet_swap import EagerUNetView


class Wrapper(torch.nn.Module):
    """ldm's DiffusionWrapper: the model holds the UNet as ``diffusion_model``."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


def swapped_model():
    eager = build_preset("tiny", seed=0)
    captured = aliasing_clone(eager)  # what a graph reads: the same storage
    model = torch.nn.Sequential()
    model.model = Wrapper(EagerUNetView(eager, compiled=captured))
    return model, eager, captured


def test_state_dict_keys_are_the_unets_own():
    model, eager, _ = swapped_model()
    plain = torch.nn.Sequential()
    plain.model = Wrapper(build_preset("tiny", seed=0))
    assert list(model.state_dict()) == list(plain.state_dict())


def test_a_checkpoint_loaded_into_the_live_model_reaches_the_captured_weights():
    """What the refiner does with a checkpoint of the same config: load_state_dict(strict=False)."""
    model, eager, captured = swapped_model()
    pointers = data_pointers(captured)
    other = torch.nn.Sequential()
    other.model = Wrapper(build_preset("tiny", seed=5))
    missing, unexpected = model.load_state_dict(other.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    for name, tensor in other.model.diffusion_model.state_dict().items():
        assert torch.equal(captured.state_dict()[name], tensor), name
    assert data_pointers(captured) == pointers  # written in place


def test_moving_the_model_leaves_the_captured_weights_where_they_are():
    """A1111 moves an unloaded model to the meta device: the graph must keep its weights for the next job."""
    model, eager, captured = swapped_model()
    model.to("meta")
    assert all(p.device.type == "meta" for p in eager.parameters())
    assert all(p.device.type == "cpu" for p in captured.parameters())
