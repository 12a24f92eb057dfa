import torch

from compile import bind_weights, data_pointers
from compile.models import build_preset


def test_bind_copies_in_place_and_shares_storage():
    captured = build_preset("tiny", seed=0)
    source = build_preset("tiny", seed=1)
    expected = {name: t.clone() for name, t in source.state_dict().items()}
    pointers = data_pointers(captured)

    report = bind_weights(source, captured)

    assert data_pointers(captured) == pointers  # the storage a graph captured is untouched as an address
    for name, tensor in captured.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert report.copied == len(expected)
    # the eager module now reads the captured storage: one copy of the weights, and in-place writes reach both
    assert source.conv_in.weight.data_ptr() == captured.conv_in.weight.data_ptr()
    with torch.no_grad():
        source.conv_in.weight.add_(1.0)
    assert torch.equal(captured.conv_in.weight, expected["conv_in.weight"] + 1.0)


def test_binding_the_same_storage_again_copies_nothing():
    captured = build_preset("tiny", seed=0)
    source = build_preset("tiny", seed=1)
    bind_weights(source, captured)
    assert bind_weights(source, captured).copied == 0
    assert bind_weights(captured, captured).copied == 0
