import torch

from compile import aliasing_clone, bind_weights, data_pointers
from compile.models import build_preset


def test_aliasing_clone_shares_storage_not_objects():
    module = build_preset("tiny", seed=0)
    clone = aliasing_clone(module)
    assert clone is not module and clone.conv_in is not module.conv_in
    assert clone.conv_in.weight is not module.conv_in.weight
    assert data_pointers(clone) == data_pointers(module)
    module.conv_in.weight.data = torch.zeros_like(module.conv_in.weight)  # re-pointing one leaves the other
    assert clone.conv_in.weight.abs().sum() > 0


def test_bind_copies_in_place_and_shares_storage():
    first = build_preset("tiny", seed=0)
    captured = aliasing_clone(first)
    source = build_preset("tiny", seed=1)
    expected = {name: t.clone() for name, t in source.state_dict().items()}
    pointers = data_pointers(captured)

    report = bind_weights(source, captured)

    assert data_pointers(captured) == pointers  # the storage a graph captured is untouched as an address
    for name, tensor in captured.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert report.copied == len(expected) and report.swapped == 0
    # the eager module now reads the captured storage: one copy of the weights, and in-place writes reach both
    assert source.conv_in.weight.data_ptr() == captured.conv_in.weight.data_ptr()
    with torch.no_grad():
        source.conv_in.weight.add_(1.0)
    assert torch.equal(captured.conv_in.weight, expected["conv_in.weight"] + 1.0)


def test_a_previous_owner_still_loaded_keeps_its_own_weights():
    first = build_preset("tiny", seed=0)
    first_values = {name: t.clone() for name, t in first.state_dict().items()}
    captured = aliasing_clone(first)  # first reads the captured storage, like a freshly compiled model
    second = build_preset("tiny", seed=1)
    second_values = {name: t.clone() for name, t in second.state_dict().items()}

    report = bind_weights(second, captured, previous_owner=first)

    assert report.swapped == report.copied == len(first_values)
    for name in first_values:
        assert torch.equal(first.state_dict()[name], first_values[name]), name
        assert torch.equal(second.state_dict()[name], second_values[name]), name
        assert torch.equal(captured.state_dict()[name], second_values[name]), name
    assert first.conv_in.weight.data_ptr() != captured.conv_in.weight.data_ptr()


def test_binding_the_same_storage_again_copies_nothing():
    captured = aliasing_clone(build_preset("tiny", seed=0))
    source = build_preset("tiny", seed=1)
    bind_weights(source, captured)
    assert bind_weights(source, captured).copied == 0
    assert bind_weights(captured, captured).copied == 0
