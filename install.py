"""Install the extension's dependencies (requirements.txt), never touching an installed torch.

AUTOMATIC1111's webui runs this file at start-up, before the UI, as ``python install.py`` with its own root on
PYTHONPATH, so its ``launch`` module imports: missing packages are then installed with ``launch.run_pip`` and
an existing install costs one metadata check.
Standalone (``python install.py [--test]``) it does the same with pip, for the bench and the tests; if no
torch is present at all it installs the version this project is tested with (``ONEDIFF_TORCH_SPEC``).
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TORCH_SPEC = "torch==2.13.0"
_PACKAGING_TOOLS = {"pip", "setuptools", "wheel"}


def requirements(include_test=False, in_webui=False):
    """(distribution name, requirement line) for each line of requirements.txt; lines marked ``# test`` only
    with ``include_test``, lines marked ``# webui`` only inside the webui."""
    found = []
    with open(os.path.join(HERE, "requirements.txt")) as handle:
        for raw in handle:
            line, _, comment = raw.partition("#")
            line = line.strip()
            marker = comment.strip()
            if not line or (marker == "test" and not include_test) or (marker == "webui" and not in_webui):
                continue
            found.append((re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0], line))
    return found


def _installed(name):
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _satisfied(line, is_installed=_installed):
    """Installed at a version the requirement line accepts ('packaging' ships with pip and setuptools)."""
    name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]
    if not is_installed(name):
        return False
    try:
        from packaging.requirements import Requirement

        version = importlib.metadata.version(name)
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return True  # importable but without packaging or metadata (a source checkout): trust it
    return Requirement(line).specifier.contains(version, prereleases=True)


def missing(include_test=False, in_webui=False, is_installed=_installed):
    """Requirement lines to install: absent or at a version outside the line's range; never torch."""
    lines = requirements(include_test, in_webui)
    return [line for name, line in lines if name != "torch" and not _satisfied(line, is_installed)]


def _pin_torch_file(pin_everything=False):
    """A pip constraints file holding the installed torch, so no dependency can replace it.

    With ``pin_everything`` (inside the webui) it holds every installed distribution at its version: unpinned,
    the newest diffusers pulls huggingface-hub 1.x, which pulls transformers 5 and pydantic 2 and breaks
    A1111 v1.10.1 (transformers 4.30.2, fastapi 0.94); pinned, pip picks the versions that fit instead.

    The packaging tools are not pinned: SD.Next's venv holds setuptools 69.5.1 under a torch 2.13 that requires
    setuptools >= 77, and pip then found no solution for anything that depends on torch (measured with
    ``pip install --dry-run``). setuptools stays below 82, which removed ``pkg_resources`` (A1111 imports it).
    """
    if pin_everything:
        pins = {dist.metadata["Name"]: f"=={dist.version}" for dist in importlib.metadata.distributions()
                if dist.metadata["Name"] and dist.metadata["Name"].lower() not in _PACKAGING_TOOLS}
        pins["setuptools"] = "<82"
    else:
        pins = {"torch": f"=={importlib.metadata.version('torch')}"}
    pin = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    pin.write("".join(f"{name}{version}\n" for name, version in sorted(pins.items())))
    pin.close()
    return pin.name


def install_in_webui(launch):
    todo = missing(in_webui=True, is_installed=launch.is_installed)
    if not todo:
        return
    constraints = _pin_torch_file(pin_everything=True)
    quoted = " ".join(f'"{line}"' for line in todo)
    launch.run_pip(f"install -c \"{constraints}\" {quoted}", f"onediff_sd_webui_extensions: {', '.join(todo)}")


def install_standalone(include_test=False):
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if not _installed("torch"):
        spec = os.environ.get("ONEDIFF_TORCH_SPEC", DEFAULT_TORCH_SPEC)
        print(f"install.py: no torch found, installing {spec}", flush=True)
        subprocess.check_call(pip + [spec])
    todo = missing(include_test)
    if todo:
        print(f"install.py: installing {', '.join(todo)}", flush=True)
        subprocess.check_call(pip + ["-c", _pin_torch_file()] + todo)
    else:
        print("install.py: all dependencies present", flush=True)


if __name__ == "__main__":
    try:
        import launch  # the webui's module, importable only when the webui runs this file
    except ImportError:
        install_standalone(include_test="--test" in sys.argv[1:])
    else:
        install_in_webui(launch)
