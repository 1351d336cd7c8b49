"""Static-structure operators: mixconv, structured, refconv, se."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.models.deploy import decompose_pays, deploy_transform
from dyconv_repro.ops import build_op
from dyconv_repro.ops.mixconv import MixConv, split_channels
from dyconv_repro.ops.refconv import RefConv
from dyconv_repro.ops.se import SqueezeExcite
from dyconv_repro.ops.structured import StructuredConv2d, StructuredLinear, box_basis
from dyconv_repro.ops.walkers import decompose_model, reparameterize_model

C = 4
GRID = list(itertools.product((1, 3, 5), (1, 2), (1, 2, C), (False, True), (None, 0), (1, 2)))
VARIANTS = {
    "mixconv": ("mixconv", {}),
    "structured-reg": ("structured", {"mode": "regularize"}),
    "structured-par": ("structured", {"mode": "parameterize"}),
    "refconv": ("refconv", {"init": "xavier"}),
    "se": ("se", {}),
}


def _may_refuse(variant, k, s, g, padding, d):
    """Combinations an op may legitimately refuse (with a UserError)."""
    if variant == "mixconv":  # 3 groups of kernels 3,5,7 need >= 3 conv groups, and 'same'-able padding
        return g == 2 or padding is not None
    return False


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conv_parity_grid(variant):
    torch.manual_seed(0)
    name, kw = VARIANTS[variant]
    x0 = torch.randn(2, C, 11, 11)
    refused = 0
    for k, s, g, bias, padding, d in GRID:
        tag = f"{variant} k={k} s={s} g={g} bias={bias} padding={padding} d={d}"
        try:
            op = build_op(name, C, C, k, stride=s, padding=padding, dilation=d, groups=g, bias=bias, **kw)
        except UserError as e:
            assert _may_refuse(variant, k, s, g, padding, d), f"{tag} refused: {e}"
            assert str(e) and "\n" not in str(e)
            refused += 1
            continue
        ref = nn.Conv2d(C, C, k, s, d * (k - 1) // 2 if padding is None else padding, d, g, bias=bias)
        for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            assert getattr(op, a) == getattr(ref, a), f"{tag}: attribute {a}"
        for train in (True, False):
            op.train(train)
            x = x0.clone().to(memory_format=torch.channels_last).requires_grad_(True)
            y = op(x)
            assert y.shape == ref(x0).shape, tag
            y.square().mean().backward()
            assert x.grad is not None and torch.isfinite(x.grad).all(), tag
        assert all(p.grad is not None for p in op.parameters()), f"{tag}: a parameter got no gradient"
        if variant == "structured-par":  # the decomposition must reproduce every geometry exactly
            with torch.no_grad():
                for xin in (x0, x0.to(memory_format=torch.channels_last)):
                    for form in (op.decompose(), deploy_transform(op, "auto")):  # pool + small conv; the rule's choice
                        torch.testing.assert_close(form(xin), op(x0), atol=1e-5, rtol=1e-4, msg=tag)
        if variant == "mixconv" and g > 1:  # split and fused implementations agree
            with torch.no_grad():
                op.impl = "split"
                y_split = op(x0)
                op.impl = "fused"
                torch.testing.assert_close(op(x0), y_split, atol=1e-5, rtol=1e-4, msg=tag)
    if variant == "mixconv":
        assert refused > 0  # g=2 with 3 kernel groups must be refused
    else:
        assert refused == 0


def test_mixconv_refuses_bad_input():
    for kwargs in ({"split": "log"}, {"kernel_sizes": [3, 4]}, {"impl": "fast"}):
        with pytest.raises(UserError):
            build_op("mixconv", 8, 8, 3, groups=8, **kwargs)
    with pytest.raises(UserError, match="groups"):
        build_op("mixconv", 8, 8, 3, groups=2)
    with pytest.raises(UserError, match="non-empty"):
        build_op("mixconv", 4, 4, 3, groups=4, kernel_sizes=[3, 5, 7, 9, 11])


# ---------------------------------------------------------------- MixConv
def test_mixconv_split_rules():
    assert split_channels(10, 3, "equal") == [4, 3, 3]  # remainder to the FIRST group
    assert split_channels(32, 4, "equal") == [8, 8, 8, 8]
    assert split_channels(32, 4, "exp") == [16, 8, 4, 4]  # the paper's example
    assert split_channels(24, 3, "exp") == [12, 6, 6]
    op = MixConv(10, 10, 3, groups=10)
    assert op.in_splits == [4, 3, 3] and op.kernel_sizes == [3, 5, 7]
    assert [c.kernel_size[0] for c in op.convs] == [3, 5, 7]
    op = MixConv(32, 64, 3, groups=32, split="exp", num_groups=4)  # depthwise with multiplier 2
    assert op.in_splits == [16, 8, 4, 4] and op.out_splits == [32, 16, 8, 8]
    assert op.kernel_sizes == [3, 5, 7, 9]
    # num_groups overrides a kernel list of another length, keeps one of the same length
    assert MixConv(8, 8, 3, groups=8, num_groups=2, kernel_sizes=[3, 5, 7]).kernel_sizes == [3, 5]
    assert MixConv(8, 8, 3, groups=8, num_groups=2, kernel_sizes=[3, 9]).kernel_sizes == [3, 9]
    dense = MixConv(10, 7, 3, groups=1)  # groups=1: each split is a dense conv on its input split
    assert dense.in_splits == [4, 3, 3] and dense.out_splits == [3, 2, 2]
    assert [c.groups for c in dense.convs] == [1, 1, 1]


def test_mixconv_matches_timm_and_dilated_rule():
    from timm.layers import MixedConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 10, 9, 9)
    for stride in (1, 2):
        ours = MixConv(10, 10, 3, stride=stride, groups=10, bias=False)
        peer = MixedConv2d(10, 10, [3, 5, 7], stride=stride, depthwise=True)
        for a, b in zip(ours.convs, peer.values()):
            b.weight.data.copy_(a.weight.data)
        torch.testing.assert_close(ours(x), peer(x))
    dil = MixConv(12, 12, 3, groups=12, dilated=True)
    assert dil.group_geometry == [(3, 1), (3, 2), (3, 3)]
    assert [c.dilation[0] for c in dil.convs] == [1, 2, 3] and [c.padding[0] for c in dil.convs] == [1, 2, 3]
    assert MixConv(12, 12, 3, stride=2, groups=12, dilated=True).group_geometry == [(3, 1), (5, 1), (7, 1)]
    y = dil(x[:, :1].repeat(1, 12, 1, 1))
    dil.impl = "split"
    torch.testing.assert_close(dil(x[:, :1].repeat(1, 12, 1, 1)), y)


# ---------------------------------------------------------------- Structured
def _dense_basis(full, hidden):
    """Slow reference: the full basis matrix A (columns = vectorized binary block tensors)."""
    a = box_basis(full[0], hidden[0])
    for f, h in zip(full[1:], hidden[1:]):
        a = torch.kron(a, box_basis(f, h))
    return a


def test_structured_projection_matches_dense_pinv():
    torch.manual_seed(0)
    op = StructuredConv2d(6, 5, 3, c=4, n=2).double()
    w = op.weight.detach()
    a = _dense_basis((6, 3, 3), (4, 2, 2))
    assert a.shape == (54, 16)
    alpha_ref = (torch.linalg.pinv(a) @ w.reshape(5, -1).T).T
    torch.testing.assert_close(op.project(w).reshape(5, -1), alpha_ref)
    resid = w.reshape(5, -1).T - a @ alpha_ref.T
    torch.testing.assert_close(op.regularization_loss(), resid.norm() / w.norm())


@pytest.mark.parametrize("geom", [
    dict(cin=6, cout=5, k=3, groups=1, c=3, n=2, stride=1, padding=None, dilation=1),
    dict(cin=6, cout=4, k=1, groups=1, c=2, n=1, stride=2, padding=0, dilation=1),  # pointwise
    dict(cin=6, cout=6, k=3, groups=6, c=1, n=2, stride=2, padding=1, dilation=1),  # depthwise
    dict(cin=8, cout=4, k=5, groups=2, c=3, n=3, stride=1, padding=2, dilation=2),  # grouped, dilated
    dict(cin=4, cout=4, k=5, groups=1, c=2, n=4, stride=1, padding=4, dilation=1),  # pad > window/2
])
def test_structured_from_alpha_is_exact(geom):
    torch.manual_seed(0)
    op = StructuredConv2d(geom["cin"], geom["cout"], geom["k"], stride=geom["stride"], padding=geom["padding"],
                          dilation=geom["dilation"], groups=geom["groups"], bias=True, c=geom["c"],
                          n=geom["n"], mode="regularize")
    alpha = torch.randn(geom["cout"], *op.hidden_dims)
    with torch.no_grad():
        op.weight.copy_(op.build(alpha))
    assert op.regularization_loss().item() < 1e-6
    torch.testing.assert_close(op.project(op.weight), alpha, atol=1e-4, rtol=1e-4)
    x = torch.randn(2, geom["cin"], 10, 10)
    with torch.no_grad():
        y = op(x)
        assert not decompose_pays(op)  # these small layers keep the dense conv under decompose=auto
        torch.testing.assert_close(deploy_transform(op, "auto")(x), y, atol=1e-4, rtol=1e-4)
        dec = op.decompose()
        assert dec[1].weight.shape == (geom["cout"], geom["c"], geom["n"], geom["n"])
        torch.testing.assert_close(dec(x), y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(op.reparameterize()(x), y, atol=1e-4, rtol=1e-4)


def test_structured_random_kernel_loss_and_descent():
    torch.manual_seed(0)
    op = StructuredConv2d(8, 8, 3, c=4, n=2)
    loss0 = op.regularization_loss()
    assert loss0.item() > 0.3
    opt = torch.optim.Adam(op.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.97)
    for _ in range(300):
        opt.zero_grad()
        loss = op.regularization_loss()
        loss.backward()
        opt.step()
        sched.step()
    assert op.regularization_loss().item() < 1e-3
    assert op.weight.norm() > 0.1  # not collapsed to zero
    # regularize-mode deployment projects: deploy == decompose, and == training output up to the residual
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(op.decompose()(x), op.reparameterize()(x), atol=1e-4, rtol=1e-4)


def test_structured_parameterize_and_linear():
    op = StructuredConv2d(8, 6, 3, mode="parameterize")
    assert op.alpha.shape == (6, 4, 2, 2) and not hasattr(op, "weight")
    assert op.regularization_loss().item() == 0.0
    assert {n for n, _ in op.named_parameters()} == {"alpha"}
    assert set(op.state_dict()) == {"alpha"}  # bases are non-persistent buffers
    torch.manual_seed(0)
    lin = StructuredLinear(10, 3, c=4, mode="parameterize")
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(lin.decompose()(x), lin(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lin.reparameterize()(x), lin(x))
    lin_r = StructuredLinear(10, 3)
    assert lin_r.regularization_loss().item() > 0.1 and set(lin_r.state_dict()) == {"weight", "bias"}
    dense = nn.Linear(10, 3)
    lin_r.load_static_weight(dense.weight, dense.bias)
    torch.testing.assert_close(lin_r(x), dense(x))
    for bad in ({"c": 11}, {"c": 0}, {"mode": "prune"}):
        with pytest.raises(UserError):
            StructuredLinear(10, 3, **bad)
    with pytest.raises(UserError):
        StructuredConv2d(8, 8, 3, n=4)


# ---------------------------------------------------------------- models with random BN statistics
def _bn(c):
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    return bn


def _plain_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), _bn(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), _bn(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 1, bias=False), _bn(6))


def _swap(model, name, **kw):
    """Replace every Conv2d of `model` by op `name`, copying the kernel where the op can take it."""
    m = nn.Sequential(*[build_op(name, c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                 c.dilation, c.groups, c.bias is not None, **kw)
                        if isinstance(c, nn.Conv2d) else c for c in model])
    for new, old in zip(m, model):
        if isinstance(old, nn.Conv2d):
            new.load_static_weight(old.weight, old.bias)
    return m


@pytest.mark.parametrize("name,kw", [("refconv", {"init": "xavier"}), ("structured", {"mode": "parameterize"}),
                                     ("structured", {"mode": "regularize"})])
def test_reparameterize_equals_training_form(name, kw):
    torch.manual_seed(0)
    model = _swap(_plain_model(), name, **kw).eval()
    if kw.get("mode") == "regularize":  # put every kernel in the structured subspace first
        with torch.no_grad():
            for m in model:
                if isinstance(m, StructuredConv2d):
                    m.weight.copy_(m.build(m.project(m.weight)))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        y = model(x)
        dep = reparameterize_model(model)
        assert all(type(m) is nn.Conv2d for m in dep if not isinstance(m, (nn.BatchNorm2d, nn.ReLU)))
        torch.testing.assert_close(dep(x), y, atol=1e-5, rtol=1e-4)
        dep2 = reparameterize_model(dep)  # idempotent
        assert [type(m) for m in dep2] == [type(m) for m in dep]
        sd1, sd2 = dep.state_dict(), dep2.state_dict()
        assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
        if name == "structured":
            torch.testing.assert_close(decompose_model(model)(x), y, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- RefConv
def test_refconv_zero_init_is_baseline_and_deploys_to_baseline_keys():
    torch.manual_seed(0)
    plain = _plain_model()
    ref = _swap(plain, "refconv", init="zero")
    x = torch.randn(2, 3, 12, 12)
    for train in (True, False):
        plain.train(train)
        ref.train(train)
        torch.testing.assert_close(ref(x), plain(x))
    # a baseline checkpoint loads with strict=False: only the refocusing maps are missing
    fresh = _swap(_plain_model(), "refconv", init="xavier")
    res = fresh.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["0.convmap.weight", "3.convmap.weight", "6.convmap.weight"]
    assert not res.unexpected_keys
    assert torch.equal(fresh[3].weight, plain[3].weight)
    # basis is a frozen buffer; only W_r (+bias) train
    assert "0.weight" not in dict(fresh.named_parameters()) and "0.weight" in dict(fresh.named_buffers())
    fresh.eval()
    with torch.no_grad():
        y = fresh(x)
        dep = reparameterize_model(fresh)
    assert not torch.allclose(y, plain.eval()(x), atol=1e-3)  # xavier W_r changed the kernels
    psd, dsd = plain.state_dict(), dep.state_dict()
    assert list(psd) == list(dsd) and all(psd[k].shape == dsd[k].shape for k in psd)
    plain.load_state_dict(dsd, strict=True)
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-4)


def test_refconv_convmap_geometry_and_ablations():
    dw = RefConv(8, 8, 3, groups=8)  # depthwise: one dense 8 -> 8 map across kernel channels
    assert dw.convmap.groups == 1 and dw.convmap.weight.shape == (8, 8, 3, 3)
    dense = RefConv(4, 6, 3)  # dense: one 3x3 per 2-D kernel
    assert dense.convmap.groups == 24 and dense.convmap.weight.shape == (24, 1, 3, 3)
    grouped = RefConv(8, 4, 3, groups=2)  # N = 4*4 = 16 kernels, groups = 8*4/4 = 8
    assert grouped.convmap.groups == 8 and grouped.convmap.weight.shape == (16, 2, 3, 3)
    assert RefConv(4, 4, 3, init="default").convmap.weight.abs().sum() > 0
    # the refocusing conv really is conv(W_b, W_r) over the kernel "image"
    torch.manual_seed(0)
    r = RefConv(2, 3, 3, init="xavier")
    wb = r.weight
    ref = wb + torch.nn.functional.conv2d(wb.reshape(1, 6, 3, 3), r.convmap.weight, padding=1,
                                          groups=6).reshape(3, 2, 3, 3)
    torch.testing.assert_close(r.refocused_weight(), ref)
    rnd = RefConv(4, 4, 3, basis="random")
    before = rnd.weight.clone()
    rnd.load_static_weight(torch.zeros(4, 4, 3, 3))
    assert torch.equal(rnd.weight, before)
    tb = RefConv(4, 4, 3, train_basis=True)
    assert "weight" in dict(tb.named_parameters())
    for bad in ({"init": "he"}, {"basis": "imagenet"}, {"map_k": 2}):
        with pytest.raises(UserError):
            RefConv(4, 4, 3, **bad)


# ---------------------------------------------------------------- SE
def test_se_block():
    torch.manual_seed(0)
    op = build_op("se", 4, 16, 3, reduction=4)
    assert op.se.fc1.out_channels == 4 and op.se.fc2.out_channels == 16
    x = torch.randn(2, 4, 6, 6)
    y0 = op.conv(x)
    s = torch.sigmoid(op.se.fc2(torch.relu(op.se.fc1(y0.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(op(x), y0 * s)
    assert SqueezeExcite(32, reduction=16).fc1.out_channels == 2
    conv = nn.Conv2d(4, 16, 3, padding=1)
    op2 = build_op("se", 4, 16, 3, bias=True)
    op2.load_static_weight(conv.weight, conv.bias)
    torch.testing.assert_close(op2.conv(x), conv(x))
