"""The extension's UI in the real webui, in a real browser (headless Chromium driven by Playwright).

What the user sees while the extension works: the script and its first-compile notice, the progress bar's
text during the first compile, the status line after jobs (in both tabs, without reloading the page), labels
that tell cached graphs apart, the backend setting, and the Settings' compile cache line after Apply.

The browser reaches 127.0.0.1 only: every other request (web fonts, anything else) is aborted. The tests share
one page and run in file order, like the API tests share one webui; the UI webui has its own compile cache
folder, so its first job really compiles. With ``ONEDIFF_SCREENSHOTS_DIR`` set (e.g. ``images``) the README's
screenshots are taken again from this run.
"""

import json
import os
import re
import time
import urllib.parse

import pytest

SCRIPT = "onediff_diffusion_model"
CHROMIUM = "/usr/bin/chromium"  # Debian's package
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = os.environ.get("ONEDIFF_SCREENSHOTS_DIR")
JOB_TIMEOUT_S = 900  # a cold compile on a busy 2-core CPU
UI_TIMEOUT_MS = 20_000  # the status line follows a job or Apply within a few seconds (polled once a second)
PROGRESS_TEXT = re.compile(r"OneDiff: compiling the UNet graph for 64x64 \(UNet batch \d+\), (\d+) s")


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("the UI tests need the Python package 'playwright' (pip install playwright; no browser download: "
                    "they use Debian's chromium)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"the UI tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_api


def _loopback_only(route):
    if urllib.parse.urlsplit(route.request.url).hostname == "127.0.0.1":
        route.continue_()
    else:
        route.abort()


def browser_page(playwright_api, url, height=1000):
    """Yield a page of the webui at ``url`` in headless Chromium (loopback only), once its UI has loaded."""
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": height})
        context.route("**/*", _loopback_only)
        page = context.new_page()
        page.goto(url, timeout=120_000)
        page.locator("#txt2img_generate").wait_for(timeout=120_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def page(playwright_api, webui_with_ui):
    yield from browser_page(playwright_api, webui_with_ui.url)


@pytest.fixture(scope="module")
def expect(playwright_api):
    return playwright_api.expect


def screenshot(target, name, **options):
    """Keep a screenshot for the README when ``ONEDIFF_SCREENSHOTS_DIR`` is set."""
    if SCREENSHOTS:
        os.makedirs(SCREENSHOTS, exist_ok=True)
        target.screenshot(path=os.path.join(SCREENSHOTS, name), **options)


def open_tab(page, name, tabs="#tabs"):
    page.locator(f"{tabs} > .tab-nav button", has_text=re.compile(rf"^\s*{re.escape(name)}\s*$")).click()


def dropdown_values(dropdown):
    """Open a gradio dropdown and return its entries."""
    dropdown.locator("input").click()
    return dropdown.locator("li[data-testid=dropdown-option]").evaluate_all("items => items.map(i => i.dataset.value)")


def choose(dropdown, value):
    dropdown.locator("input").click()
    dropdown.locator(f"li[data-value={json.dumps(value)}]").click()


# gradio puts an HTML component's classes and id on its outer block and on its inner "prose" div: read the inner
def status_line(page, tab):
    return page.locator(f"#tab_{tab} .prose.onediff-status")


def select_script(page, tab):
    open_tab(page, tab)
    choose(page.locator(f"#{tab}_script_container #script_list"), SCRIPT)


def set_up_small_job(page):
    """A 64x64, 4-step txt2img job (the tiny test checkpoints are trained for nothing: speed is what counts)."""
    page.locator("#txt2img_prompt textarea").fill("a red cube on a table")
    for slider, value in (("txt2img_steps", 4), ("txt2img_width", 64), ("txt2img_height", 64)):
        number = page.locator(f"#{slider} input[type=number]")
        number.fill(str(value))
        number.press("Enter")


def job_info(page):
    return page.locator(".prose#html_info_txt2img").text_content() or ""


def generate(page, on_progress=None):
    """Run the txt2img job set up in the page and return its generation info, once the UI has it.

    ``on_progress(bar_text, img2img_status_line)`` is called twice a second while the job runs."""
    before = job_info(page)
    page.locator("#txt2img_generate").click()
    interrupt = page.locator("#txt2img_interrupt")
    interrupt.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    if on_progress is None:
        interrupt.wait_for(state="hidden", timeout=JOB_TIMEOUT_S * 1000)
    deadline = time.time() + JOB_TIMEOUT_S
    while on_progress is not None and interrupt.is_visible() and time.time() < deadline:
        # read in one step in the page: the bar is removed when the job ends, maybe between a count and a read
        bar_text = page.evaluate("() => document.querySelector('#tab_txt2img .progressDiv .progress')?.textContent")
        on_progress(bar_text or "", status_line(page, "img2img").text_content())
        page.wait_for_timeout(500)
    deadline = time.time() + UI_TIMEOUT_MS / 1000
    while job_info(page) == before and time.time() < deadline:
        page.wait_for_timeout(200)
    return job_info(page)


def onediff_value(info):
    """The "OneDiff" field of a job's generation info (the webui quotes a value holding commas or colons)."""
    found = re.search(r'OneDiff: ("(?:[^"\\]|\\.)*"|[^,]*)', info)
    assert found, f"no OneDiff field in the job's info: {info}"
    value = found.group(1)
    return json.loads(value) if value.startswith('"') else value


def open_onediff_settings(page):
    open_tab(page, "Settings")
    open_tab(page, "OneDiff", tabs="#settings")
    return page.locator("#settings_onediff")


def apply_settings(page, changed_key, expect):
    page.locator("#settings_submit").click()
    expect(page.locator(".prose#settings_result")).to_contain_text(changed_key, timeout=UI_TIMEOUT_MS)


def test_script_is_selectable_with_the_first_compile_notice_and_a_status_line(page, expect):
    for tab in ("img2img", "txt2img"):
        select_script(page, tab)
        notice = page.locator(f"#tab_{tab} .prose.onediff-notice")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text("The first job with a new model structure or image size compiles for about "
                                       "a minute (progress shows in the bar); later jobs reuse it.")
        expect(status_line(page, tab)).to_have_text(
            "OneDiff: backend auto (inductor here), 0 graph(s) cached. No job yet.")


def test_the_progress_bar_says_what_compiles_while_the_first_job_compiles(page, expect, webui_with_ui):
    """The first job compiles for about a minute inside its first step: the bar names the graph, the size and the
    seconds so far, and the status line in both tabs says the job is compiling (it is not the last job)."""
    set_up_small_job(page)
    elapsed_seen, status_seen = set(), set()

    def on_progress(bar_text, status):
        found = PROGRESS_TEXT.search(bar_text)
        if found:
            elapsed_seen.add(int(found.group(1)))
            status_seen.add(status)
            if found.group(1) == "10":
                screenshot(page, "txt2img_compiling.png")

    info = generate(page, on_progress)
    assert len(elapsed_seen) >= 2, f"the progress bar never showed a ticking compile line: {elapsed_seen}"
    assert any("Job compiling the UNet graph for 64x64" in status for status in status_seen), status_seen
    assert re.match(r"inductor, compiled UNetModel:\w+ in [\d.]+ s", onediff_value(info)), info
    last = webui_with_ui.status()["last_job"]
    assert last["compile_s"] > 0 and not webui_with_ui.status()["busy"]


def test_the_status_line_follows_each_job_in_both_tabs(page, expect, webui_with_ui):
    """Without reloading the page: after the compile job both lines name it; after a second job, that one."""
    for tab in ("txt2img", "img2img"):
        expect(status_line(page, tab)).to_contain_text(re.compile(r"Last job: inductor, compiled UNetModel:"),
                                                       timeout=UI_TIMEOUT_MS)
    assert onediff_value(generate(page)).startswith("inductor, reused UNetModel:")
    graph = webui_with_ui.status()["graphs"][0]["label"]
    for tab in ("txt2img", "img2img"):
        expect(status_line(page, tab)).to_contain_text(f"1 graph(s) cached: {graph}. Last job: inductor, reused",
                                                       timeout=UI_TIMEOUT_MS)


def test_graph_labels_tell_the_float_and_the_int8_graph_apart(page, expect, webui_with_ui):
    quantization = page.locator("#txt2img_script_container label", has_text="Model Quantization")
    checkbox = quantization.locator("input[type=checkbox]")
    bar_texts = set()
    checkbox.check()
    try:
        info = generate(page, lambda bar_text, _status: bar_texts.add(bar_text))
    finally:
        checkbox.uncheck()
    assert re.search(r"int8-(dynamic|weight-only) quantized", onediff_value(info)), info
    # its own first compile, and how long the last one (the float graph's) took
    compile_line = re.compile(r"OneDiff: compiling the int8-(dynamic|weight-only) UNet graph for 64x64 "
                              r"\(UNet batch \d+\), "
                              r"\d+ s \(last compile took \d+ s\)")
    assert any(compile_line.search(text) for text in bar_texts), bar_texts
    labels = [graph["label"] for graph in webui_with_ui.status()["graphs"]]
    float_label, int8_label = labels  # least recently used first
    assert float_label.split()[1:] == ["float", "default", "64x64"], labels
    assert re.fullmatch(r"int8-(dynamic|weight-only)", int8_label.split()[1]), labels
    assert int8_label.split()[2:] == ["default", "64x64"] and float_label.split()[0] == int8_label.split()[0]
    for tab in ("txt2img", "img2img"):
        expect(status_line(page, tab)).to_contain_text(f"2 graph(s) cached: {'; '.join(labels)}.",
                                                       timeout=UI_TIMEOUT_MS)


def test_readme_screenshots(page, expect):
    """After the float and the int8 job: the status line lists both graphs."""
    if not SCREENSHOTS:
        pytest.skip("ONEDIFF_SCREENSHOTS_DIR is not set: no screenshots to retake")
    open_tab(page, "txt2img")
    expect(status_line(page, "txt2img")).to_contain_text("2 graph(s) cached")
    page.mouse.move(0, 0)
    page.evaluate("window.scrollTo(0, 0)")
    checkbox = page.locator("#txt2img_script_container label", has_text="Model Quantization").locator("input")
    checkbox.check()  # as it was for the int8 job whose info the page shows
    try:
        screenshot(page, "txt2img_full.png")
        screenshot(page.locator("#txt2img_script_container"), "txt2img_script_selected.png")
    finally:
        checkbox.uncheck()


def test_the_backend_setting_marks_backends_that_cannot_run_and_the_status_names_the_resolved_one(
        page, expect, webui_with_ui):
    unavailable = webui_with_ui.status()["backends_unavailable"]
    if not unavailable:
        pytest.skip("every backend can run here: nothing to mark")
    name, reason = next(iter(unavailable.items()))  # oneflow first where it is missing
    section = open_onediff_settings(page)
    dropdown = section.locator("#setting_onediff_backend")
    entries = dropdown_values(dropdown)
    assert "auto (inductor here)" in entries and f"{name} (not available: {reason})" in entries, entries
    choose(dropdown, f"{name} (not available: {reason})")
    apply_settings(page, "onediff_backend", expect)
    status = webui_with_ui.status()
    assert status["backend"] == name and status["backend_resolved"] is None  # no job needed to know it
    open_tab(page, "txt2img")
    expect(status_line(page, "txt2img")).to_contain_text(f"backend {name} (not available: {reason})",
                                                         timeout=UI_TIMEOUT_MS)

    info = generate(page)  # runs eagerly: the image's info says why in a few words
    assert onediff_value(info) == f"eager (backend {name} not available)", info
    details = webui_with_ui.status()["last_job"]["details"]
    assert any(f"compile backend '{name}' is not available: {reason}" in detail for detail in details), details

    open_onediff_settings(page)
    choose(dropdown, "auto (inductor here)")
    apply_settings(page, "onediff_backend", expect)  # the result line already named this key: wait for the server
    deadline = time.time() + UI_TIMEOUT_MS / 1000
    while webui_with_ui.status()["backend_resolved"] != "inductor" and time.time() < deadline:
        time.sleep(0.2)
    assert webui_with_ui.status()["backend_resolved"] == "inductor"
    open_tab(page, "txt2img")
    expect(status_line(page, "txt2img")).to_contain_text("backend auto (inductor here)", timeout=UI_TIMEOUT_MS)


def test_the_compile_cache_line_follows_a_changed_folder_after_apply(page, expect, webui_with_ui, tmp_path):
    section = open_onediff_settings(page)
    folder_box = section.locator("#setting_onediff_cache_dir textarea")
    cache_line = section.locator(".prose#setting_onediff_compile_cache_size")
    original = folder_box.input_value()
    expect(cache_line).to_contain_text(f"in {original}", timeout=UI_TIMEOUT_MS)
    other = str(tmp_path / "other-compile-cache")
    folder_box.fill(other)
    apply_settings(page, "onediff_cache_dir", expect)
    expect(cache_line).to_have_text(f"Compile cache: 0 graph(s), 0.0 MB in {other}", timeout=UI_TIMEOUT_MS)
    assert webui_with_ui.status()["compile_cache"].endswith(f"in {other}")

    folder_box.fill(original)
    apply_settings(page, "onediff_cache_dir", expect)
    graphs_in_original = re.compile(rf"Compile cache: [1-9]\d* graph\(s\), [\d.]+ MB in {re.escape(original)}")
    expect(cache_line).to_contain_text(graphs_in_original, timeout=UI_TIMEOUT_MS)
    screenshot(section, "settings_onediff.png")
