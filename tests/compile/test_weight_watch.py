"""WeightWatch: which ways of changing a UNet's weights it notices (no compile needed here)."""

import torch

from compile.models import build_preset
from compile.weight_watch import WeightWatch


def fresh():
    unet = build_preset("tiny", seed=0)
    return unet, WeightWatch(unet)


def test_nothing_changed_reports_nothing():
    _, watch = fresh()
    assert not watch.quick_changes()


def test_a_new_parameter_object_is_noticed():
    """SD.Next's LoRA code: ``module.weight = Parameter(W + dW)``."""
    unet, watch = fresh()
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer.weight = torch.nn.Parameter(layer.weight.detach() + 1, requires_grad=False)
    changes = watch.quick_changes()
    assert changes.changed == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert not changes.structure_changed


def test_repointed_data_and_in_place_writes_are_noticed():
    unet, watch = fresh()
    unet.conv_in.weight.data = unet.conv_in.weight.detach().clone()
    unet.conv_out.bias.add_(1)
    assert sorted(watch.quick_changes().changed) == ["conv_in.weight", "conv_out.bias"]


def test_snapshot_accepts_the_current_weights():
    unet, watch = fresh()
    unet.conv_in.weight = torch.nn.Parameter(unet.conv_in.weight.detach().clone())
    watch.snapshot()
    assert not watch.quick_changes()


def test_a_bias_added_to_a_bias_less_layer_is_a_structure_change():
    unet, watch = fresh()
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.bias is None
    layer.bias = torch.nn.Parameter(torch.zeros(layer.out_features))
    changes = watch.quick_changes()
    assert changes.structure_changed
    assert changes.added == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias"]


def test_a_wrapped_layer_is_a_structure_change():
    """diffusers/peft LoRA without fusing wraps layers: the graph was traced through the old ones."""
    unet, watch = fresh()
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    block.to_q = torch.nn.Sequential(block.to_q)
    changes = watch.quick_changes()
    assert changes.structure_changed and changes.replaced_modules == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]


def test_value_check_finds_writes_the_quick_check_cannot_see():
    """``p.data.add_`` does not move ``p``'s version counter: only comparing values finds it, where the watched
    module does not share the reference module's storage."""
    unet, watch = fresh()
    reference = build_preset("tiny", seed=0)
    assert watch.value_changes(reference) == []
    unet.conv_in.weight.data.add_(1)
    assert not watch.quick_changes()
    assert watch.value_changes(reference) == ["conv_in.weight"]


def test_inference_mode_tensors_are_watched_without_version_counters():
    unet, watch = fresh()
    with torch.inference_mode():
        unet.conv_in.weight = torch.nn.Parameter(unet.conv_in.weight.detach() * 2, requires_grad=False)
    watch.snapshot()
    assert not watch.quick_changes()
    with torch.inference_mode():
        unet.conv_in.weight = torch.nn.Parameter(unet.conv_in.weight.detach() * 2, requires_grad=False)
    assert watch.quick_changes().changed == ["conv_in.weight"]
