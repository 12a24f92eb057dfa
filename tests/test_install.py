"""install.py reads requirements.txt and never lets torch be installed over the user's."""

import importlib.util
import os

from conftest import ROOT


def load_install_module():
    spec = importlib.util.spec_from_file_location("onediff_install", os.path.join(ROOT, "install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imported, not run: outside the webui it installs nothing
    return module


def test_markers_select_lines():
    install = load_install_module()
    standalone = [name for name, _ in install.requirements()]
    with_tests = [name for name, _ in install.requirements(include_test=True)]
    in_webui = [name for name, _ in install.requirements(in_webui=True)]
    assert "torch" in standalone and "onediff" in standalone and "pytest" not in standalone
    assert "pytest" in with_tests and "gradio" not in with_tests and "gradio" in in_webui


def test_torch_is_never_in_the_install_list(monkeypatch):
    install = load_install_module()
    monkeypatch.setattr(install, "_satisfied", lambda line, is_installed=None: False)  # as if nothing were installed
    todo = install.missing(include_test=True, in_webui=True)
    assert todo and not any(line.startswith("torch") and not line.startswith("torchao") for line in todo)


def test_nothing_missing_after_setup():
    assert load_install_module().missing(include_test=True) == []


def test_inside_the_webui_every_installed_package_is_pinned():
    import importlib.metadata

    install = load_install_module()
    with open(install._pin_torch_file(pin_everything=True)) as handle:
        pins = set(handle.read().split())
    assert f"torch=={importlib.metadata.version('torch')}" in pins
    assert f"pytest=={importlib.metadata.version('pytest')}" in pins  # not only torch: the webui's packages too
    # the packaging tools may move (SD.Next's setuptools is older than torch requires), setuptools not past 82
    assert not any(pin.startswith(("pip==", "wheel==", "setuptools==")) for pin in pins)
    assert "setuptools<82" in pins
