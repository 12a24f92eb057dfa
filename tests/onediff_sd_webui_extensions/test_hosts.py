"""One subpackage per webui: ``hosts`` is the only way from the shared package to a host's code, and no host
subpackage imports another's. Checked on the source (the hosts' modules import the webui, so they are parsed,
not imported)."""

import ast
import importlib.util
import os

import pytest

from onediff_sd_webui_extensions import hosts

PACKAGE = "onediff_sd_webui_extensions"
PACKAGE_DIR = os.path.dirname(importlib.util.find_spec(PACKAGE).origin)
HOSTS = (hosts.A1111, hosts.SDNEXT)


def _imported_modules(path, package):
    """Absolute names of the modules a file imports (relative imports resolved against ``package``)."""
    tree = ast.parse(open(path).read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def _python_files(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                relative = os.path.relpath(root, os.path.dirname(PACKAGE_DIR)).replace(os.sep, ".")
                yield path, relative


def _host_of(module_name):
    parts = module_name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE and parts[1] in HOSTS else None


@pytest.mark.parametrize("host", HOSTS)
def test_each_host_is_a_subpackage_with_its_job_module(host):
    assert importlib.util.find_spec(f"{PACKAGE}.{host}") is not None
    assert os.path.isfile(os.path.join(PACKAGE_DIR, host, "hooks.py"))


def test_an_unknown_host_is_refused():
    with pytest.raises(ValueError, match="unknown webui host"):
        hosts.job_hooks("forge")


def test_no_host_subpackage_imports_another():
    for host in HOSTS:
        for path, package in _python_files(os.path.join(PACKAGE_DIR, host)):
            others = {_host_of(name) for name in _imported_modules(path, package)} - {None, host}
            assert not others, f"{path} imports the {sorted(others)} subpackage"


def test_the_shared_package_reaches_hosts_only_through_hosts_py():
    for path, package in _python_files(PACKAGE_DIR):
        if _host_of(package) or os.path.basename(path) == "hosts.py":
            continue
        reached = sorted({_host_of(name) for name in _imported_modules(path, package)} - {None})
        assert not reached, f"{path} imports the {reached} subpackage directly"


def test_the_checker_sees_a_cross_import(tmp_path):
    """The checks above can fail: a relative import into the other host is resolved to its subpackage."""
    source = tmp_path / "hooks.py"
    source.write_text("from ..sdnext import unet_router\nfrom . import lora_bridge\n")
    hosts_reached = {_host_of(name) for name in _imported_modules(str(source), f"{PACKAGE}.a1111")}
    assert hosts_reached == {"sdnext", "a1111"}
