"""Structured Convolutions: the sum-pool paths and deploy's decompose-or-keep-dense rule (decompose=auto)."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyconv_repro.models.deploy import DECOMPOSE_MIN_GAIN, deploy_transform
from dyconv_repro.ops.cpu import native
from dyconv_repro.ops.cpu.sum_pool import channel_box_running
from dyconv_repro.ops.engine import backends_disabled
from dyconv_repro.ops.structured import (
    StructuredConv2d,
    StructuredLinear,
    SumPool,
    SumPool1d,
    channel_box_sum,
)
from tests.conftest import count_native_calls


def _reference_sumpool(x, cpg, groups, window, padding, dilation):
    """Slow reference (the original implementation's math): zero-pad H, W, then a 3-D conv with a box
    of ones over (channels within a group, H, W), groups folded into the batch."""
    ph, pw = padding
    x = F.pad(x, (pw, pw, ph, ph))
    b, _, h, w = x.shape
    y = F.conv3d(x.reshape(b * groups, 1, cpg, h, w), x.new_ones(1, 1, *window), dilation=(1, *dilation))
    return y.reshape(b, -1, y.shape[-2], y.shape[-1])


GRID = [g for g in itertools.product((1, 6), (1, 3), (1, 2, 4), (1, 2, 3), (0, 1, 2), (1, 2), (False, True))
        if g[2] <= g[0]]


@pytest.mark.parametrize("impl", ["bare", "aten", "native"])
def test_sumpool_matches_reference_grid(impl, monkeypatch):
    """Every implementation equals the 3-D conv reference: the device-agnostic one (no backend), the CPU
    backend's aten one (native code suspended or not built) and the native one (csrc/sum_pool.cpp), which runs
    for every NCHW and channels_last input."""
    counted = count_native_calls(monkeypatch, "sum_pool") if impl == "native" else None
    torch.manual_seed(0)
    context = {"bare": backends_disabled, "aten": native.suspended}.get(impl, contextlib.nullcontext)
    with context():
        for cpg, groups, wc, ws, p, d, cl in GRID:
            x = torch.randn(2, cpg * groups, 7, 8)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            pool = SumPool(cpg, groups, (wc, ws, ws), p, d)
            ref = _reference_sumpool(x.contiguous().double(), cpg, groups, (wc, ws, ws), (p, p), (d, d))
            torch.testing.assert_close(pool(x).double(), ref, atol=1e-5, rtol=1e-5,
                                       msg=f"{impl}: cpg={cpg} g={groups} wc={wc} ws={ws} p={p} d={d} cl={cl}")
    if counted is not None:
        assert counted.calls == len(GRID)


def test_native_sumpool_on_real_layer_sizes_and_its_refusals(monkeypatch):
    """ResNet-20's decomposed 32->32 layer at batch 1 and 3 (running window over 17 of 32 channels, tasks split
    across threads), MobileNetV2's 960->160 pointwise (a channel box only), rectangular windows with dilation,
    each in both memory formats; an input that needs a gradient, or a strided view, keeps aten."""
    counted = count_native_calls(monkeypatch, "sum_pool")
    torch.manual_seed(0)
    cases = [(1, 32, 1, (17, 2, 2), (1, 1), (1, 1), (16, 16)), (3, 32, 1, (17, 2, 2), (1, 1), (1, 1), (16, 16)),
             (2, 960, 1, (481, 1, 1), (0, 0), (1, 1), (7, 7)), (2, 9, 2, (4, 3, 2), (2, 0), (2, 3), (11, 9))]
    for batch, cpg, groups, window, pad, dil, hw in cases:
        pool = SumPool(cpg, groups, window, pad, dil)
        x = torch.randn(batch, cpg * groups, *hw)
        ref = _reference_sumpool(x.double(), cpg, groups, window, pad, dil)
        for xin in (x, x.to(memory_format=torch.channels_last)):
            y = pool(xin)
            torch.testing.assert_close(y.double(), ref, atol=2e-4, rtol=1e-5)
            assert y.is_contiguous(memory_format=torch.channels_last) == (xin.stride(1) == 1)
    assert counted.calls == 2 * len(cases)
    x = torch.randn(1, 32, 16, 16, requires_grad=True)
    pool = SumPool(32, 1, (17, 2, 2), (1, 1))
    pool(x).sum().backward()
    with torch.no_grad():
        pool(torch.randn(1, 32, 16, 32)[..., ::2])  # neither layout
    assert counted.calls == 2 * len(cases) and x.grad is not None
    with torch.no_grad():
        pool(x)
    assert counted.calls == 2 * len(cases) + 1


@pytest.mark.parametrize("channels,window", [(16, 9), (96, 49), (7, 1), (5, 5)])
def test_channel_box_paths_agree(channels, window):
    """cumsum + shifted difference and the running window both equal the direct box sum."""
    torch.manual_seed(0)
    x = torch.randn(3, channels, 5, 6)
    ref = x.double().unfold(1, window, 1).sum(-1)
    torch.testing.assert_close(channel_box_sum(x, window).double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(channel_box_running(x, window).double(), ref, atol=1e-4, rtol=1e-5)
    xl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(channel_box_sum(xl, window).double(), ref, atol=1e-4, rtol=1e-5)


def test_sumpool_large_nchw_map_uses_running_window_exactly():
    """Large maps: the running-window channel path (NCHW slab >= 32768) and the depthwise ones-conv
    spatial path (channels_last, > 16384 elements) still give the reference sum, as does the device-agnostic
    form (cumsum channel box, no per-channel loop)."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 128, 130)
    for d in (1, 2):
        pool = SumPool(12, 1, (7, 2, 2), (1, 1), (d, d))
        ref = _reference_sumpool(x.double(), 12, 1, (7, 2, 2), (1, 1), (d, d))
        for xin in (x, x.to(memory_format=torch.channels_last)):
            with native.suspended():
                torch.testing.assert_close(pool(xin).double(), ref, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(pool.box_sum(xin).double(), ref, atol=1e-4, rtol=1e-5)


def test_sumpool1d_matches_unfold():
    x = torch.randn(4, 3, 20)
    torch.testing.assert_close(SumPool1d(8)(x), x.unfold(-1, 8, 1).sum(-1), atol=1e-5, rtol=1e-5)


def _structured(cin, cout, k, **kw):
    return StructuredConv2d(cin, cout, k, mode="parameterize", bias=True, **kw).eval()  # random alpha


@pytest.mark.parametrize("cin,cout,k,kw,decomposes", [
    (64, 64, 3, {}, True),                      # gain 299: dense 3x3 with enough channels
    (16, 16, 3, {}, False),                     # gain 75: pool costs more than the MAdds it saves
    (64, 384, 1, {}, True),                     # expanding pointwise, gain 192
    (384, 64, 1, {}, False),                    # projecting pointwise, gain 32
    (32, 32, 3, {"groups": 32}, False),         # depthwise, gain 5
    (32, 64, 3, {"stride": 2}, False),          # stride 2: 4x fewer outputs to amortize the pool over
])
def test_decompose_rule_and_both_forms_equal_training_form(cin, cout, k, kw, decomposes):
    torch.manual_seed(0)
    op = _structured(cin, cout, k, **kw)
    assert (op.decompose_gain() >= DECOMPOSE_MIN_GAIN) == decomposes
    x = torch.randn(2, cin, 9, 9)
    with torch.no_grad():
        y = op(x)
        auto, full = deploy_transform(op, "auto"), op.decompose()  # decompose() is always the decomposition
        assert isinstance(full, nn.Sequential) and isinstance(full[0], SumPool)
        assert isinstance(auto, nn.Sequential) == decomposes
        if not decomposes:
            assert type(auto) is nn.Conv2d
        for form in (auto, full):
            for xin in (x, x.to(memory_format=torch.channels_last)):
                torch.testing.assert_close(form(xin), y, atol=1e-4, rtol=1e-4)


def test_linear_decompose_rule():
    torch.manual_seed(0)
    wide = StructuredLinear(64, 100, c=32, mode="parameterize").eval()   # gain 50: keep nn.Linear
    big = StructuredLinear(64, 400, c=32, mode="parameterize").eval()    # gain 200: pool + small FC
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert type(deploy_transform(wide, "auto")) is nn.Linear
        assert isinstance(deploy_transform(big, "auto")[0], SumPool1d) and isinstance(wide.decompose()[0], SumPool1d)
        for lin in (wide, big):
            for form in (lin.decompose(), deploy_transform(lin, "auto")):
                torch.testing.assert_close(form(x), lin(x), atol=1e-4, rtol=1e-4)
