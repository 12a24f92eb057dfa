"""The attention swap for compiled calls, against stand-ins for A1111's attention forwards.

The stand-in for Doggettx reads free memory through psutil on every call, as A1111's does on a CPU; the
stand-in for sdp-no-mem enters ``torch.backends.cuda.sdp_kernel`` as A1111's does. Graph breaks are counted
with dynamo's own counters. The real webui is exercised by the integration tests.
"""

import itertools
import types
import warnings

import psutil
import pytest
import torch

from compile import graph_break_count
from onediff_sd_webui_extensions.a1111.attention import traceable_attention, untraceable_forward


def _heads(t, heads):
    batch, tokens, inner = t.shape
    return t.view(batch, tokens, heads, inner // heads).transpose(1, 2)


def sdp_forward(self, x, context=None, mask=None):
    context = x if context is None else context
    q, k, v = (_heads(t, self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(x.shape))


def memory_reading_forward(self, x, context=None, mask=None):
    """Doggettx's shape: the slicing depends on the free memory read at every call."""
    free = psutil.virtual_memory().available
    context = x if context is None else context
    q, k, v = (_heads(t, self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
    slices = 1 if free > 0 else 2
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    out = torch.cat([s @ v for s in scores.chunk(slices, dim=2)], dim=2)
    return self.to_out(out.transpose(1, 2).reshape(x.shape))


def no_mem_forward(self, x, context=None, mask=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=False):
            return sdp_forward(self, x, context, mask)


def invoke_ai_forward(self, x, context=None, mask=None):
    """InvokeAI's shape: reads free memory on CUDA only (here it never does)."""
    return sdp_forward(self, x, context, mask)


OPTIMIZATIONS = types.SimpleNamespace(
    scaled_dot_product_attention_forward=sdp_forward,
    split_cross_attention_forward=memory_reading_forward,
    scaled_dot_product_no_mem_attention_forward=no_mem_forward,
    split_cross_attention_forward_invokeAI=invoke_ai_forward,
)


class CrossAttention(torch.nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(dim, dim) for _ in range(4))


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(CrossAttention() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


_compiles = itertools.count()


def compile_fresh(model):
    """``torch.compile(model)`` with a forward of its own code object: dynamo caches per code object and does not
    guard on a class's ``forward``, so each compile here traces anew without resetting dynamo (which would make
    the session's shared graphs compile again)."""
    code = Blocks.forward.__code__.replace(co_name=f"forward_{next(_compiles)}")
    model.forward = types.MethodType(types.FunctionType(code, Blocks.forward.__globals__), model)
    return torch.compile(model)


@pytest.fixture
def attention_module():
    """A stand-in for ``ldm.modules.attention`` whose CrossAttention has A1111's selected forward."""
    yield types.SimpleNamespace(CrossAttention=CrossAttention)
    if "forward" in CrossAttention.__dict__:
        del CrossAttention.forward


def test_which_forwards_are_replaced():
    assert untraceable_forward(memory_reading_forward, OPTIMIZATIONS, "cpu") == "split_cross_attention_forward"
    assert untraceable_forward(no_mem_forward, OPTIMIZATIONS, "cuda") == "scaled_dot_product_no_mem_attention_forward"
    assert untraceable_forward(invoke_ai_forward, OPTIMIZATIONS, "cpu") is None  # slices by shape only on a CPU
    assert untraceable_forward(invoke_ai_forward, OPTIMIZATIONS, "cuda") == "split_cross_attention_forward_invokeAI"
    assert untraceable_forward(sdp_forward, OPTIMIZATIONS, "cuda") is None


@pytest.mark.parametrize("selected", [memory_reading_forward, no_mem_forward])
def test_compiled_calls_trace_one_graph_and_match_eager(attention_module, selected):
    CrossAttention.forward = selected
    model, x = Blocks().eval(), torch.randn(2, 8, 16)
    with torch.no_grad():
        eager = model(x)

        breaks = graph_break_count()
        compile_fresh(model)(x)
        assert graph_break_count() > breaks, "the stand-in must break the graph, or this test proves nothing"

        breaks = graph_break_count()
        with traceable_attention("cpu", OPTIMIZATIONS, [attention_module]) as replaced:
            compiled = compile_fresh(model)(x)
    assert replaced == untraceable_forward(selected, OPTIMIZATIONS, "cpu")
    assert graph_break_count() == breaks
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert CrossAttention.forward is selected, "the user's choice is back after the call"


def test_traceable_selection_is_left_alone(attention_module):
    CrossAttention.forward = sdp_forward
    with traceable_attention("cuda", OPTIMIZATIONS, [attention_module]) as replaced:
        assert replaced is None and CrossAttention.forward is sdp_forward
    with traceable_attention("cuda", types.SimpleNamespace(), [attention_module]) as replaced:  # outside the webui
        assert replaced is None
