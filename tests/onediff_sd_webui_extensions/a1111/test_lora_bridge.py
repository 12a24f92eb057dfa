"""The A1111 Lora bridge against a stand-in for the built-in extension's ``networks`` module.

The stand-in reproduces, in a few lines, the v1.10.1 behaviour the bridge relies on: class-level forward
patches that call ``network_apply_weights`` lazily, which restores a backup and writes ``W + delta`` with
``copy_`` — and assigns a *new* ``torch.nn.Parameter`` when a network brings a bias for a bias-less layer.
The real extension is exercised by the integration tests with a webui.
"""

import copy
import types

import pytest
import torch

from compile import count_new_graphs
from compile.lora import attention_and_ff_modules
from compile.models import build_preset
from compile.weights import data_pointers, tensors_by_name
from onediff_sd_webui_extensions.a1111.lora_bridge import (
    PATCHED_CLASSES,
    A1111LoraState,
    apply_networks_to_unet,
    forget_backups,
    original_forwards,
    unet_lora_modules,
)


class FakeNetwork:
    def __init__(self, name, multiplier, deltas):
        self.name, self.unet_multiplier, self.te_multiplier, self.dyn_dim = name, multiplier, multiplier, None
        self.modules = deltas  # network_layer_name -> (weight delta, bias delta or None), as Network.modules


def make_lora_extension():
    """A ``networks`` stand-in: A1111's lazy apply-on-forward, patched onto the torch.nn classes."""
    ext = types.SimpleNamespace(loaded_networks=[], patched_calls=0)
    ext.originals = types.SimpleNamespace(**{f"{name}_forward": cls.forward for name, cls in PATCHED_CLASSES})

    @torch.no_grad()
    def network_apply_weights(module):
        wanted = tuple((net.name, net.unet_multiplier) for net in ext.loaded_networks)
        if getattr(module, "network_current_names", ()) == wanted:
            return
        if getattr(module, "network_weights_backup", None) is None and wanted:
            module.network_weights_backup = module.weight.to("cpu", copy=True)
            module.network_bias_backup = None if module.bias is None else module.bias.to("cpu", copy=True)
        if getattr(module, "network_weights_backup", None) is not None:  # restore, as the extension does
            module.weight.copy_(module.network_weights_backup)
            if module.network_bias_backup is None:
                module.bias = None
            else:
                module.bias.copy_(module.network_bias_backup)
        for net in ext.loaded_networks:
            delta = net.modules.get(module.network_layer_name)
            if delta is None:
                continue
            weight_delta, bias_delta = delta
            module.weight.copy_(module.weight + weight_delta * net.unet_multiplier)
            if bias_delta is not None:
                if module.bias is None:
                    module.bias = torch.nn.Parameter(bias_delta * net.unet_multiplier)  # a new tensor
                else:
                    module.bias.copy_(module.bias + bias_delta * net.unet_multiplier)
        module.network_current_names = wanted

    ext.network_apply_weights = network_apply_weights

    def network_reset_cached_weight(module):
        module.network_current_names, module.network_weights_backup, module.network_bias_backup = (), None, None

    ext.network_reset_cached_weight = network_reset_cached_weight
    for name, cls in PATCHED_CLASSES:
        original = cls.forward

        def patched(self, *args, _original=original, **kwargs):
            ext.patched_calls += 1
            if getattr(self, "network_layer_name", None) is not None:
                network_apply_weights(self)
            return _original(self, *args, **kwargs)

        setattr(ext, f"network_{name}_forward", patched)
    return ext


@pytest.fixture
def lora_extension():
    """The stand-in with its patches installed on the torch.nn classes for the test's duration."""
    ext = make_lora_extension()
    for name, cls in PATCHED_CLASSES:
        cls.forward = getattr(ext, f"network_{name}_forward")
    try:
        yield ext
    finally:
        for name, cls in PATCHED_CLASSES:
            cls.forward = getattr(ext.originals, f"{name}_forward")


def name_modules(unet):
    """What ``assign_network_names_to_compvis_modules`` does for the UNet."""
    for name, module in unet.named_modules():
        module.network_layer_name = "diffusion_model_" + name.replace(".", "_")


def forget_names(unet):
    for module in unet.modules():
        for attribute in ("network_layer_name", "network_current_names", "network_weights_backup",
                          "network_bias_backup"):
            module.__dict__.pop(attribute, None)


def random_network(unet, name, multiplier, seed, bias_for=()):
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for module_name in attention_and_ff_modules(unet):
        weight = unet.get_submodule(module_name).weight
        bias = torch.randn(weight.shape[0], generator=generator) * 0.1 if module_name in bias_for else None
        deltas["diffusion_model_" + module_name.replace(".", "_")] = (
            torch.randn(weight.shape, generator=generator) * 0.05, bias)
    return FakeNetwork(name, multiplier, deltas)


def reference(pristine, networks):
    """A deep copy of the clean UNet with ``W + multiplier * delta`` written by a plain loop."""
    patched = copy.deepcopy(pristine)
    modules = {"diffusion_model_" + name.replace(".", "_"): module for name, module in patched.named_modules()}
    with torch.no_grad():
        for net in networks:
            for layer, (weight_delta, _) in net.modules.items():
                modules[layer].weight.add_(weight_delta * net.unet_multiplier)
    return patched


def _same_tensors(module, other):
    theirs = tensors_by_name(other)
    return tensors_by_name(module).keys() == theirs.keys() and all(
        torch.equal(t, theirs[n]) for n, t in tensors_by_name(module).items())


def test_apply_writes_in_place_and_skips_unchanged_modules(lora_extension):
    unet = build_preset("tiny")
    pristine = copy.deepcopy(unet)
    pointers = data_pointers(unet)
    name_modules(unet)
    network = random_network(unet, "a", 0.8, seed=0)
    lora_extension.loaded_networks[:] = [network]
    state = A1111LoraState()
    handled = len(unet_lora_modules(unet))
    report = state.apply(unet, networks=lora_extension)
    # only the modules the network names are processed; the others would just be backed up
    assert report.updated_modules == len(network.modules) and report.networks == [("a", 0.8)]
    assert getattr(unet.conv_in, "network_weights_backup", None) is None
    assert report.dropped_biases == [] and report.copied_into_captured == []
    assert data_pointers(unet) == pointers
    patched = tensors_by_name(reference(pristine, [network]))
    assert all(torch.allclose(t, patched[n]) for n, t in tensors_by_name(unet).items())
    assert state.apply(unet, networks=lora_extension).updated_modules == 0
    lora_extension.loaded_networks[:] = []
    assert state.apply(unet, networks=lora_extension).updated_modules == len(network.modules)
    assert _same_tensors(unet, pristine) and data_pointers(unet) == pointers
    assert state.status()["applications"] == 3 and state.status()["last_fuse_ms"] is not None
    assert handled == sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm,
                                                               torch.nn.LayerNorm)) for m in unet.modules())


def test_bias_for_biasless_layer_is_dropped_and_reported(lora_extension):
    unet = build_preset("tiny")
    pristine = copy.deepcopy(unet)
    parameters_before = {name: id(p) for name, p in unet.named_parameters()}
    name_modules(unet)
    biasless = next(n for n in attention_and_ff_modules(unet) if n.endswith("to_q"))
    with_bias = next(n for n in attention_and_ff_modules(unet) if n.endswith("to_out.0"))
    network = random_network(unet, "b", 1.0, seed=1, bias_for={biasless, with_bias})
    lora_extension.loaded_networks[:] = [network]
    report = apply_networks_to_unet(unet, networks=lora_extension)
    assert report.dropped_biases == [f"{biasless}.bias"] and "left out" in report.comment()
    assert unet.get_submodule(biasless).bias is None
    assert {name: id(p) for name, p in unet.named_parameters()} == parameters_before  # no new Parameter
    layer = "diffusion_model_" + with_bias.replace(".", "_")
    expected_bias = pristine.get_submodule(with_bias).bias + network.modules[layer][1]
    assert torch.allclose(unet.get_submodule(with_bias).bias, expected_bias)  # an existing bias is written in place
    assert torch.allclose(unet.get_submodule(biasless).weight, reference(pristine, [network]).get_submodule(biasless).weight)


def test_separate_eager_module_is_copied_into_captured_storage(lora_extension):
    """When the eager UNet does not share storage with the module the graph captured, the written tensors are
    copied into the captured ones and the eager parameters then share that storage."""
    unet = build_preset("tiny")
    pristine = copy.deepcopy(unet)
    captured = copy.deepcopy(unet)
    captured_pointers = data_pointers(captured)
    name_modules(unet)
    network = random_network(unet, "c", 0.5, seed=2)
    lora_extension.loaded_networks[:] = [network]
    report = apply_networks_to_unet(unet, captured=captured, networks=lora_extension)
    handled_tensors = {f"{name}.{leaf}" for name, module in unet_lora_modules(unet)
                       if module.network_layer_name in network.modules
                       for leaf, tensor in module.named_parameters(recurse=False)}
    assert set(report.copied_into_captured) == handled_tensors  # every tensor of a processed module
    assert data_pointers(captured) == captured_pointers
    assert _same_tensors(captured, unet)
    assert all(data_pointers(unet)[n] == captured_pointers[n] for n in handled_tensors)
    patched = tensors_by_name(reference(pristine, [network]))
    assert all(torch.allclose(t, patched[n]) for n, t in tensors_by_name(captured).items())
    lora_extension.loaded_networks[:] = []  # now shared: restoring reaches the captured storage directly
    assert apply_networks_to_unet(unet, captured=captured, networks=lora_extension).copied_into_captured == []
    assert _same_tensors(captured, pristine)


def test_forget_backups_after_weights_written_behind_the_extensions_back(lora_extension):
    """The graph cache copies another checkpoint into the captured tensors with ``copy_`` (not
    ``load_state_dict``): after ``forget_backups`` removing the LoRA gives the new checkpoint, not the old."""
    unet = build_preset("tiny")
    new_checkpoint = build_preset("tiny", seed=5)
    name_modules(unet)
    lora_extension.loaded_networks[:] = [random_network(unet, "a", 1.0, seed=6)]
    apply_networks_to_unet(unet, networks=lora_extension)
    with torch.no_grad():
        for name, tensor in tensors_by_name(unet).items():
            tensor.copy_(tensors_by_name(new_checkpoint)[name])
    assert forget_backups(unet, lora_extension) == len(attention_and_ff_modules(unet))
    lora_extension.loaded_networks[:] = []
    apply_networks_to_unet(unet, networks=lora_extension)
    assert _same_tensors(unet, new_checkpoint)


def test_compiled_unet_runs_original_forwards_and_never_recompiles(tiny_sd15, lora_extension):
    """The extension's class-level patches stay installed and its attributes (``network_layer_name``, backups,
    applied sets) are set on the UNet's modules, as in the webui: the compiled graph runs with eagerly applied
    LoRA weights, equal to eager, with no new graph — while outside the block the patched forwards keep
    running (the text encoder path)."""
    unet, compiled, inputs = tiny_sd15.captured, tiny_sd15.compiled, tiny_sd15.inputs
    pristine = copy.deepcopy(unet)
    name_modules(unet)
    network_a = random_network(unet, "a", 1.0, seed=3)
    network_b = random_network(unet, "b", 0.5, seed=4)
    try:
        with count_new_graphs() as counted:
            for loaded in ([network_a], [network_b], [network_a, network_b], []):
                lora_extension.loaded_networks[:] = loaded
                apply_networks_to_unet(unet, networks=lora_extension)
                expected = inputs.call(reference(pristine, loaded))  # unnamed modules: patches pass through
                calls_before = lora_extension.patched_calls
                with original_forwards(lora_extension) as swapped:
                    assert set(swapped) == {cls for _, cls in PATCHED_CLASSES}
                    got = inputs.call(compiled)
                assert lora_extension.patched_calls == calls_before  # the compiled call ran no patched forward
                assert (got - expected).abs().max().item() <= 1e-4
        assert counted.new_graphs == 0
        assert torch.nn.Linear.forward is lora_extension.network_Linear_forward  # patches are back
        torch.nn.Linear(4, 4)(torch.zeros(1, 4))
        assert lora_extension.patched_calls > calls_before  # and run outside the block
        assert _same_tensors(unet, pristine)
    finally:
        lora_extension.loaded_networks[:] = []
        apply_networks_to_unet(unet, networks=lora_extension)
        forget_names(unet)


def test_graph_traced_inside_original_forwards_never_sees_the_patches(lora_extension):
    """Tracing is where the patches would do harm (dynamo would inline ``network_apply_weights`` and guard on
    the loaded networks); a graph already traced keeps running the code it traced. So: trace a small module
    inside the block with the patches installed, then switch networks: one graph, no patched call."""
    toy = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)).requires_grad_(False)
    pristine = copy.deepcopy(toy)
    name_modules(toy)
    generator = torch.Generator().manual_seed(7)
    network_a = FakeNetwork("a", 1.0, {"diffusion_model_0": (torch.randn(8, 8, generator=generator), None),
                                      "diffusion_model_2": (torch.randn(4, 8, generator=generator), None)})
    network_b = FakeNetwork("b", 0.5, {"diffusion_model_2": (torch.randn(4, 8, generator=generator), None)})
    compiled = torch.compile(toy, backend="eager")  # dynamo's tracing and guards, no code generation
    x = torch.randn(3, 8, generator=generator)
    with count_new_graphs() as counted:
        for loaded in ([network_a], [network_b], [network_a, network_b], []):
            lora_extension.loaded_networks[:] = loaded
            apply_networks_to_unet(toy, networks=lora_extension)
            expected = reference(pristine, loaded)(x)
            calls_before = lora_extension.patched_calls
            with original_forwards(lora_extension):
                got = compiled(x)
            assert lora_extension.patched_calls == calls_before
            assert torch.allclose(got, expected, atol=1e-6)
    assert counted.new_graphs == 1  # the first trace, nothing after


def test_networks_fingerprint_changes_with_what_the_extension_compares(lora_extension):
    from onediff_sd_webui_extensions.a1111.lora_bridge import networks_fingerprint

    unet = build_preset("tiny")
    name_modules(unet)
    assert networks_fingerprint(lora_extension) == ()
    network = random_network(unet, "a", 1.0, seed=0)
    lora_extension.loaded_networks[:] = [network]
    applied = networks_fingerprint(lora_extension)
    assert applied != ()
    network.unet_multiplier = 0.5  # a reweight must apply again
    assert networks_fingerprint(lora_extension) != applied
    assert networks_fingerprint(types.SimpleNamespace()) == ()  # extension without loaded_networks yet
