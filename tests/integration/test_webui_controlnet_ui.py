"""A ControlNet unit (the tiny T2I-Adapter) in a compiled txt2img job, set up in the real webui's UI with the real
sd-webui-controlnet (v1.1.455), in headless Chromium (as test_webui_ui.py, whose browser helpers it uses).

Runs with ``WEBUI_DIR``, ``CONTROLNET_DIR`` (and ``CONTROLNET_PYTHON``), the Python package playwright and
Debian's chromium; skipped with the reason otherwise. Its webui has its own data and compile cache folders: the
job compiles the checkpoint's graph (minutes on a busy CPU). With ``ONEDIFF_SCREENSHOTS_DIR`` set the README's
``txt2img_controlnet.png`` is taken again from this run.
"""

import base64

import pytest

from .test_webui_controlnet import _png
from .test_webui_ui import (  # noqa: F401  (playwright_api and expect are fixtures used by name)
    browser_page, choose, dropdown_values, expect, generate, onediff_value, open_tab,
    playwright_api, screenshot, select_script, set_up_small_job,
)

UNIT = "#txt2img_controlnet_ControlNet-0"  # sd-webui-controlnet's elem_id prefix of txt2img's first unit


@pytest.fixture(scope="module")
def models(tiny_control_models):
    return tiny_control_models[1]


@pytest.fixture(scope="module")
def page(playwright_api, webui_with_controlnet_ui, models):
    # the UI has no per-job checkpoint override: the adapter's checkpoint is the webui's before the page loads
    checkpoint = models["t2i_adapter"]["checkpoints"][0]
    assert webui_with_controlnet_ui.request("/sdapi/v1/options", {"sd_model_checkpoint": checkpoint})[0] == 200
    # tall enough for the prompt, the open ControlNet unit, the script and the result in one screenshot
    yield from browser_page(playwright_api, webui_with_controlnet_ui.url, height=2100)


def set_up_adapter_unit(page, expect, adapter):
    """Open txt2img's ControlNet accordion and enable unit 0 with a 64x64 pattern, no preprocessor, the adapter."""
    open_tab(page, "txt2img")
    accordion = page.locator("#txt2img_controlnet #controlnet > .label-wrap")
    accordion.click()
    image = page.locator(f"{UNIT}_input_image")
    image.locator("input[type=file]").set_input_files(
        {"name": "pattern.png", "mimeType": "image/png", "buffer": base64.b64decode(_png("stripes"))})
    expect(image.locator("canvas").first).to_be_visible()
    page.locator(f"{UNIT}_controlnet_enable_checkbox input[type=checkbox]").check()
    choose(page.locator(f"{UNIT}_controlnet_preprocessor_dropdown"), "none")
    model_dropdown = page.locator(f"{UNIT}_controlnet_model_dropdown")
    # the dropdown names a model with its hash: "tiny_t2i_adapter_sd15 [49e112ea]"
    entries = [entry for entry in dropdown_values(model_dropdown) if entry.split(" [")[0] == adapter]
    assert len(entries) == 1, f"no single {adapter} entry in ControlNet's model list"
    choose(model_dropdown, entries[0])
    expect(model_dropdown.locator("input")).to_have_value(entries[0])
    expect(accordion).to_contain_text("1 unit")  # ControlNet's badge of enabled units


def test_txt2img_with_an_adapter_unit_runs_compiled(page, expect, models, webui_with_controlnet_ui):
    set_up_small_job(page)
    set_up_adapter_unit(page, expect, models["t2i_adapter"]["model"])
    select_script(page, "txt2img")
    info = generate(page)  # the first job compiles the checkpoint's graph
    value = onediff_value(info)
    assert value.startswith("inductor, ") and "1 ControlNet unit(s) compiled" in value, info
    assert webui_with_controlnet_ui.status()["controlnet"]["compiled_jobs"] >= 1

    page.locator(f"{UNIT}_input_image").hover()  # the sketch tool drops its brush preview once left
    page.mouse.move(0, 0)
    # the 64x64 result pixel by pixel, not smoothed: its blocks keep the README's PNG small
    page.add_style_tag(content="#txt2img_gallery img { image-rendering: pixelated; }")
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "txt2img_controlnet.png", full_page=True)
