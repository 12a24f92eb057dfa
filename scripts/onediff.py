"""Webui entry point: the selectable script "onediff_diffusion_model" (txt2img and img2img), in AUTOMATIC1111's
webui and in SD.Next.

Thin on purpose: argument parsing and state are in ``onediff_sd_webui_extensions.state``, the settings and the
status route in ``onediff_sd_webui_extensions.webui_common``, and the job itself in the host's module
(``a1111/hooks.py`` for A1111, ``sdnext/hooks.py`` for SD.Next; ``hosts`` picks it).
"""

import html
import os
import sys

# The webui puts an extension's root on sys.path only while it loads the scripts; keep it for later imports.
_EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXTENSION_ROOT not in sys.path:
    sys.path.insert(0, _EXTENSION_ROOT)

import gradio as gr  # noqa: E402
from modules import script_callbacks, scripts  # noqa: E402

from onediff_sd_webui_extensions import hosts, webui_common  # noqa: E402
from onediff_sd_webui_extensions.state import SCRIPT_TITLE, STATE, ScriptArgs  # noqa: E402

HOST = hosts.detect()
job_hooks = hosts.job_hooks(HOST)


FIRST_COMPILE_NOTICE = ("The first job with a new model structure or image size compiles for about a minute "
                        "(progress shows in the bar); later jobs reuse it.")


def _status_html() -> str:
    return f"<p>{html.escape(STATE.summary())}</p>"


class Script(scripts.Script):
    def title(self):
        return SCRIPT_TITLE

    def show(self, is_img2img):
        return True  # selectable in both tabs ("script_name" only finds selectable scripts)

    def ui(self, is_img2img):
        quantization = gr.Checkbox(value=False, **webui_common.quantization_checkbox())
        gr.HTML(value=f"<p>{html.escape(FIRST_COMPILE_NOTICE)}</p>", elem_classes="onediff-notice")
        with gr.Row():
            # a callable value is evaluated on every page load; javascript/onediff_status.js keeps it current
            status = gr.HTML(value=_status_html, elem_classes="onediff-status")
            refresh = gr.Button(value="Refresh status", size="sm", scale=0, min_width=130)
        refresh.click(fn=_status_html, inputs=[], outputs=[status])
        return [quantization]

    def run(self, p, *args):
        return job_hooks.process_images(p, ScriptArgs.parse(list(args)))


webui_common.apply_settings()  # the status line is right before any job
script_callbacks.on_ui_settings(webui_common.on_ui_settings)
script_callbacks.on_app_started(webui_common.on_app_started)
if HOST == hosts.A1111:
    script_callbacks.on_cfg_denoiser(job_hooks.on_cfg_denoiser)  # the refiner switches models between steps
    script_callbacks.on_app_started(job_hooks.on_app_started)  # after every extension loaded: ControlNet's check
