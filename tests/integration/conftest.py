"""Run the real AUTOMATIC1111 webui (v1.10.1) with this extension installed: API alone for the API tests, with
its browser UI for the UI tests.

Needs ``WEBUI_DIR`` (a webui checkout with its ``repositories/``) and ``WEBUI_PYTHON`` (a Python with the
webui's requirements; default: this interpreter). The session builds tiny checkpoints, gives the webui its own
data folder (``--data-dir``: settings, models and ``extensions/`` live there, the checkout is not touched),
links this repository into that ``extensions/`` folder, installs the extension's dependencies by running
``install.py`` as the webui does (every installed package pinned), starts the API on a free loopback port
and stops it at the end. Everything stays on 127.0.0.1; nothing is downloaded.
"""

import json
import os
import subprocess
import sys

import pytest
from .webui_server import WebUI, checkout_from_env, free_port, stop, wait_until_serving

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "onediff_sd_webui_extensions"
STARTUP_TIMEOUT_S = 600


def _webui_dir():
    return checkout_from_env("WEBUI_DIR", "launch.py", "AUTOMATIC1111 webui v1.10.1 (stable-diffusion-webui)")


@pytest.fixture(scope="session")
def webui_python():
    return os.environ.get("WEBUI_PYTHON") or sys.executable


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, webui_python):
    """Tiny SD1-layout checkpoints (see tiny_checkpoints.py), built with the webui's own ldm code."""
    webui_dir = _webui_dir()
    folder = tmp_path_factory.mktemp("checkpoints")
    result = subprocess.run(
        [webui_python, os.path.join(HERE, "tiny_checkpoints.py"), webui_dir, str(folder)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, json.loads(result.stdout.strip().splitlines()[-1])


def start_webui(tmp_path_factory, webui_python, tiny_checkpoints, *, with_ui=False, name="webui-data",
                other_extensions=None, control_models=None, extra_args=(), auth=None):
    """Start the webui with this extension in its own data folder; yields a :class:`WebUI` once it answers.

    ``with_ui``: serve the browser UI as well as the API (a UI build takes longer to start); otherwise
    ``--nowebui``, the API alone. ``other_extensions``: {folder name: checkout} installed beside ours;
    ``control_models``: a folder linked as the data folder's ``models/ControlNet``; ``extra_args``: more
    command-line flags; ``auth``: the (user, password) the client sends (for ``--api-auth``)."""
    webui_dir = _webui_dir()
    checkpoint_dir, names = tiny_checkpoints
    data_dir = tmp_path_factory.mktemp(name)
    extensions = data_dir / "extensions"
    extensions.mkdir()
    os.symlink(REPO_ROOT, extensions / EXTENSION_NAME)
    for folder_name, checkout in (other_extensions or {}).items():
        os.symlink(checkout, extensions / folder_name)
    if control_models:
        (data_dir / "models").mkdir()
        os.symlink(control_models, data_dir / "models" / "ControlNet")

    # As the webui runs it: ``python install.py`` with the webui's root on PYTHONPATH, so ``import launch`` works.
    install = subprocess.run(
        [webui_python, os.path.join(REPO_ROOT, "install.py")], cwd=webui_dir, capture_output=True, text=True,
        timeout=1800, env=dict(os.environ, PYTHONPATH=webui_dir),
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    port = free_port()
    # the compile cache folder (default: inside the extension) goes to this session's data folder
    (data_dir / "config.json").write_text(json.dumps({"onediff_cache_dir": str(data_dir / "compile-cache")}))
    log_path = data_dir / "webui.log"
    command = [
        webui_python, "launch.py", "--skip-prepare-environment", "--use-cpu", "all", "--no-half",
        "--precision", "full", "--no-download-sd-model", "--api", *([] if with_ui else ["--nowebui"]),
        "--server-name", "127.0.0.1",
        "--port", str(port), "--data-dir", str(data_dir), "--ckpt-dir", str(checkpoint_dir),
        "--ckpt", str(checkpoint_dir / f"{names[0]}.safetensors"), "--lora-dir", str(checkpoint_dir / "Lora"),
        *extra_args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=webui_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = WebUI(f"http://127.0.0.1:{port}", process, log_path, names, auth)
    try:
        wait_until_serving(server, STARTUP_TIMEOUT_S)
        # keep every graph the tests build (float, other heads, int8) so none is evicted and compiled twice
        assert server.request("/sdapi/v1/options", {"onediff_max_graphs": 4})[0] == 200
        yield server
    finally:
        stop(process)


CONTROLNET_COMMIT = "56cec5b2"  # sd-webui-controlnet v1.1.455, the version the seam is checked against


@pytest.fixture(scope="session")
def controlnet_checkout():
    """sd-webui-controlnet (Mikubill) at v1.1.455, from ``CONTROLNET_DIR``; its requirements must be installed in
    ``CONTROLNET_PYTHON`` (default: ``WEBUI_PYTHON``), as its own install.py would (it downloads, so it is not
    run here)."""
    return checkout_from_env("CONTROLNET_DIR", os.path.join("scripts", "hook.py"),
                             f"sd-webui-controlnet v1.1.455 (Mikubill, commit {CONTROLNET_COMMIT})")


@pytest.fixture(scope="session")
def controlnet_python(controlnet_checkout, webui_python):
    return os.environ.get("CONTROLNET_PYTHON") or webui_python


@pytest.fixture(scope="session")
def tiny_control_models(tmp_path_factory, controlnet_python):
    """Checkpoints whose UNets fit the tiny control models, and the models (see tiny_control_models.py)."""
    folder = tmp_path_factory.mktemp("control-checkpoints")
    result = subprocess.run(
        [controlnet_python, os.path.join(HERE, "tiny_control_models.py"), _webui_dir(), str(folder)],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def webui_with_controlnet(tmp_path_factory, controlnet_python, controlnet_checkout, tiny_control_models):
    """The API with sd-webui-controlnet installed beside this extension, on the control models' checkpoints."""
    folder, built = tiny_control_models
    yield from start_webui(tmp_path_factory, controlnet_python, (folder, built["checkpoints"]),
                           name="webui-controlnet-data", other_extensions={"sd-webui-controlnet": controlnet_checkout},
                           control_models=folder / built["control_dir"])


@pytest.fixture(scope="session")
def webui(tmp_path_factory, webui_python, tiny_checkpoints):
    """The API alone (``--nowebui``), for test_webui_api.py."""
    yield from start_webui(tmp_path_factory, webui_python, tiny_checkpoints)


API_USER = ("alice", "s3cret")


@pytest.fixture(scope="session")
def webui_with_api_auth(tmp_path_factory, webui_python, tiny_checkpoints):
    """The API alone, started with ``--api-auth``; the client sends :data:`API_USER`'s credentials."""
    yield from start_webui(tmp_path_factory, webui_python, tiny_checkpoints, name="webui-auth-data",
                           extra_args=("--api-auth", ":".join(API_USER)), auth=API_USER)


@pytest.fixture(scope="session")
def webui_with_ui(tmp_path_factory, webui_python, tiny_checkpoints):
    """The browser UI and the API, with its own data and compile cache folders (its first job compiles)."""
    yield from start_webui(tmp_path_factory, webui_python, tiny_checkpoints, with_ui=True, name="webui-ui-data")


@pytest.fixture(scope="session")
def webui_with_controlnet_ui(tmp_path_factory, controlnet_python, controlnet_checkout, tiny_control_models):
    """The browser UI and the API with sd-webui-controlnet beside this extension, on the control models'
    checkpoints, with its own data and compile cache folders (for test_webui_controlnet_ui.py)."""
    folder, built = tiny_control_models
    yield from start_webui(tmp_path_factory, controlnet_python, (folder, built["checkpoints"]), with_ui=True,
                           name="webui-controlnet-ui-data",
                           other_extensions={"sd-webui-controlnet": controlnet_checkout},
                           control_models=folder / built["control_dir"])
