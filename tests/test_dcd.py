"""DCD (Li et al., ICLR 2021): the op equals the official layers' math, re-expressed here.

`official_forward` follows what liyunsheng13/dcd's `conv_dy` / `conv_basic_dy` (resnet_dcd.py) and `DYModule`
(mobilenetv2_dcd.py) compute (written from the paper and those files' behaviour, not copied): the static conv's
output scaled by Lambda = hsigmoid(FC_scale(y)) where y = gate(FC(pool(x))); plus P applied to
BN2(Phi z) + z with z = BN1(Q x), Q a 1x1 conv with the layer's stride. It uses the op's parameter tensors but
none of its methods; BN1 runs as nn.BatchNorm2d would on (B, L, H, W), BN2 as nn.BatchNorm1d on (B, L, H*W).
Depthwise layers (no official counterpart) are checked against Lambda(x) * depthwise conv(x, W0).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dyconv_repro.errors import UserError
from dyconv_repro.models.policy import paper_policy_name
from dyconv_repro.ops import OPS, build_op
from dyconv_repro.ops.dcd import DCDConv2d, dcd_dims


def _hsig(t):
    return F.relu6(t + 3.0) / 3.0


def official_forward(op: DCDConv2d, x: torch.Tensor, stats: dict) -> torch.Tensor:
    """`stats` holds copies of the BN running buffers (updated here as the official BNs would update theirs)."""
    b, c = x.shape[:2]
    r = F.conv2d(x, op.weight, None, op.stride, op.padding, op.dilation, op.groups)
    y = F.adaptive_avg_pool2d(x, op.pool).view(b, c * op.pool ** 2)  # AdaptiveAvgPool2d(1 or 2).view(b, c*mul)
    y = y @ op.fc.weight.t()
    y = y * _hsig(y @ op.gate.weight.t())  # SEModule_small
    scale = _hsig(y @ op.fc_scale.weight.t()).view(b, -1, 1, 1)
    r = scale * r
    if not op.fusion:
        return r if op.bias is None else r + op.bias.view(1, -1, 1, 1)
    L = op.latent_dim
    phi = (y @ op.fc_phi.weight.t()).view(b, L, L)
    out = F.conv2d(x, op.q[:, :, None, None], None, op.stride)  # self.q: 1x1 conv with the layer's stride
    out = F.batch_norm(out, stats["m1"], stats["v1"], op.bn1.weight, op.bn1.bias, op.training, 0.1, op.bn1.eps)
    h, w = out.shape[-2:]
    out = out.view(b, L, -1)
    out = F.batch_norm(torch.matmul(phi, out), stats["m2"], stats["v2"], op.bn2.weight, op.bn2.bias, op.training,
                       0.1, op.bn2.eps) + out
    out = F.conv2d(out.view(b, -1, h, w), op.p[:, :, None, None]) + r
    return out if op.bias is None else out + op.bias.view(1, -1, 1, 1)


def official_param_count(cin, cout, k, rule) -> int:
    """Parameters of one official dynamic layer (conv_dy / conv_basic_dy / DYModule), from its definition."""
    L, pool, s = dcd_dims(cin, cout, rule)
    return cout * cin * k * k + L * cin + cout * L + 4 * L + cin * pool * pool * s + s * s + s * L * L + s * cout


# (C_in, C_out, k, stride, groups, rule): dense 3x3 (ResNet-50 conv_dy, ResNet-18 conv_basic_dy), stride 2,
# 1x1 (MobileNetV2 DYModule expanding / projecting, ResNet-50 1x1), depthwise
LAYERS = [(64, 64, 3, 1, 1, "resnet"), (64, 128, 3, 2, 1, "resnet"), (64, 64, 3, 1, 1, "resnet_basic"),
          (64, 128, 3, 2, 1, "resnet_basic"), (24, 144, 1, 1, 1, "mobilenet_v2"), (144, 24, 1, 1, 1, "mobilenet_v2"),
          (64, 256, 1, 1, 1, "resnet"), (32, 48, 3, 1, 1, "paper"), (32, 32, 3, 2, 32, "mobilenet_v2"),
          (32, 32, 3, 1, 32, "paper")]


def _randomize(op: DCDConv2d) -> dict:
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0) / max(1.0, p.shape[-1] ** 0.5))
        stats = {}
        if op.fusion:
            for i, bn in ((1, op.bn1), (2, op.bn2)):
                bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.1)
                bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
                stats[f"m{i}"], stats[f"v{i}"] = bn.running_mean.clone(), bn.running_var.clone()
    return stats


@pytest.mark.parametrize("cin,cout,k,s,g,rule", LAYERS)
def test_equals_official_math(cin, cout, k, s, g, rule):
    torch.manual_seed(0)
    op = build_op("dcd", cin, cout, k, stride=s, groups=g, rule=rule)
    stats = _randomize(op)
    x = torch.randn(3, cin, 9, 9)
    op.eval()
    want = official_forward(op, x, stats)
    torch.testing.assert_close(op(x), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(op.reference_forward(x), want, atol=1e-4, rtol=1e-4)
    xg = x.clone().requires_grad_(True)
    gy = torch.randn_like(want)
    (g_op,) = torch.autograd.grad(op(xg), xg, gy)
    (g_off,) = torch.autograd.grad(official_forward(op, xg, stats), xg, gy)
    torch.testing.assert_close(g_op, g_off, atol=1e-4, rtol=1e-4)
    # training: batch statistics, and the running statistics move exactly as the official BNs' do
    op.train()
    want = official_forward(op, x, stats)
    torch.testing.assert_close(op(x), want, atol=1e-4, rtol=1e-4)
    if op.fusion:
        for i, bn in ((1, op.bn1), (2, op.bn2)):
            torch.testing.assert_close(bn.running_mean, stats[f"m{i}"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(bn.running_var, stats[f"v{i}"], atol=1e-5, rtol=1e-5)
    (g_op,) = torch.autograd.grad(op(xg), xg, gy)
    (g_off,) = torch.autograd.grad(official_forward(op, xg, stats), xg, gy)
    torch.testing.assert_close(g_op, g_off, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cin,cout,k,s,g,rule", [r for r in LAYERS if r[4] == 1])
def test_parameter_count_equals_the_official_layer(cin, cout, k, s, g, rule):
    op = build_op("dcd", cin, cout, k, stride=s, groups=g, rule=rule)
    assert sum(p.numel() for p in op.parameters()) == official_param_count(cin, cout, k, rule)


def test_latent_dims_of_the_official_models():
    # ResNet-50 conv_dy: int(sqrt(C_in)); ResNet-18 conv_basic_dy: int(sqrt(4 C_in)) on a 2x2 pooled input
    assert dcd_dims(64, 64, "resnet")[:2] == (8, 1) and dcd_dims(256, 64, "resnet")[:2] == (16, 1)
    assert dcd_dims(64, 64, "resnet_basic")[:2] == (16, 2)
    # MobileNetV2 DYModule: expanding 24 -> 144 pools 2x2, projecting 144 -> 24 pools 1x1
    assert dcd_dims(24, 144, "mobilenet_v2")[:2] == (12, 2) and dcd_dims(144, 24, "mobilenet_v2")[:2] == (12, 1)
    # the paper's rule L = floor(C / 2^floor(log2 sqrt C))
    assert dcd_dims(64, 64, "paper")[0] == 8 and dcd_dims(128, 64, "paper")[0] == 16 and dcd_dims(96, 9, "paper")[0] == 12


def test_bad_options_are_one_clear_error():
    with pytest.raises(UserError, match=r"latent_dim must be an integer in \[1, min\(in_channels, out_channels\)\] "
                                        r"= \[1, 16\]"):
        build_op("dcd", 16, 32, 3, latent_dim=17)
    with pytest.raises(UserError, match=r"\[1, 16\]"):
        build_op("dcd", 16, 32, 3, latent_dim=0)
    with pytest.raises(UserError, match="rule 'nope' is not valid; choose one of paper, resnet"):
        build_op("dcd", 16, 32, 3, rule="nope")
    assert build_op("dcd", 16, 32, 3, latent_dim=16).latent_dim == 16


def test_static_weight_is_w0_and_registered():
    conv = torch.nn.Conv2d(8, 12, 3, padding=1, bias=True)
    op = build_op("dcd", 8, 12, 3, bias=True)
    op.load_static_weight(conv.weight, conv.bias)
    assert torch.equal(op.weight, conv.weight) and torch.equal(op.bias, conv.bias)
    assert "dcd" in OPS and paper_policy_name("dcd") == "dcd"
    y = build_op("dcd", 8, 8, 1).train()(torch.randn(1, 8, 1, 1))  # one value per channel: running statistics
    assert y.shape == (1, 8, 1, 1)


@pytest.mark.parametrize("cin,cout,k,s,g,rule", LAYERS)
def test_unfused_official_form_equals_the_fused_kernel(cin, cout, k, s, g, rule):
    torch.manual_seed(0)
    op = build_op("dcd", cin, cout, k, stride=s, groups=g, rule=rule, bias=True)
    _randomize(op)
    x = torch.randn(2, cin, 8, 8, requires_grad=True)
    for train in (False, True):
        op.train(train)
        gy = torch.randn(op(x).shape)
        outs = []
        for fused in (None, False):
            op.fused = fused
            y = op(x)
            (gx,) = torch.autograd.grad(y, x, gy)
            outs.append((y, gx))
        op.fused = None
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-4, rtol=1e-4)
    assert "training_form" in DCDConv2d.capabilities()
