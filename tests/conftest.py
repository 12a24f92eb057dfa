"""Shared fixtures. Compiling a tiny UNet costs about a minute of CPU, so compiled graphs are built once per
session and shared, and inductor's on-disk cache lives in one folder reused across runs
(``ONEDIFF_TEST_INDUCTOR_CACHE``, default ``~/.cache/onediff_sd_webui_extensions/inductor-tests``)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.environ.get(
        "ONEDIFF_TEST_INDUCTOR_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "onediff_sd_webui_extensions", "inductor-tests"),
    ),
)

import pytest  # noqa: E402
import torch  # noqa: E402

from compile import CompileOptions, GraphCache  # noqa: E402
from compile.models import build_preset, example_inputs  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _no_grad_session():
    """Every call in the suite runs under no_grad: switching grad modes between calls would recompile."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def graph_cache():
    """One graph cache for the session: tests that compile the same structure share its graph."""
    return GraphCache(max_graphs=16)


class Compiled:
    """A preset UNet, its compiled counterpart from the session cache (already called once), and inputs."""

    def __init__(self, cache, preset, options=None, **overrides):
        self.unet = build_preset(preset, seed=0, **overrides)
        self.inputs = example_inputs(self.unet)
        self.lookup = cache.get(self.unet, "inductor", options)
        self.compiled = self.lookup.unet
        self.first_output = self.inputs.call(self.compiled)

    @property
    def captured(self):
        """The module whose tensors the graph reads (a private alias of the first module's storage)."""
        return self.lookup.entry.module


@pytest.fixture(scope="session")
def tiny_sd15(graph_cache):
    return Compiled(graph_cache, "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl(graph_cache):
    return Compiled(graph_cache, "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd15_int8(graph_cache):
    """The ``tiny`` UNet compiled with int8 Linears (its own graph; ``unet`` stays the float eager module)."""
    return Compiled(graph_cache, "tiny", options=CompileOptions(quantization="int8"))
