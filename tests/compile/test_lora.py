"""LoRA fused in place into the compiled UNet: equal to eager on LoRA-patched weights, no new graphs, exact
restore. The eager references are separate deep copies patched by ``apply_lora_reference`` (a plain per-key
loop), never by the fuser under test."""

import copy

import pytest
import torch

from compile import count_new_graphs
from compile.lora import (
    LoraError,
    LoraFuser,
    apply_lora_reference,
    attention_and_ff_modules,
    kohya_module_names,
    ldm_module_name,
    load_kohya_lora,
    random_kohya_lora,
    save_random_kohya_lora,
)
from compile.models import build_preset, unet_config
from compile.weights import data_pointers, tensors_by_name

TOLERANCE = 1e-4


def _max_abs_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _same_tensors(module, other):
    theirs = tensors_by_name(other)
    return all(torch.equal(tensor, theirs[name]) for name, tensor in tensors_by_name(module).items())


def _conv_targets(unet):
    """A 3x3 conv (conv LoRA with a 3x3 down) and a 1x1 conv projection (1x1 down)."""
    return ["down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl", "sd15", "sd2", "sdxl"])
def test_ldm_names_agree_with_diffusers_checkpoint_conversion(preset):
    """Writing every diffusers tensor under our ldm name and converting it back with diffusers'
    ``convert_ldm_unet_checkpoint`` must give back exactly the same tensor under the same name."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(preset))
    state = unet.state_dict()
    ldm_state = {}
    for key, tensor in state.items():
        module_name, _, leaf = key.rpartition(".")
        ldm_state[f"model.diffusion_model.{ldm_module_name(module_name, unet.config)}.{leaf}"] = tensor
    converted = convert_ldm_unet_checkpoint(ldm_state, dict(unet.config))
    assert converted.keys() == state.keys()
    assert all(converted[key] is state[key] for key in state)


def test_ldm_and_diffusers_kohya_names_load_the_same_deltas():
    unet = build_preset("tiny")
    from_diffusers = load_kohya_lora(random_kohya_lora(unet, seed=3), unet, "d")
    from_ldm = load_kohya_lora(random_kohya_lora(unet, seed=3, ldm_names=True), unet, "l")
    assert from_ldm.modules.keys() == from_diffusers.modules.keys() == set(attention_and_ff_modules(unet))
    for name, delta in from_diffusers.modules.items():
        assert torch.equal(delta.up, from_ldm.modules[name].up) and torch.equal(delta.down, from_ldm.modules[name].down)
    names = kohya_module_names(unet)
    assert names["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"] == (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")


def test_text_encoder_keys_are_skipped_and_unknown_formats_refused(tmp_path):
    unet = build_preset("tiny")
    state = random_kohya_lora(unet, seed=0)
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    network = load_kohya_lora(state, unet, "with_te")
    assert len(network.skipped_keys) == 1 and len(network.modules) == len(attention_and_ff_modules(unet))

    locon = dict(state)
    locon["lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight"] = torch.zeros(4, 4, 3, 3)
    with pytest.raises(LoraError, match="unsupported format"):
        load_kohya_lora(locon, unet, "locon")

    wrong = dict(state)
    key = next(k for k in wrong if k.endswith("lora_up.weight"))
    wrong[key] = torch.zeros(wrong[key].shape[0] + 1, wrong[key].shape[1])
    with pytest.raises(LoraError, match="do not fit"):
        load_kohya_lora(wrong, unet, "wrong")

    path = save_random_kohya_lora(tmp_path / "saved.safetensors", unet, seed=0)
    from_file = load_kohya_lora(path, unet)
    assert from_file.name == "saved"
    assert all(torch.equal(d.up, network.modules[n].up) for n, d in from_file.modules.items())


def test_fused_compiled_matches_eager_with_no_new_graphs(tiny_sd15):
    """add, switch, reweight, several at once, remove: each compiled result equals eager on reference-patched
    weights, nothing is recompiled, data pointers never move, and removal restores the weights bit for bit."""
    unet, compiled, inputs = tiny_sd15.captured, tiny_sd15.compiled, tiny_sd15.inputs
    pristine = copy.deepcopy(unet)
    pointers = data_pointers(unet)
    lora_a = random_kohya_lora(unet, seed=10, conv_modules=_conv_targets(unet))
    lora_b = random_kohya_lora(unet, seed=11)
    fuser = LoraFuser(unet)
    network_a, network_b = fuser.load(lora_a, "a"), fuser.load(lora_b, "b")
    steps = [
        ("add", [(network_a, 1.0)], [(lora_a, 1.0)]),
        ("switch", [(network_b, 0.5)], [(lora_b, 0.5)]),
        ("reweight", [(network_b, -0.8)], [(lora_b, -0.8)]),
        ("multi", [(network_a, 0.7), (network_b, 0.4)], [(lora_a, 0.7), (lora_b, 0.4)]),
        ("remove", [], []),
    ]
    baseline = inputs.call(pristine)
    try:
        with count_new_graphs() as counted:
            for label, fuse_set, reference_set in steps:
                fuser.fuse(fuse_set)
                reference = copy.deepcopy(pristine)
                apply_lora_reference(reference, reference_set)
                expected = inputs.call(reference)
                got = inputs.call(compiled)
                assert _max_abs_diff(got, expected) <= TOLERANCE, label
                if reference_set:  # the LoRA really changes the result, so the comparison above can fail
                    assert _max_abs_diff(expected, baseline) > 100 * TOLERANCE, label
                assert data_pointers(unet) == pointers, label
        assert counted.new_graphs == 0
        assert _same_tensors(unet, pristine)
        assert fuser.backups == {} and fuser.status()["active"] == []
    finally:
        fuser.unfuse()


def test_only_modules_whose_delta_changed_are_written():
    unet = build_preset("tiny")
    fuser = LoraFuser(unet)
    everywhere = fuser.load(random_kohya_lora(unet, seed=0), "everywhere")
    few_modules = attention_and_ff_modules(unet)[:3]
    partial = fuser.load(random_kohya_lora(unet, seed=1, modules=few_modules), "partial")
    assert fuser.fuse([(everywhere, 1.0)]).written_modules == len(everywhere.modules)
    assert fuser.fuse([(everywhere, 1.0)]).written_modules == 0
    assert fuser.fuse([(everywhere, 1.0), (partial, 0.5)]).written_modules == len(few_modules)
    assert fuser.fuse([(everywhere, 1.0), (partial, 0.0)]).written_modules == len(few_modules)
    report = fuser.unfuse()
    assert report.written_modules == len(everywhere.modules) and report.active_modules == 0


def test_bias_delta_is_fused_in_place_and_refused_for_biasless_layers():
    unet = build_preset("tiny")
    pristine = copy.deepcopy(unet)
    pointers = data_pointers(unet)
    fuser = LoraFuser(unet)
    with_bias_name = next(n for n in attention_and_ff_modules(unet) if n.endswith("to_out.0"))
    biasless_name = next(n for n in attention_and_ff_modules(unet) if n.endswith("to_q"))
    assert unet.get_submodule(biasless_name).bias is None

    with_bias = random_kohya_lora(unet, seed=2, modules=[with_bias_name])
    prefix = "lora_unet_" + with_bias_name.replace(".", "_")
    out_features = unet.get_submodule(with_bias_name).weight.shape[0]
    with_bias[f"{prefix}.diff_b"] = torch.linspace(-0.5, 0.5, out_features)
    fuser.fuse([(fuser.load(with_bias, "with_bias"), 0.5)])
    reference = copy.deepcopy(pristine)
    apply_lora_reference(reference, [(with_bias, 0.5)])
    assert torch.allclose(unet.get_submodule(with_bias_name).bias, reference.get_submodule(with_bias_name).bias)
    assert not torch.equal(unet.get_submodule(with_bias_name).bias, pristine.get_submodule(with_bias_name).bias)
    fuser.unfuse()
    assert _same_tensors(unet, pristine)

    biasless = random_kohya_lora(unet, seed=3)
    biasless["lora_unet_" + biasless_name.replace(".", "_") + ".diff_b"] = torch.ones(
        unet.get_submodule(biasless_name).weight.shape[0])
    network = fuser.load(biasless, "biasless")
    with pytest.raises(LoraError, match="has no bias"):
        fuser.fuse([(network, 1.0)])
    assert unet.get_submodule(biasless_name).bias is None  # no Parameter the graph cannot see
    assert _same_tensors(unet, pristine) and data_pointers(unet) == pointers  # nothing was written
    assert fuser.fused == {} and fuser.backups == {}


@pytest.fixture
def single_thread():
    """Thousands of tiny matmuls: on a shared CPU, OpenMP's spin-waiting between threads costs more than the
    math, so this test runs single-threaded (it checks values, not speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_thousand_fp16_fuse_unfuse_cycles_do_not_drift(single_thread):
    unet = build_preset("tiny", dtype=torch.float16)
    pristine = copy.deepcopy(unet)
    pointers = data_pointers(unet)
    lora_a = random_kohya_lora(unet, seed=4)
    lora_b = random_kohya_lora(unet, seed=5)
    reference_a = copy.deepcopy(pristine)
    apply_lora_reference(reference_a, [(lora_a, 1.0)])
    fuser = LoraFuser(unet)
    network_a, network_b = fuser.load(lora_a, "a"), fuser.load(lora_b, "b")
    fused_drift = 0.0
    for cycle in range(1000):
        fuser.fuse([(network_b, 0.5)])
        fuser.fuse([(network_a, 1.0)])
        if cycle % 100 == 99:
            fused_drift = max(fused_drift, max(
                _max_abs_diff(tensor, tensors_by_name(reference_a)[name]) for name, tensor in tensors_by_name(unet).items()))
        fuser.unfuse()
        if cycle % 100 == 99:
            assert _same_tensors(unet, pristine), cycle
    assert fused_drift <= 1e-3
    assert _same_tensors(unet, pristine) and data_pointers(unet) == pointers


def test_weights_reloaded_forgets_stale_backups():
    """A checkpoint written into the UNet while a LoRA is fused: after ``weights_reloaded`` the next fuse
    builds on the new weights and unfusing gives the new checkpoint back, not the old one."""
    unet = build_preset("tiny")
    new_checkpoint = build_preset("tiny", seed=7)
    fuser = LoraFuser(unet)
    network = fuser.load(random_kohya_lora(unet, seed=0), "a")
    fuser.fuse([(network, 1.0)])
    unet.load_state_dict(new_checkpoint.state_dict())  # copies in place, like A1111's checkpoint reload
    fuser.weights_reloaded()
    fuser.fuse([(network, 1.0)])
    reference = copy.deepcopy(new_checkpoint)
    apply_lora_reference(reference, [(random_kohya_lora(unet, seed=0), 1.0)])
    assert max(_max_abs_diff(t, tensors_by_name(reference)[n]) for n, t in tensors_by_name(unet).items()) <= 1e-6
    fuser.unfuse()
    assert _same_tensors(unet, new_checkpoint)
