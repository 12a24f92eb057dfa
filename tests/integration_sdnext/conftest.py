"""Run the real SD.Next (diffusers backend) headless, with this extension installed, for the API tests.

Needs ``SDNEXT_DIR`` (an SD.Next checkout) and ``SDNEXT_PYTHON`` (a Python with SD.Next's requirements;
default: this interpreter). The session builds tiny diffusers pipelines and a LoRA (``tiny_pipelines.py``),
gives SD.Next its own data and models folders (``--data-dir``, ``--models-dir``; the checkout is not touched),
links this repository into ``<data-dir>/extensions``, runs ``install.py`` as SD.Next's installer does, starts
it on a free loopback port with ``--skip-all`` (no installs, no downloads) and stops it at the end.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from integration.webui_server import WebUI, checkout_from_env, free_port, stop, wait_until_serving

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "onediff_sd_webui_extensions"
STARTUP_TIMEOUT_S = 600


def _sdnext_dir():
    return checkout_from_env("SDNEXT_DIR", os.path.join("modules", "processing_diffusers.py"),
                             "SD.Next (vladmandic/sdnext, diffusers backend)")


@pytest.fixture(scope="session")
def sdnext_python():
    return os.environ.get("SDNEXT_PYTHON") or sys.executable


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, sdnext_python):
    """Tiny SD1.5 and SDXL diffusers pipelines, a LoRA and a ControlNet, built with SD.Next's diffusers."""
    _sdnext_dir()
    folder = tmp_path_factory.mktemp("models")
    result = subprocess.run([sdnext_python, os.path.join(HERE, "tiny_pipelines.py"), str(folder)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, json.loads(result.stdout.strip().splitlines()[-1])


# SD.Next 058a7f0c's /sdapi/v1/control answers every request without "xyz" with a TypeError ("control_run() got
# an unexpected keyword argument 'xyz'"): its APIControl deletes the excluded request field only when it is set,
# and pydantic 2 copies it along as None. A request with "xyz" runs the xyz grid script instead of the requested
# one, so the session adds this test-only extension, which drops the None before the call (and does nothing
# where SD.Next no longer passes it). The ControlNet tests use the route; SD.Next's Control tab does not.
CONTROL_ROUTE_FIX = '''"""Test-only: drop the xyz=None that SD.Next's /sdapi/v1/control passes to control_run."""
from modules.api import control as api_control

_sanitize_args = api_control.APIControl.sanitize_args


def sanitize_args(self, args):
    args = _sanitize_args(self, args)
    if "xyz" in args and args["xyz"] is None:
        del args["xyz"]
    return args


api_control.APIControl.sanitize_args = sanitize_args
'''


def _install_control_route_fix(extensions_dir):
    scripts = extensions_dir / "test-control-route-fix" / "scripts"
    scripts.mkdir(parents=True)
    (scripts / "control_route_fix.py").write_text(CONTROL_ROUTE_FIX)


def _wait_until_generating(server, timeout_s=300):
    """SD.Next loads its start-up model in a background thread after the API answers; a job sent meanwhile is
    aborted ("model not loaded": an answer without info). Return once a one-step eager job generates."""
    deadline = time.time() + timeout_s
    while not server.post_ok("/sdapi/v1/txt2img", {"prompt": "warm-up", "steps": 1, "width": 64, "height": 64})["info"]:
        if time.time() > deadline:
            pytest.fail(f"SD.Next did not generate within {timeout_s} s\n{server.log_tail()}")
        time.sleep(2)


@pytest.fixture(scope="session")
def sdnext(tmp_path_factory, sdnext_python, tiny_models):
    yield from start_sdnext(tmp_path_factory, sdnext_python, tiny_models)


def start_sdnext(tmp_path_factory, sdnext_python, tiny_models, name="sdnext-data"):
    """Start SD.Next with this extension in its own data folder ``name``; yields a :class:`WebUI` once it
    generates, and stops it after."""
    sdnext_dir = _sdnext_dir()
    models_dir, names = tiny_models
    data_dir = tmp_path_factory.mktemp(name)
    extension = data_dir / "extensions" / EXTENSION_NAME
    extension.parent.mkdir()
    os.symlink(REPO_ROOT, extension)
    _install_control_route_fix(extension.parent)

    # As SD.Next's installer runs an extension's install.py: in the extension's folder, SD.Next on PYTHONPATH.
    install = subprocess.run(
        [sdnext_python, "install.py"], cwd=extension, capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, PYTHONPATH=sdnext_dir),
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    settings = {
        "sdnq_dequantize_compile": False,  # SD.Next's quantizer would compile at start-up otherwise
        "onediff_cache_dir": str(data_dir / "compile-cache"),  # not inside the extension (the repository)
        "onediff_max_graphs": 4,  # SD1.5 and SDXL graphs both stay: none is compiled twice
    }
    (data_dir / "config.json").write_text(json.dumps(settings))
    log_path = data_dir / "sdnext.out"
    port = free_port()
    command = [sdnext_python, "launch.py", "--skip-all", "--use-cpu", "all", "--server-name", "127.0.0.1",
               "--port", str(port), "--data-dir", str(data_dir), "--models-dir", str(models_dir),
               "--log", str(data_dir / "sdnext.log")]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=sdnext_dir, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    checkpoints = [f"Diffusers/{name}" for name in names["sd15"]] + [f"Diffusers/{names['sdxl']}"]
    server = WebUI(f"http://127.0.0.1:{port}", process, log_path, checkpoints)
    try:
        wait_until_serving(server, STARTUP_TIMEOUT_S, "SD.Next")
        server.post_ok("/sdapi/v1/options", {"sd_model_checkpoint": checkpoints[0]})
        _wait_until_generating(server)
        yield server
    finally:
        stop(process)
