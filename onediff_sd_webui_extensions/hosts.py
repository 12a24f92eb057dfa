"""Which webui the extension runs in, and the module that runs its jobs there.

AUTOMATIC1111's webui (and forks that kept its ldm/sgm UNets) runs jobs through ``a1111/hooks.py``; SD.Next, whose
generation goes through diffusers pipelines (``modules.processing_diffusers``, absent from A1111), through
``sdnext/hooks.py``. Both share the settings, the status route and the checkbox (``webui_common``).
"""

from __future__ import annotations

import importlib
import importlib.util

A1111 = "a1111"
SDNEXT = "sdnext"


def detect() -> str:
    """``sdnext`` where the running webui has SD.Next's diffusers processing, else ``a1111``."""
    try:
        found = importlib.util.find_spec("modules.processing_diffusers") is not None
    except ModuleNotFoundError:  # no ``modules`` package at all: not inside a webui
        found = False
    return SDNEXT if found else A1111


def job_hooks(host: str):
    """The module with ``process_images(p, script_args)`` for ``host`` (imports the webui's modules)."""
    if host not in (A1111, SDNEXT):
        raise ValueError(f"unknown webui host {host!r}")
    return importlib.import_module(f"{__package__}.{host}.hooks")
