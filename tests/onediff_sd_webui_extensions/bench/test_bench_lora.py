"""The bench's LoRA section on the session's compiled tiny UNet."""

from compile.lora import attention_and_ff_modules
from compile.weights import data_pointers
from onediff_sd_webui_extensions.bench.lora import lora_section


def test_lora_section_reports_a_fused_lora_without_recompiles(tiny_sd15):
    pointers = data_pointers(tiny_sd15.captured)
    section = lora_section(tiny_sd15.captured, tiny_sd15.compiled, tiny_sd15.inputs, repeat=1)
    assert section["new_graphs"] == 0
    assert section["restored_exactly"] is True
    assert section["max_abs_diff"] <= 1e-4
    assert section["modules"] == len(attention_and_ff_modules(tiny_sd15.captured)) and section["rank"] == 16
    assert all(section[key] > 0 for key in ("fuse_ms", "switch_ms", "unfuse_ms"))
    assert data_pointers(tiny_sd15.captured) == pointers
