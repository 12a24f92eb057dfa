"""The module that stands in for the webui's UNet during a job, as seen by everything else in the webui.

While a job runs, ``sd_model.model.diffusion_model`` is a stand-in whose only submodule is the eager UNet:

- its state dict is the eager UNet's, under the UNet's own keys. The webui loads a checkpoint of the same
  config into the live model with ``load_state_dict(strict=False)`` (the refiner does so in the middle of
  sampling); without this every UNet key would be skipped silently and the rest of the job would run the
  previous checkpoint's weights;
- the weights loaded that way reach the compiled graph through its binding before the next compiled call
  (:meth:`EagerUNetView.bind_pending_weights`). Writing in place is not enough: A1111's
  ``reload_model_weights`` moves the model to the CPU, loads, and moves it back, so on a GPU the eager UNet
  ends up with new tensors the graph never read (on a CPU the moves are no-ops and the load lands in place);
- the compiled graph (and the module whose tensors it captured) is not a submodule: when the webui moves the
  model (``send_model_to_trash`` moves an unloaded model to the ``meta`` device when the refiner loads another
  model object, ``--medvram`` moves it between devices) only the eager UNet moves, and the graph's captured
  weights stay valid for the next job.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class EagerUNetView(torch.nn.Module):
    """Base of the stand-in: ``eager`` is the only submodule, and state dicts pass through to it.

    ``binding`` is the compiled graph's weight binding (``compile.graph_cache.FloatBinding`` or
    ``compile.quantization.Int8Binding``): ``bind(eager)`` writes the eager UNet's weights into the tensors
    the graph reads.
    """

    def __init__(self, eager: torch.nn.Module, compiled: Any, binding: Any):
        super().__init__()
        self.eager = eager
        object.__setattr__(self, "compiled", compiled)  # not a submodule: never moved or saved with the model
        object.__setattr__(self, "binding", binding)
        self.weights_pending = False  # the eager UNet has weights the graph has not been given yet
        self._register_load_state_dict_pre_hook(self._route_keys_to_eager)
        self._register_state_dict_hook(_state_dict_as_eager)

    def _route_keys_to_eager(self, state_dict, prefix, *_args) -> None:
        for key in [key for key in state_dict if key.startswith(prefix)]:
            state_dict[f"{prefix}eager.{key[len(prefix):]}"] = state_dict.pop(key)
        self.weights_pending = True  # a pre-hook: bound at the next call, after the webui's moves

    def bind_pending_weights(self) -> Optional[Any]:
        """Give the graph the eager UNet's weights if it lacks them (the webui loaded new ones since the last
        call, or switched back to this model); returns the binding's report, or None when there was nothing to
        bind. Call it before every compiled call."""
        if not self.weights_pending:
            return None
        self.weights_pending = False
        return self.binding.bind(self.eager)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["eager"], name)


def _state_dict_as_eager(_module, state_dict, prefix, _local_metadata):
    for key in [key for key in state_dict if key.startswith(prefix)]:
        value = state_dict.pop(key)
        if key.startswith(f"{prefix}eager."):
            state_dict[prefix + key[len(prefix) + len("eager."):]] = value
    return state_dict
