"""The bench's int8 section on the tiny preset, sharing the session's int8 graph (no extra compile)."""

import pytest

from compile import CompileOptions
from compile.models import build_preset
from onediff_sd_webui_extensions.bench.quant import quant_section


@pytest.fixture
def rebind_tiny_int8(graph_cache, tiny_sd15_int8):
    """The section switches the shared int8 graph to another model; bind the fixture's UNet back after."""
    yield
    graph_cache.get(tiny_sd15_int8.unet, "inductor", CompileOptions(quantization="int8"))


def test_quant_section_reports_the_documented_fields(graph_cache, tiny_sd15_int8, rebind_tiny_int8):
    unet, second = tiny_sd15_int8.unet, build_preset("tiny", seed=1)
    section = quant_section(unet, second, tiny_sd15_int8.inputs, "inductor", float_compiled_ms=100.0,
                            warmup=0, repeat=2, cache=graph_cache)

    assert section["step_ms"] > 0
    assert section["speedup_vs_float_compiled"] == pytest.approx(100.0 / section["step_ms"], rel=0.01)
    assert 0 < section["max_rel_err"] <= 0.02
    assert 0 < section["weight_mb_int8"] < section["weight_mb_float"]
    assert section["lora_new_graphs"] == 0 and section["switch_new_graphs"] == 0
    assert 0 < section["lora_max_rel_err"] <= 0.02 and section["lora_restored_exactly"] is True
    assert 0 < section["switch_max_rel_err"] <= 0.02
