"""The attention a compiled UNet is traced with in A1111 (v1.10.1).

A1111 replaces ``CrossAttention.forward`` of ldm (SD1/SD2) and sgm (SDXL) with the selected "cross attention
optimization" (``modules/sd_hijack_optimizations.py``). Several of them cannot be traced by dynamo:

- Doggettx (``split_cross_attention_forward``), the default on an NVIDIA GPU without ``--xformers``, and
  sub-quadratic read the free device memory on every call (``torch.cuda.mem_get_info``, ``psutil`` on a CPU)
  to choose a slicing; InvokeAI does so on CUDA;
- sdp-no-mem enters ``torch.backends.cuda.sdp_kernel``, which dynamo does not trace.

Each is a graph break (measured with torch 2.13: the memory read breaks the graph, ``sdp_kernel`` makes dynamo
give up on the whole frame), so the compiled UNet would run as dozens of small graphs with Python between
them, or not compiled at all. During compiled calls those forwards are replaced by A1111's own
scaled-dot-product forward (its "sdp" option: the same attention, one traceable call that inductor lowers to
flash or memory-efficient kernels). Traceable selections (sdp, xformers, V1, InvokeAI on a CPU, none) are
left as they are, and eager calls (text encoder, VAE, other jobs) keep the user's choice.

Nothing from the webui is imported at module level: its modules are found in ``sys.modules`` or passed in.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Iterator, Optional, Sequence

UNTRACEABLE = ("split_cross_attention_forward", "sub_quad_attention_forward",
               "scaled_dot_product_no_mem_attention_forward")
UNTRACEABLE_ON_CUDA = ("split_cross_attention_forward_invokeAI",)
REPLACEMENT = "scaled_dot_product_attention_forward"
ATTENTION_MODULES = ("ldm.modules.attention", "sgm.modules.attention")

_SWAP_LOCK = threading.RLock()


def untraceable_forward(forward: Any, optimizations: Any, device_type: str) -> Optional[str]:
    """The name of ``forward`` if it is one of A1111's attention forwards dynamo cannot trace, else None."""
    names = UNTRACEABLE + (UNTRACEABLE_ON_CUDA if device_type == "cuda" else ())
    return next((name for name in names if getattr(optimizations, name, None) is forward), None)


@contextlib.contextmanager
def traceable_attention(device_type: str, optimizations: Any = None,
                        attention_modules: Optional[Sequence[Any]] = None) -> Iterator[Optional[str]]:
    """Run the block with a traceable cross-attention forward; yields the name of the forward it replaced
    (None when the selected one traces as it is, or outside the webui)."""
    optimizations = optimizations if optimizations is not None else sys.modules.get("modules.sd_hijack_optimizations")
    replacement = getattr(optimizations, REPLACEMENT, None)
    if attention_modules is None:
        attention_modules = [sys.modules[name] for name in ATTENTION_MODULES if name in sys.modules]
    with _SWAP_LOCK:
        swapped = []
        replaced = None
        if replacement is not None:
            for module in attention_modules:
                cls = getattr(module, "CrossAttention", None)
                name = untraceable_forward(cls.__dict__.get("forward"), optimizations, device_type) if cls else None
                if name is not None:
                    swapped.append((cls, cls.__dict__["forward"]))
                    cls.forward = replacement
                    replaced = name
        try:
            yield replaced
        finally:
            for cls, forward in reversed(swapped):
                cls.forward = forward
