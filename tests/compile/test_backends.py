import pytest
import torch

from compile import INDUCTOR, BackendUnavailable, available_backends, resolve_backend
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
