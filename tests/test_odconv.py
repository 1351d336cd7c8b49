"""ODConv (Li, Zhou, Yao, ICLR 2022): the op equals the official module's math, re-expressed here.

`official_forward` follows what OSVAI/ODConv `modules/odconv.py` computes, in its order (written from the paper
and that file's behaviour, not copied): GAP -> 1x1 FC (no bias) -> BN -> ReLU; four heads divided by the
temperature (sigmoid for spatial / channel / filter, softmax for the kernel number), skipped for depthwise
(filter), 1x1 (spatial) and K=1 (kernel); the input is scaled by the channel attention, convolved (batch folded
into groups) with sum_i a_s * a_w_i * W_i, and the output scaled by the filter attention. It reads the op's
parameter tensors but none of its methods.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dyconv_repro.engine.hooks import annealed_temperature
from dyconv_repro.errors import UserError
from dyconv_repro.models.policy import paper_policy_name
from dyconv_repro.ops import OPS, build_op
from dyconv_repro.ops.odconv import ODConv2d


def official_forward(op: ODConv2d, x: torch.Tensor) -> torch.Tensor:
    b, cin, h, w = x.shape
    k = op.kernel_size[0]
    tau = float(op.temperature)
    z = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1), as nn.AdaptiveAvgPool2d(1)
    z = F.conv2d(z, op.fc.weight[:, :, None, None])
    z = F.batch_norm(z, op.bn.running_mean.clone(), op.bn.running_var.clone(), op.bn.weight, op.bn.bias,
                     op.training, 0.1, op.bn.eps)
    z = F.relu(z)

    def fc(lin):
        return F.conv2d(z, lin.weight[:, :, None, None], lin.bias).view(b, -1)

    channel = torch.sigmoid(fc(op.channel_fc) / tau).view(b, -1, 1, 1)
    depthwise = cin == op.groups == op.out_channels
    filt = 1.0 if depthwise else torch.sigmoid(fc(op.filter_fc) / tau).view(b, -1, 1, 1)
    spatial = 1.0 if k == 1 else torch.sigmoid(fc(op.spatial_fc) / tau).view(b, 1, 1, 1, k, k)
    kern = 1.0 if op.num_kernels == 1 else torch.softmax(fc(op.kernel_fc) / tau, dim=1).view(b, -1, 1, 1, 1, 1)
    if k == 1 and op.num_kernels == 1:  # the official 1x1/K=1 branch: one static kernel, no batch folding
        out = F.conv2d(x * channel, op.weight[0], None, op.stride, op.padding, op.dilation, op.groups)
        return out * filt
    xin = (x * channel).reshape(1, -1, h, w)
    weight = (spatial * kern * op.weight.unsqueeze(0)).sum(dim=1)  # (B, C_out, C_in/g, k, k)
    weight = weight.reshape(-1, cin // op.groups, k, k)
    out = F.conv2d(xin, weight, None, op.stride, op.padding, op.dilation, op.groups * b)
    out = out.view(b, op.out_channels, out.shape[-2], out.shape[-1]) * filt
    return out


def official_param_count(cin, cout, k, groups, num_kernels, reduction=0.0625, min_hidden=16) -> int:
    """Parameters of one official ODConv2d (kernels + Attention with its BN), counted from the layer's definition."""
    a = max(int(cin * reduction), min_hidden)
    n = num_kernels * cout * (cin // groups) * k * k + cin * a + 2 * a + (a * cin + cin)
    if not (cin == groups == cout):
        n += a * cout + cout
    if k > 1:
        n += a * k * k + k * k
    if num_kernels > 1:
        n += a * num_kernels + num_kernels
    return n


# (C_in, C_out, k, stride, groups): dense 3x3, stride 2, depthwise, 1x1, grouped
LAYERS = [(16, 24, 3, 1, 1), (16, 24, 3, 2, 1), (32, 32, 3, 2, 32), (32, 32, 3, 1, 32), (24, 40, 1, 1, 1),
          (24, 40, 1, 2, 1), (16, 24, 3, 1, 4)]


def _randomize(op: ODConv2d) -> None:
    """Random weights everywhere (incl. BN statistics, zero-initialized biases) so every head matters."""
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        op.bn.running_mean.copy_(torch.randn_like(op.bn.running_mean) * 0.1)
        op.bn.running_var.copy_(torch.rand_like(op.bn.running_var) + 0.5)


@pytest.mark.parametrize("num_kernels", (1, 4))
@pytest.mark.parametrize("cin,cout,k,s,g", LAYERS)
def test_equals_official_math(cin, cout, k, s, g, num_kernels):
    torch.manual_seed(0)
    op = build_op("odconv", cin, cout, k, stride=s, groups=g, num_kernels=num_kernels)
    _randomize(op)
    op.set_temperature(3.0)  # the temperature divides every head
    x = torch.randn(3, cin, 9, 9)
    for train in (False, True):  # eval: running BN statistics; train: the batch's
        op.train(train)
        want = official_forward(op, x)
        torch.testing.assert_close(op(x), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(op.reference_forward(x), want, atol=1e-5, rtol=1e-4)
    xg = x.clone().requires_grad_(True)
    op.eval()
    gy = torch.randn_like(want)
    (g_op,) = torch.autograd.grad(op(xg), xg, gy)
    (g_off,) = torch.autograd.grad(official_forward(op, xg), xg, gy)
    torch.testing.assert_close(g_op, g_off, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_kernels", (1, 4))
@pytest.mark.parametrize("cin,cout,k,s,g", LAYERS)
def test_parameter_count_equals_the_official_layer(cin, cout, k, s, g, num_kernels):
    op = build_op("odconv", cin, cout, k, stride=s, groups=g, num_kernels=num_kernels)
    assert sum(p.numel() for p in op.parameters()) == official_param_count(cin, cout, k, g, num_kernels)
    assert (op.filter_fc is None) == (cin == g == cout) and (op.spatial_fc is None) == (k == 1)
    assert (op.kernel_fc is None) == (num_kernels == 1)


def test_bad_options_are_one_clear_error():
    for bad in (dict(num_kernels=0), dict(num_kernels=-2), dict(num_kernels=1.5)):
        with pytest.raises(UserError, match=r"num_kernels must be an integer >= 1"):
            build_op("odconv", 8, 8, 3, **bad)
    with pytest.raises(UserError, match=r"reduction must be in \(0, 1\]"):
        build_op("odconv", 8, 8, 3, reduction=0)
    with pytest.raises(UserError, match="temperature must be > 0"):
        build_op("odconv", 8, 8, 3).set_temperature(0)


def test_batch_one_training_uses_running_statistics_and_is_registered():
    op = build_op("odconv", 8, 8, 3).train()
    y = op(torch.randn(1, 8, 5, 5))  # nn.BatchNorm would refuse a batch of one; the op falls back to eval BN
    assert y.shape == (1, 8, 5, 5)
    assert "odconv" in OPS and paper_policy_name("odconv") == "odconv"
    assert "set_temperature" in ODConv2d.capabilities()


def test_temperature_schedule_is_the_official_one():
    """Official utils.get_temperature: 1 + max(0, (30 - 1) * (total - t) / total) at iteration t of 10 epochs."""
    ipe = 37
    total = 10 * ipe
    for t in (0, 1, 100, total - 1, total, total + 50):
        official = 1.0 + max(0.0, (30.0 - 1.0) * ((total - t) / total))
        assert annealed_temperature(t, ipe, 30.0, 1.0, 10) == pytest.approx(official)
