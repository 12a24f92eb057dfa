import pytest
import torch

from compile import INDUCTOR, BackendUnavailable, available_backends, resolve_backend
from compile import CompileOptions, backends
from compile.backends import _inductor_backend


def test_inductor_is_registered_in_onediffs_registry():
    from onediff.infer_compiler.backends.registry import lookup_backend

    assert resolve_backend("inductor") == INDUCTOR
    assert lookup_backend(INDUCTOR) is _inductor_backend


def test_auto_picks_a_usable_backend():
    assert available_backends()[resolve_backend("auto")] is None


@pytest.mark.parametrize("name", ["oneflow", "nexfort"])
def test_missing_onediff_backend_is_reported_not_faked(name):
    if available_backends()[name] is None:
        pytest.skip(f"{name} is installed and usable here")
    with pytest.raises(BackendUnavailable) as error:
        resolve_backend(name)
    message = str(error.value)
    assert f"'{name}' is not available" in message and "install" in message
    assert error.value.reason  # the why, e.g. the import error


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(BackendUnavailable, match="unknown backend .*inductor"):
        resolve_backend("tensorrt")


def test_inductor_freezing_is_refused_because_it_ignores_in_place_weights():
    with pytest.raises(ValueError, match="freezing"):
        _inductor_backend(torch.nn.Linear(2, 2), options={"freezing": True})


@pytest.mark.parametrize("mode, mode_options", [(None, {}), ("reduce-overhead", {"triton.cudagraphs": True}),
                                                ("max-autotune-no-cudagraphs", {"max_autotune": True})])
def test_a_quantized_graph_gets_its_inductor_settings_beside_the_mode_and_a_float_graph_none(monkeypatch, mode,
                                                                                            mode_options):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: calls.append(kwargs) or module)
    module = torch.nn.Linear(4, 4)
    backends.compile_module(module, backends.INDUCTOR, CompileOptions(mode=mode, quantization="int8"))
    backends.compile_module(module, backends.INDUCTOR, CompileOptions(mode=mode))
    quantized, plain = calls
    assert quantized["mode"] is None  # torch.compile refuses a mode and options together
    assert quantized["options"]["force_fuse_int_mm_with_mul"] is True
    assert mode_options.items() <= quantized["options"].items()  # the mode's own settings (CUDA graphs) kept
    assert plain["mode"] == mode and "options" not in plain
