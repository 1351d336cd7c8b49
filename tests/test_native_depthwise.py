"""The native channels_last per-sample depthwise conv (csrc/depthwise.cpp) == one plain conv per sample."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dyconv_repro.ops import build_op
from dyconv_repro.ops.engine import ConvCall, dynamic_conv2d, loop_conv2d
from dyconv_repro.ops.engine import select_path as choose
from tests.conftest import count_native_calls

CL = torch.channels_last


def select_path(x, weight, stride, padding, groups):
    """The dispatch point's choice for these per-sample kernels on x."""
    return choose(ConvCall.of(x, weight, stride, padding, (1, 1), groups))

# (channels, batch, kernel, stride, padding, dilation, map): channel counts off the 8-lane vector width and
# over one 64-channel gradient block (batch 1 splits channels into blocks, larger batches split samples);
# stride 2 with odd and even maps, no / large padding, dilation, a rectangular kernel.
CASES = [
    (8, 3, (3, 3), 1, 1, 1, (7, 7)),
    (13, 2, (3, 3), 2, 1, 1, (9, 8)),
    (70, 1, (3, 3), 1, 1, 1, (6, 6)),
    (70, 4, (5, 5), 2, 2, 1, (11, 11)),
    (16, 2, (3, 3), 1, 0, 1, (5, 5)),
    (16, 2, (3, 3), 1, 2, 2, (6, 7)),
    (24, 3, (3, 5), 1, (1, 2), 1, (6, 6)),
    (9, 2, (7, 7), 2, 3, 1, (8, 8)),
]


@pytest.fixture
def counted(monkeypatch):
    return count_native_calls(monkeypatch, "depthwise_")


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _run(fn, x, w, b, gy):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), gy))


@pytest.mark.parametrize("c, batch, k, s, p, d, hw", CASES)
def test_native_depthwise_equals_per_sample_convs(c, batch, k, s, p, d, hw, counted):
    """Output, input gradient, kernel gradient and bias gradient == one F.conv2d per sample."""
    stride, padding, dilation = _pair(s), _pair(p), _pair(d)
    x = torch.randn(batch, c, *hw).to(memory_format=CL)
    w = torch.randn(batch, c, 1, *k)
    b = torch.randn(batch, c)
    with torch.no_grad():
        gy = torch.randn_like(loop_conv2d(x, w, b, stride, padding, dilation, c))
    ref = _run(lambda x, w, b: loop_conv2d(x, w, b, stride, padding, dilation, c), x, w, b, gy)
    out = _run(lambda x, w, b: dynamic_conv2d(x, w, b, stride, padding, dilation, c, path="depthwise"), x, w, b, gy)
    assert counted.calls == 3, "forward, input gradient and kernel gradient did not all run natively"
    assert out[0].is_contiguous(memory_format=CL) and out[1].is_contiguous(memory_format=CL)
    for name, got, want in zip(("y", "grad x", "grad kernel", "grad bias"), out, ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("name", ("dynamicconv", "condconv", "weightnet"))
def test_depthwise_ops_pick_the_native_path_for_channels_last_input(name, counted):
    """A depthwise dynamic op in training, channels_last input: auto runs the native kernel, == reference;
    NCHW input keeps the aten paths."""
    op = build_op(name, 12, 12, 3, groups=12, bias=True).train()
    x = torch.randn(4, 12, 10, 10)
    assert select_path(x.to(memory_format=CL), torch.randn(4, 12, 1, 3, 3), (1, 1), (1, 1), 12) == "depthwise"
    assert select_path(x, torch.randn(4, 12, 1, 3, 3), (1, 1), (1, 1), 12) in ("fold", "loop")
    xr = x.clone().requires_grad_(True)
    y_ref = op.reference_forward(xr)
    gy = torch.randn_like(y_ref)
    ref = torch.autograd.grad(y_ref, [xr, *op.parameters()], gy)
    xc = x.to(memory_format=CL).requires_grad_(True)
    y = op(xc)
    got = torch.autograd.grad(y, [xc, *op.parameters()], gy)
    assert counted.calls == 3
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_depthwise_path_refuses_what_it_cannot_run(counted):
    """Forced on an NCHW input or a non-depthwise kernel it says why; under a dispatch mode (FlopCounterMode
    counting MAdds) auto keeps the aten conv so that the count sees it, and under CPU autocast too."""
    w = torch.randn(2, 6, 1, 3, 3)
    with pytest.raises(ValueError, match="channels_last"):
        dynamic_conv2d(torch.randn(2, 6, 5, 5), w, None, (1, 1), (1, 1), (1, 1), 6, path="depthwise")
    with pytest.raises(ValueError, match="groups == in_channels"):
        dynamic_conv2d(torch.randn(2, 6, 5, 5).to(memory_format=CL), torch.randn(2, 6, 3, 3, 3), None, (1, 1),
                       (1, 1), (1, 1), 2, path="depthwise")
    x = torch.randn(2, 6, 5, 5).to(memory_format=CL)
    with FlopCounterMode(display=False) as flops:
        assert select_path(x, w, (1, 1), (1, 1), 6) != "depthwise"
        dynamic_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 6)
    assert counted.calls == 0 and flops.get_total_flops() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # aten computes in bf16 there; the fp32 kernel must not run
        assert select_path(x, w, (1, 1), (1, 1), 6) != "depthwise"
