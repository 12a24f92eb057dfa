"""int8 (torchao) compiled UNet: close to float eager, LoRA and checkpoint switches written in place with 0
recompiles, and a graph cache that never serves the int8 graph to a float request or the reverse.

Error metric everywhere: ``max |out - reference| / max |reference|`` (the bench's ``max_rel_err``). Threshold
2% of the output range; on the ``tiny`` preset int8 measures about 0.3% (dynamic) on CPU.
"""

import copy
import os

import pytest
import torch

from compile import CompileOptions, GraphCache, count_new_graphs
from compile import quantization
from compile.models import build_preset, example_inputs

INT8 = CompileOptions(quantization="int8")
FLOAT = CompileOptions()
REL_TOL = 0.02


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).abs().max() / reference.abs().max()).item()


def int8_state_views(weights):
    """The captured inner tensors themselves (to check that writes stay in place)."""
    return {
        (name, inner_name): inner
        for name, layer in weights.layers.items()
        for inner_name, inner in quantization._inner_tensors(layer.linear.weight).items()
    }


def lora_deltas(weights: quantization.Int8Weights, rank: int = 4, strength: float = 0.5, seed: int = 3):
    """Low-rank deltas for every quantized self-attention and feed-forward Linear, about ``strength`` times
    the weight's scale (a strong LoRA, so its effect is far above the int8 error)."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, layer in weights.layers.items():
        if ".attn1." not in name and ".ff." not in name:
            continue
        out_features, in_features = layer.master.shape
        up = torch.randn(out_features, rank, generator=generator)
        down = torch.randn(rank, in_features, generator=generator)
        delta = up @ down
        deltas[name] = delta * (strength * layer.master.std() / delta.std())
    return deltas


def test_int8_available_on_this_machine_and_a_plain_reason_when_torchao_is_missing(monkeypatch):
    assert quantization.int8_availability("cpu") is None
    assert quantization.choose_mode("cpu") in (quantization.INT8_DYNAMIC, quantization.INT8_WEIGHT_ONLY)

    def missing():
        raise ImportError("No module named 'torchao'")

    monkeypatch.setattr(quantization, "_torchao_configs", missing)
    quantization._probe.cache_clear()  # probes are cached per device and mode
    try:
        reason = quantization.int8_availability("cpu")
        with pytest.raises(quantization.Int8Unavailable, match="torchao"):
            quantization.choose_mode("cpu")
        cache = GraphCache()
        with pytest.raises(quantization.Int8Unavailable):
            cache.get(build_preset("tiny"), "inductor", INT8)
        assert cache.entries() == []  # nothing half-built is cached: the job can run float
    finally:
        monkeypatch.undo()
        quantization._probe.cache_clear()
    assert reason is not None and "torchao" in reason


def test_quantize_copy_keeps_the_source_float_and_the_sensitive_layers_float():
    unet = build_preset("tiny", seed=0)
    before = {name: p.clone() for name, p in unet.named_parameters()}
    pointers = {name: p.data_ptr() for name, p in unet.named_parameters()}
    weights = quantization.Int8Weights.quantize_copy(unet)

    for name, p in unet.named_parameters():
        assert type(p) is torch.nn.Parameter and p.dtype == torch.float32
        assert p.data_ptr() == pointers[name] and torch.equal(p, before[name])
    assert weights.layers, "no Linear was quantized"
    for name, sub in weights.template.named_modules():
        if type(sub) is torch.nn.Linear:
            is_int8 = type(sub.weight).__name__ == "Int8Tensor"
            assert is_int8 == (name in weights.layers), name
            if "time_embedding" in name or "time_emb_proj" in name:
                assert not is_int8, f"{name} should stay float"
            elif "attn2.to_k" in name or "attn2.to_v" in name:
                assert is_int8 and sub.weight.act_quant_kwargs is None, f"{name} should be int8 weight-only"
            elif weights.mode == quantization.INT8_DYNAMIC:
                assert is_int8 and sub.weight.act_quant_kwargs is not None, f"{name} should be int8 dynamic"
    assert isinstance(weights.template.conv_in.weight, torch.nn.Parameter)
    memory = weights.memory_mb()
    assert memory["int8"] < memory["float"]
    assert memory["float"] == pytest.approx(quantization.weight_memory_mb(unet))


def test_int8_compiled_close_to_float_eager(tiny_sd15_int8):
    compiled, eager = tiny_sd15_int8, tiny_sd15_int8.unet
    reference = compiled.inputs.call(eager)
    error = relative_error(compiled.first_output, reference)
    print(f"int8 compiled vs float eager: max_rel_err={error:.5f} (threshold {REL_TOL})")
    assert 0 < error <= REL_TOL  # > 0: the graph really runs int8 weights
    assert compiled.lookup.entry.module is not eager
    assert all(type(p) is torch.nn.Parameter for p in eager.parameters()), "the eager UNet must stay float"


def test_lora_fused_into_int8_graph_in_place_and_removed_exactly(tiny_sd15_int8):
    compiled = tiny_sd15_int8
    weights = quantization.int8_weights_of(compiled.compiled.eager)  # the hook a LoRA fuser uses
    assert weights is compiled.lookup.entry.binding.weights
    deltas = lora_deltas(weights)
    saved = weights.int8_snapshot()
    pointers = {key: t.data_ptr() for key, t in int8_state_views(weights).items()}

    float_with_lora = copy.deepcopy(compiled.unet)
    for name, delta in deltas.items():
        float_with_lora.get_submodule(name).weight.add_(delta)
    reference = compiled.inputs.call(float_with_lora)
    lora_effect = relative_error(reference, compiled.inputs.call(compiled.unet))

    with count_new_graphs() as counted:
        weights.fuse_deltas(deltas)
        fused_output = compiled.inputs.call(compiled.compiled)
        weights.restore()
        restored_output = compiled.inputs.call(compiled.compiled)

    error = relative_error(fused_output, reference)
    print(f"int8+LoRA vs float+LoRA: max_rel_err={error:.5f}; LoRA effect {lora_effect:.3f}")
    assert counted.new_graphs == 0
    assert lora_effect > 5 * REL_TOL, "the test LoRA is too weak to tell fused from unfused"
    assert error <= REL_TOL
    assert {key: t.data_ptr() for key, t in int8_state_views(weights).items()} == pointers, "not in place"
    assert weights.matches_snapshot(saved)
    assert not any(layer.fused for layer in weights.layers.values())
    assert torch.equal(restored_output, compiled.first_output)


def test_in_place_change_of_the_eager_unet_requantizes_only_that_layer(graph_cache, tiny_sd15_int8):
    """A1111's path: its Lora extension writes W + delta into the eager (float) UNet in place; the next lookup
    re-quantizes only what changed, and writing the backup back restores the int8 data exactly."""
    compiled, eager = tiny_sd15_int8, tiny_sd15_int8.unet
    weights = compiled.lookup.entry.binding.weights
    graph_cache.get(eager, "inductor", INT8)  # bound from this module (earlier tests may have switched)
    saved = weights.int8_snapshot()
    name = next(name for name in weights.layers if name.endswith("ff.net.2"))
    target = eager.get_submodule(name).weight
    backup = target.clone()

    with count_new_graphs() as counted:
        unchanged = graph_cache.get(eager, "inductor", INT8)
        target.add_(2.0 * target.std() * torch.randn_like(target))
        changed = graph_cache.get(eager, "inductor", INT8)
        changed_output = compiled.inputs.call(changed.unet)
        changed_reference = compiled.inputs.call(eager)
        target.copy_(backup)
        graph_cache.get(eager, "inductor", INT8)
        restored_output = compiled.inputs.call(compiled.compiled)

    error = relative_error(changed_output, changed_reference)
    effect = relative_error(changed_reference, compiled.inputs.call(eager))
    print(f"eager in-place change through the int8 graph: max_rel_err={error:.5f}, effect {effect:.3f}")
    assert counted.new_graphs == 0
    assert unchanged.reused and unchanged.copied_tensors == 0
    assert changed.copied_tensors == 1
    assert effect > 5 * REL_TOL, "the change is too small to tell whether it reached the graph"
    assert error <= REL_TOL
    assert weights.matches_snapshot(saved)
    assert torch.equal(restored_output, compiled.first_output)


def test_write_float_weights_refuses_float_layers(tiny_sd15_int8):
    weights = tiny_sd15_int8.lookup.entry.binding.weights
    with pytest.raises(KeyError):
        weights.write_float_weights({"time_embedding.linear_1": torch.zeros(1)})


def test_same_structure_checkpoint_switch_requantizes_in_place(graph_cache, tiny_sd15_int8):
    compiled = tiny_sd15_int8
    other = build_preset("tiny", seed=1)
    with count_new_graphs() as counted:
        switched = graph_cache.get(other, "inductor", INT8)
        switched_output = compiled.inputs.call(switched.unet)
        back = graph_cache.get(compiled.unet, "inductor", INT8)
        back_output = compiled.inputs.call(back.unet)

    error = relative_error(switched_output, compiled.inputs.call(other))
    print(f"switched int8 vs float eager of the new weights: max_rel_err={error:.5f}")
    assert counted.new_graphs == 0
    assert switched.reused and switched.entry is compiled.lookup.entry
    assert switched.copied_tensors == len(list(other.parameters())) + len(list(other.buffers()))
    assert error <= REL_TOL
    assert relative_error(switched_output, compiled.first_output) > 5 * REL_TOL, "weights did not switch"
    assert torch.equal(back_output, compiled.first_output)


def test_toggling_quantization_serves_the_matching_graph(graph_cache, tiny_sd15, tiny_sd15_int8):
    unet = build_preset("tiny", seed=0)
    reference = tiny_sd15_int8.inputs.call(unet)
    with count_new_graphs() as counted:
        outputs = []
        for options in (FLOAT, INT8, FLOAT, INT8):
            lookup = graph_cache.get(unet, "inductor", options)
            outputs.append((options, lookup, tiny_sd15_int8.inputs.call(lookup.unet)))

    assert counted.new_graphs == 0
    for options, lookup, output in outputs:
        assert lookup.reused and lookup.entry.key.options == options
        quantized_layers = [p for p in lookup.entry.module.parameters() if type(p).__name__ == "Int8Tensor"]
        if options.quantization:
            assert lookup.entry is tiny_sd15_int8.lookup.entry and quantized_layers
            assert torch.equal(output, tiny_sd15_int8.first_output)
        else:
            assert lookup.entry is tiny_sd15.lookup.entry and not quantized_layers
            assert quantization.int8_weights_of(lookup.unet.eager) is None
            assert relative_error(output, reference) <= 1e-4
            assert relative_error(output, tiny_sd15_int8.first_output) > 1e-4


def test_bind_skips_unchanged_tensors_but_never_trusts_inference_tensors():
    module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).requires_grad_(False)
    weights = quantization.Int8Weights.quantize_copy(module)
    assert sorted(weights.layers) == ["0", "2"]
    assert weights.bind_from(module).unchanged == 4
    assert weights.bind_from(weights.template) == quantization.WriteReport()

    module[0].weight.mul_(2)
    report = weights.bind_from(module)
    assert (report.quantized, report.copied, report.unchanged) == (1, 0, 3)

    with torch.inference_mode():
        made_in_inference_mode = copy.deepcopy(module)
    weights.bind_from(made_in_inference_mode)
    report = weights.bind_from(made_in_inference_mode)  # no version counters: everything is written again
    assert (report.quantized, report.copied, report.unchanged) == (2, 2, 0)


def test_quantization_speed_compares_the_int8_graph_with_the_float_graph_of_its_structure(
        graph_cache, tiny_sd15, tiny_sd15_int8, monkeypatch):
    from compile.step_times import StepTimes

    for compiled in (tiny_sd15, tiny_sd15_int8):
        monkeypatch.setattr(compiled.lookup.entry, "step_times", StepTimes())
    for _ in range(3):
        tiny_sd15.inputs.call(tiny_sd15.compiled)
    assert graph_cache.quantization_speed() == []  # the int8 graph has not served this size since
    for _ in range(3):
        tiny_sd15_int8.inputs.call(tiny_sd15_int8.compiled)
    shape = "x".join(str(size) for size in tiny_sd15.inputs.sample.shape)
    [comparison] = [each for each in graph_cache.quantization_speed() if each["shape"] == shape]
    weights = tiny_sd15_int8.lookup.entry.binding.weights
    assert comparison["scheme"] == weights.mode and comparison["device"] == "cpu"
    float_ms = tiny_sd15.lookup.entry.step_times.median_ms(shape)
    int8_ms = tiny_sd15_int8.lookup.entry.step_times.median_ms(shape)
    assert comparison["speedup"] == pytest.approx(float_ms / int8_ms, rel=1e-2)
    assert 0 < comparison["weight_share"] < 1
    print(f"tiny preset on this CPU: float {float_ms:.2f} ms, {weights.mode} {int8_ms:.2f} ms a step")


def test_torchao_is_imported_only_for_a_quantized_graph_and_quietly():
    import subprocess
    import sys

    code = ("import logging, sys; logging.basicConfig(); import compile, compile.graph_cache, compile.quantization as q;"
            "assert 'torchao' not in sys.modules, 'imported at start-up';"
            "assert q.torchao_installed(); q.import_torchao(); q._torchao_configs(); print('imported', 'torchao' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "imported True" in result.stdout
    for noise in ("Failed to load", "register_constant", "Detected no triton"):  # this torch has no CUDA
        assert noise not in result.stderr, result.stderr
    bench_code = ("import logging; logging.basicConfig(); from compile.models import build_preset;"
                  "build_preset('tiny')")  # diffusers imports torchao too
    result = subprocess.run([sys.executable, "-c", bench_code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and not any(noise in result.stderr for noise in ("Failed to load", "torchao")), \
        result.stderr


def test_compiling_a_quantized_module_leaves_torchs_subclass_hash_warning_out(tmp_path):
    import subprocess
    import sys

    code = ("import torch, compile.quantization as q; q.import_torchao();"
            "from torchao.quantization import quantize_, Int8DynamicActivationInt8WeightConfig as Config;"
            "layer = torch.nn.Sequential(torch.nn.Linear(64, 64)); quantize_(layer, Config(set_inductor_config=False));"
            "torch.no_grad().__enter__(); torch.compile(layer)(torch.randn(8, 64)); print('compiled')")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))  # a cold compile, which hashes the subclass
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr
    assert "_stable_hash_for_caching" not in result.stderr, result.stderr


def test_fp8_is_refused_in_plain_words_where_torchao_has_no_float8_kernels():
    assert quantization.int8_availability("cpu", quantization.FP8) is not None  # torchao: CUDA 8.9+ only
    with pytest.raises(quantization.Int8Unavailable, match="fp8 quantization cannot run here"):
        quantization.choose_mode("cpu", quantization.FP8)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantization.choose_mode("cpu", "int4")


@pytest.fixture
def fp8_math_on_this_cpu(monkeypatch):
    """torchao's float8 tensors with its CUDA capability check lifted: the same quantization and matmul
    math (``torch._scaled_mm`` runs on the CPU), so rebinding, LoRA and exact restore are tested here."""
    import torchao.quantization.quant_api as quant_api

    quantization.import_torchao()
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    quantization._probe.cache_clear()
    yield
    monkeypatch.undo()
    quantization._probe.cache_clear()


def test_fp8_weights_are_written_in_place_and_restored_exactly(fp8_math_on_this_cpu):
    unet, second = build_preset("tiny", seed=0), build_preset("tiny", seed=1)
    weights = quantization.Int8Weights.quantize_copy(unet, quantization.FP8)
    assert weights.mode == quantization.FP8_TENSORWISE  # float32 weights: torchao's row-wise fp8 takes bf16 only
    kinds = {type(layer.linear.weight).__name__ for layer in weights.layers.values()}
    assert kinds == {"Float8Tensor", "Int8Tensor"}  # cross-attention k/v stay int8 weight-only
    inputs = example_inputs(unet)
    error = relative_error(inputs.call(weights.template), inputs.call(unet))
    print(f"fp8-tensorwise eager vs float eager on the tiny preset: max_rel_err={error:.4f}")
    assert 0 < error <= 0.05, error  # fp8 e4m3 is coarser than int8 (see compile.quantization's docstring)

    pointers = {key: t.data_ptr() for key, t in int8_state_views(weights).items()}
    saved = weights.int8_snapshot()
    deltas = lora_deltas(weights)
    weights.fuse_deltas(deltas)
    assert not weights.matches_snapshot(saved)
    weights.restore()
    assert weights.matches_snapshot(saved)

    weights.bind_from(second)
    assert relative_error(inputs.call(weights.template), inputs.call(second)) <= 0.05
    assert {key: t.data_ptr() for key, t in int8_state_views(weights).items()} == pointers, "not in place"
