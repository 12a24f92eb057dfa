"""Install the extension's dependencies (requirements.txt), never touching an installed torch.

Inside AUTOMATIC1111's webui this file runs at start-up, before the UI, with the webui's ``launch`` module:
missing packages are installed with ``launch.run_pip`` and an existing install costs one import check.
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


def requirements(include_test=False):
    """(distribution name, requirement line) for each line of requirements.txt."""
    found = []
    with open(os.path.join(HERE, "requirements.txt")) as handle:
        for raw in handle:
            line, _, comment = raw.partition("#")
            line = line.strip()
            if not line or (comment.strip() == "test" and not include_test):
                continue
            found.append((re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0], line))
    return found


def _installed(name):
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _satisfied(line):
    """Installed at a version the requirement line accepts ('packaging' ships with pip and setuptools)."""
    name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]
    if not _installed(name):
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return True
    return Requirement(line).specifier.contains(importlib.metadata.version(name), prereleases=True)


def missing(include_test=False):
    return [line for name, line in requirements(include_test) if name != "torch" and not _satisfied(line)]


def _pin_torch_file():
    """A pip constraints file holding the installed torch, so no dependency can replace it."""
    pin = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    pin.write(f"torch=={importlib.metadata.version('torch')}\n")
    pin.close()
    return pin.name


def install_in_webui():
    import launch  # the webui's module; only present when the webui runs this file

    todo = missing()
    if not todo:
        return
    constraints = _pin_torch_file()
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
    install_standalone(include_test="--test" in sys.argv[1:])
else:
    install_in_webui()
