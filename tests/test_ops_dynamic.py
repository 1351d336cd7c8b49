"""Input-dependent operators: nn.Conv2d parity, fast paths == per-sample reference, batch independence."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops import OPS, build_op
from dyconv_repro.ops.condconv import CondLinear
from dyconv_repro.ops.cpu import batch_one, rules, stream
from dyconv_repro.ops.engine import DynamicConvOp, backends_disabled, dynamic_conv2d, loop_conv2d

# every registered per-sample-kernel op is in the grid (a new op is tested without being listed here)
DYNAMIC = tuple(n for n in OPS.names() if issubclass(OPS.get(n), DynamicConvOp))
# the ops whose kernel is a linear mix of parameters (the streamed path) / that have a specialized batch-1 routing
FACTORED = tuple(n for n in DYNAMIC if OPS.get(n).kernel_factors is not DynamicConvOp.kernel_factors)
BATCH_ONE = tuple(n for n in DYNAMIC if OPS.get(n) in batch_one.KERNEL_ONE)
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _channels(groups: str):
    """(C_in, C_out, groups) for 'dense' | 'grouped' | 'depthwise'."""
    return {"dense": (4, 6, 1), "grouped": (4, 6, 2), "depthwise": (4, 4, 4)}[groups]


def _static_twin(op) -> nn.Conv2d:
    return nn.Conv2d(op.in_channels, op.out_channels, op.kernel_size, op.stride, op.padding, op.dilation,
                     op.groups, bias=op.use_bias)


GRID = list(itertools.product((1, 3, 5), (1, 2), ("dense", "grouped", "depthwise")))


@pytest.mark.parametrize("name", DYNAMIC)
def test_conv2d_parity_grid(name):
    """Shapes and attributes as nn.Conv2d over kernel/stride/groups (+ bias, padding, dilation variants)."""
    for i, (k, s, g) in enumerate(GRID):
        cin, cout, groups = _channels(g)
        bias = i % 2 == 0
        padding, dilation = [(None, 1), (0, 1), (2, 1), (None, 2)][i % 4]
        op = build_op(name, cin, cout, k, stride=s, padding=padding, dilation=dilation, groups=groups, bias=bias)
        ref = _static_twin(op)
        assert (op.in_channels, op.out_channels, op.kernel_size, op.stride, op.groups) == (
            ref.in_channels, ref.out_channels, ref.kernel_size, ref.stride, ref.groups)
        x = torch.randn(3, cin, 9, 8)
        want = ref(x).shape
        for train in (True, False):
            op.train(train)
            y = op(x)
            y_cl = op(x.to(memory_format=torch.channels_last))
            assert y.shape == want and y_cl.shape == want, (k, s, g)
            torch.testing.assert_close(y_cl, y, atol=ATOL, rtol=1e-4)


def _regimes():
    # (C_in, C_out, k, stride, groups, batch): the regimes the fast-path selector distinguishes
    return [(8, 6, 1, 1, 1, 3), (8, 6, 1, 2, 1, 3), (8, 6, 3, 1, 1, 3), (8, 6, 3, 2, 2, 3),
            (6, 6, 3, 1, 6, 3), (6, 6, 5, 2, 6, 2), (8, 6, 3, 1, 1, 1), (8, 6, 1, 1, 1, 1)]


def _grads(op, x, fn):
    op.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in op.named_parameters() if p.grad is not None}


def _assert_same(got, want, where):
    """Output, input gradient and every parameter gradient of `got` == `want` (fp32 tolerance)."""
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = got, want
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-4, msg=lambda m: f"{where}: {m}")
    torch.testing.assert_close(gx, gx_ref, atol=ATOL, rtol=1e-4, msg=lambda m: f"{where} grad x: {m}")
    assert gp.keys() == gp_ref.keys(), where
    for n in gp:
        torch.testing.assert_close(gp[n], gp_ref[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{where} {n}: {m}")


def assert_paths_equal_reference(name: str, **kwargs) -> None:
    """Every path (auto/fold/matmul/export), NCHW and channels_last, == per-sample loop: outputs and gradients,
    over the regimes the path selector distinguishes (used for every registered op and by test_new_op.py)."""
    for cin, cout, k, s, g, b in _regimes():
        op = build_op(name, cin, cout, k, stride=s, groups=g, bias=True, **kwargs)
        x = torch.randn(b, cin, 7, 7)
        y_ref, gx_ref, gp_ref = _grads(op, x, op.reference_forward)
        paths = ["auto", "fold", "export"] + (["matmul"] if k == 1 and g == 1 else [])
        for path, cl in itertools.product(paths, (False, True)):
            op.path = path
            xx = x.to(memory_format=torch.channels_last) if cl else x
            _assert_same(_grads(op, xx, op), (y_ref, gx_ref, gp_ref), (cin, cout, k, s, g, b, path, cl))


@pytest.mark.parametrize("name", DYNAMIC)
def test_fast_paths_equal_reference(name):
    assert_paths_equal_reference(name)


@pytest.mark.parametrize("name", DYNAMIC)
def test_fast_paths_equal_reference_without_backends(name):
    """The bare library (no backend: what CUDA and every other device get) is exact too."""
    with backends_disabled():
        assert_paths_equal_reference(name)


def test_the_seven_papers_dynamic_ops_are_in_the_grids():
    """A removed or renamed op fails here instead of silently leaving the grids."""
    assert {"condconv", "dynamicconv", "weightnet", "dynet"} <= set(DYNAMIC)
    assert {"condconv", "dynamicconv", "weightnet"} <= set(FACTORED) and set(BATCH_ONE) == set(FACTORED)


def test_stream_chunk_rules():
    assert stream.stream_chunk(32, 512 * 512 * 9) == stream.STREAM_MIN_CHUNK  # big kernels: never fewer than the minimum
    assert stream.stream_chunk(3, 512 * 512 * 9) == 3
    assert stream.stream_chunk(64, 64 * 64 * 9) == min(64, stream.STREAM_CHUNK_ELEMS // (64 * 64 * 9))


@pytest.mark.parametrize("name", FACTORED)
def test_streamed_path_equals_reference(name, monkeypatch):
    """The streamed path (kernels regenerated chunk-wise into scratch, hand-written mix gradients) ==
    per-sample loop: outputs and gradients, in both chunk modes (grouped fold / one conv per sample),
    with batches split into several chunks, NCHW and channels_last; and its no-grad forward."""
    for loop_mode in (False, True):
        # tiny chunks (several per batch); loop_mode sends every chunk down the per-sample branch
        monkeypatch.setattr(stream, "STREAM_CHUNK_ELEMS", 700)
        monkeypatch.setattr(stream, "STREAM_MIN_CHUNK", 1)
        monkeypatch.setattr(rules, "LOOP_MIN_MACS", 0 if loop_mode else 10**12)
        monkeypatch.setattr(rules, "LOOP_MIN_DW_PIXELS", 0 if loop_mode else 10**12)
        for cin, cout, k, s, g, b in _regimes():
            op = build_op(name, cin, cout, k, stride=s, groups=g, bias=True)
            x = torch.randn(b, cin, 7, 7)
            y_ref, gx_ref, gp_ref = _grads(op, x, op.reference_forward)
            op.path = "stream"
            for cl in (False, True):
                xx = x.to(memory_format=torch.channels_last) if cl else x
                _assert_same(_grads(op, xx, op), (y_ref, gx_ref, gp_ref), (cin, cout, k, s, g, b, cl, loop_mode))
                with torch.no_grad():
                    torch.testing.assert_close(op(xx), y_ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", DYNAMIC)
def test_auto_path_regimes_equal_reference(name, monkeypatch):
    """What `auto` picks per regime (batch-1 scratch kernel, no-grad streaming, training streaming of
    big dense kernels) == reference; the scratch buffer is reused across calls without stale results."""
    op = build_op(name, 8, 6, 3, bias=True).eval()
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):  # scratch made in one, used in the next
        with mode():
            for b in (1, 3):
                for _ in range(2):  # second call reuses the scratch kernel: must not see the first call's kernel
                    x = torch.randn(b, 8, 6, 6)
                    torch.testing.assert_close(op(x), op.reference_forward(x), atol=ATOL, rtol=1e-4)
    monkeypatch.setattr(rules, "LOOP_MIN_KERNEL", 1)  # the training regime of big dense kernels
    op.train()
    x = torch.randn(3, 8, 6, 6)
    y_ref, gx_ref, gp_ref = _grads(op, x, op.reference_forward)
    y, gx, gp = _grads(op, x, op)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=ATOL, rtol=1e-4)
    for n in gp:
        torch.testing.assert_close(gp[n], gp_ref[n], atol=1e-4, rtol=1e-4)
    assert stream.streams(op, x) == (name in FACTORED)
    if name not in FACTORED:
        op.path = "stream"
        with pytest.raises(ValueError):
            op(x)


@pytest.mark.parametrize("name", FACTORED)
def test_pooled_alias_gradients_equal_plain_gap_and_support_double_backward(name):
    """Training forward pools through `pool_tee` (routing gradient added into the conv's in place): x's
    gradient == the reference's (plain GAP, autograd's sum), and with create_graph the second-order
    gradient agrees too (the out-of-place branch)."""
    op = build_op(name, 4, 6, 3, bias=True).train()
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    g = torch.randn(3, 6, 6, 6)
    (gx,) = torch.autograd.grad(op(x), x, g)
    (gx_ref,) = torch.autograd.grad(op.reference_forward(x), x, g)
    torch.testing.assert_close(gx, gx_ref, atol=ATOL, rtol=1e-4)
    (gx1,) = torch.autograd.grad(op(x), x, g, create_graph=True)
    (gx2,) = torch.autograd.grad(op.reference_forward(x), x, g, create_graph=True)
    (h1,) = torch.autograd.grad(gx1.square().sum(), x)
    (h2,) = torch.autograd.grad(gx2.square().sum(), x)
    torch.testing.assert_close(h1, h2, atol=1e-4, rtol=1e-4)


def test_mlp_head_functional_forward_equals_modules_and_keeps_hooks():
    from dyconv_repro.ops.layers import mlp_head

    head = mlp_head(8, 4, 2)
    z = torch.randn(3, 8)
    want = head[2](head[1](head[0](z)))
    torch.testing.assert_close(head(z), want)
    assert [k for k, _ in head.state_dict().items()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    seen = []
    head[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    torch.testing.assert_close(head(z), want)
    assert seen == [(3, 2)]  # a hooked child runs as a module


def test_dynamic_conv2d_matmul_keeps_channels_last_and_rejects_bad_geometry():
    x = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last)
    w = torch.randn(2, 3, 4, 1, 1)
    y = dynamic_conv2d(x, w, None, (1, 1), (0, 0), (1, 1), 1, path="matmul")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, loop_conv2d(x, w, None, (1, 1), (0, 0), (1, 1), 1))
    with pytest.raises(ValueError):
        dynamic_conv2d(x, torch.randn(2, 3, 4, 3, 3), None, (1, 1), (1, 1), (1, 1), 1, path="matmul")
    with pytest.raises(ValueError):
        dynamic_conv2d(x, w, None, (1, 1), (0, 0), (1, 1), 1, path="nope")


@pytest.mark.parametrize("name", DYNAMIC)
def test_sample_alone_equals_in_batch(name, batch_one_impl):
    """Eval mode: batch 1 (scratch kernel; 1x1 as a matmul) == the same sample inside a batch, for NCHW and
    channels_last inputs, stride 1 and 2."""
    for k, g, s in ((1, "dense", 1), (1, "dense", 2), (3, "dense", 1), (3, "depthwise", 2)):
        cin, cout, groups = _channels(g)
        op = build_op(name, cin, cout, k, stride=s, groups=groups, bias=True).eval()
        x = torch.randn(4, cin, 7, 7)
        with torch.no_grad():
            y = op(x)
            for xin in (x, x.to(memory_format=torch.channels_last)):
                for i in range(4):
                    torch.testing.assert_close(op(xin[i:i + 1]), y[i:i + 1], atol=ATOL, rtol=1e-4,
                                               msg=lambda m, w=(k, g, s, i): f"{w}: {m}")


@pytest.mark.parametrize("name", BATCH_ONE)
def test_batch_one_path_follows_every_parameter_change(name, batch_one_impl):
    """The batch-1 path caches views of the bank and the scratch kernel, and DY-Conv's 1/tau: its output must
    follow in-place updates (an optimizer step), replaced storage (.data =), load_state_dict, set_temperature,
    inference_mode vs no_grad and deepcopy -- always equal to the per-sample reference."""
    import copy

    op = build_op(name, 6, 6, 3, bias=True).eval()
    x = torch.randn(1, 6, 5, 5)

    def check(m=op):
        with torch.no_grad():
            torch.testing.assert_close(m(x), m.reference_forward(x), atol=ATOL, rtol=1e-4)

    check()
    with torch.no_grad():
        for p in op.parameters():
            p.mul_(1.5)
    check()
    for p in op.parameters():
        p.data = p.data * 0.5 + 0.01
    check()
    op.load_state_dict(build_op(name, 6, 6, 3, bias=True).state_dict())
    check()
    if name == "dynamicconv":
        with torch.no_grad():
            op.attention[-1].weight.mul_(50)  # logits large enough for tau to matter
        before = op(x).detach()
        op.set_temperature(2.0)
        check()
        assert not torch.allclose(op(x), before)
    with torch.inference_mode():
        torch.testing.assert_close(op(x), op.reference_forward(x), atol=ATOL, rtol=1e-4)
    check()
    twin = copy.deepcopy(op)
    assert batch_one.VIEWS in op.__dict__ and not any(k.startswith("_backend_") for k in twin.__dict__)
    with torch.no_grad():
        twin.weight.mul_(-1) if name != "weightnet" else twin.fc2.mul_(-1)
    check(twin)
    check()


@pytest.mark.parametrize("kwargs", [dict(name="weightnet", M=4, G=2), dict(name="dynet")])
def test_batch_one_generic_path_equals_reference(kwargs):
    """Ops without a specialized batch-1 routing (WeightNet with M/G > 1, DyNet) take the generic scratch path."""
    kwargs = dict(kwargs)
    op = build_op(kwargs.pop("name"), 6, 6, 3, bias=True, **kwargs).eval()
    assert batch_one.kernel_one(op, torch.randn(1, 6, 5, 5)) is None
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(op(x), op.reference_forward(x), atol=ATOL, rtol=1e-4)


# ----------------------------------------------------------------------------- explicit formulas


def test_condconv_matches_formula_and_experts_are_independent():
    op = build_op("condconv", 4, 6, 3, bias=True, num_experts=3)
    x = torch.randn(2, 4, 6, 6)
    r = torch.sigmoid(op.router(x.mean((2, 3))))
    for i in range(2):
        w = sum(r[i, e] * op.weight[e] for e in range(3))
        b = sum(r[i, e] * op.bias[e] for e in range(3))
        torch.testing.assert_close(op(x)[i:i + 1], F.conv2d(x[i:i + 1], w, b, padding=1), atol=ATOL, rtol=1e-4)
    flat = op.weight.detach().reshape(3, -1)
    assert torch.cdist(flat, flat)[~torch.eye(3, dtype=torch.bool)].min() > 0.1  # not copies of one init
    bound = 1 / (4 * 9) ** 0.5  # nn.Conv2d's kaiming_uniform(a=sqrt(5)) bound
    assert op.weight.abs().max() <= bound and op.weight.abs().max() > 0.8 * bound


def test_condconv_softmax_routing_and_static_copy():
    static = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    op = build_op("condconv", 4, 6, 3, bias=True, routing="softmax", init_from_static=True)
    assert op.init_from_static
    op.load_static_weight(static.weight, static.bias)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(op(x), static(x), atol=ATOL, rtol=1e-4)  # softmax weights sum to 1
    sig = build_op("condconv", 4, 6, 3, num_experts=2)
    sig.load_static_weight(static.weight)
    r = sig.routing_weights(x).sum(1)
    torch.testing.assert_close(sig(x), F.conv2d(x, static.weight, padding=1) * r[:, None, None, None], atol=ATOL,
                               rtol=1e-4)
    with pytest.raises(UserError):
        build_op("condconv", 4, 6, 3, routing="argmax")
    with pytest.raises(UserError):
        op.load_static_weight(torch.randn(6, 4, 1, 1))


def test_cond_linear_equals_per_sample_weights():
    lin = CondLinear(5, 3, num_experts=4)
    x = torch.randn(6, 5, requires_grad=True)
    y = lin(x)
    r = lin.routing_weights(x)
    w = torch.einsum("bk,koi->boi", r, lin.weight)
    b = r @ lin.bias
    ref = torch.stack([w[i] @ x[i] + b[i] for i in range(6)])
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=1e-4)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref, atol=ATOL, rtol=1e-4)
    static = nn.Linear(5, 3)
    soft = CondLinear(5, 3, routing="softmax")
    soft.load_static_weight(static.weight, static.bias)
    torch.testing.assert_close(soft(x), static(x), atol=ATOL, rtol=1e-4)
    assert lin(torch.randn(2, 7, 5)).shape == (2, 7, 3)


def test_dynamicconv_attention_formula_and_static_copy():
    op = build_op("dynamicconv", 8, 6, 3, bias=True, temperature=1.0)
    assert op.attention[0].out_features == 2 and op.num_kernels == 4  # FC1: C_in -> C_in/4
    x = torch.randn(2, 8, 5, 5)
    pi = torch.softmax(op.attention(x.mean((2, 3))), 1)
    torch.testing.assert_close(op.attention_weights(x), pi)
    w = torch.einsum("bk,k...->b...", pi, op.weight)
    b = pi @ op.bias
    torch.testing.assert_close(op(x)[1:], F.conv2d(x[1:], w[1], b[1], padding=1), atol=ATOL, rtol=1e-4)
    static = nn.Conv2d(8, 6, 3, padding=1, bias=True)
    op.load_static_weight(static.weight, static.bias)
    torch.testing.assert_close(op(x), static(x), atol=ATOL, rtol=1e-4)


def test_dynamicconv_temperature_buffer_round_trip_and_large_tau():
    op = build_op("dynamicconv", 8, 8, 3)
    assert float(op.temperature) == 30.0
    op.set_temperature(7.5)
    sd = op.state_dict()
    assert float(sd["temperature"]) == 7.5
    fresh = build_op("dynamicconv", 8, 8, 3)
    fresh.load_state_dict(sd)
    assert float(fresh.temperature) == 7.5
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(fresh(x), op(x))
    with torch.no_grad():  # make the logits large so that tau visibly matters
        op.attention[-1].weight.mul_(50)
    op.set_temperature(1.0)
    assert (op.attention_weights(x).max(1).values - 0.25).abs().max() > 0.05
    op.set_temperature(1e5)
    torch.testing.assert_close(op.attention_weights(x), torch.full((2, 4), 0.25), atol=1e-3, rtol=0)
    with pytest.raises(UserError):
        op.set_temperature(0)


def test_weightnet_matches_official_grouped_fc():
    """Kernel == official layout: grouped 1x1 conv fc2 (groups=G*C_out) reshaped to (C_out, C_in, k, k)."""
    for cin, cout, k, groups, m, g in ((8, 6, 3, 1, 2, 2), (8, 6, 1, 1, 4, 2), (6, 6, 3, 6, 2, 2), (8, 8, 3, 8, 4, 1)):
        op = build_op("weightnet", cin, cout, k, groups=groups, M=m, G=g)
        x = torch.randn(2, cin, 5, 5)
        x_gap = op.reduce(x.mean((2, 3)))
        a = torch.sigmoid(op.fc1(x_gap))[:, :, None, None]
        rows, entries, per = op.fc2.shape
        fc2_conv = op.fc2.reshape(rows * entries, per, 1, 1)
        w = F.conv2d(a, fc2_conv, groups=rows).reshape(2, cout, cin // groups, k, k)
        for i in range(2):
            torch.testing.assert_close(op(x)[i:i + 1], F.conv2d(x[i:i + 1], w[i], padding=k // 2, groups=groups),
                                       atol=ATOL, rtol=1e-4)
        lam = m // g
        if groups == 1:
            assert op.fc1.out_features == m * cout and rows == g * cout
            assert op.fc2.numel() == lam * cout * cin * k * k
        else:
            assert op.depthwise and op.fc1.out_features == lam * cout and op.fc2.numel() == lam * cout * k * k
        assert op.gap_channels == 16 and op.reduce.in_features == cin
    with pytest.raises(UserError):
        build_op("weightnet", 4, 4, 3, M=3, G=2)


def test_dynet_training_form_equals_fused_form():
    for cin, cout, k, s, groups, reduction in ((6, 4, 3, 1, 1, 4), (6, 6, 3, 2, 3, 0), (6, 8, 1, 1, 1, 2)):
        op = build_op("dynet", cin, cout, k, stride=s, groups=groups, bias=True, reduction=reduction)
        assert op.weight.shape[:2] == (cout, 6)
        x = torch.randn(3, cin, 7, 7)
        y_t, gx_t, gp_t = _grads(op, x, op.training_forward)
        y_f, gx_f, gp_f = _grads(op, x, op.fused_forward)
        torch.testing.assert_close(y_f, y_t, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(gx_f, gx_t, atol=ATOL, rtol=1e-4)
        for n in gp_t:
            torch.testing.assert_close(gp_f[n], gp_t[n], atol=1e-4, rtol=1e-4)
        eta = op.coefficients(x)
        w0 = (eta[0, :, :, None, None, None] * op.weight).sum(1)
        torch.testing.assert_close(y_f[:1], F.conv2d(x[:1], w0, (eta[0] * op.bias).sum(1), s, k // 2, 1, groups),
                                   atol=ATOL, rtol=1e-4)


def test_dynet_mode_switch_and_no_fake_reparameterize(monkeypatch):
    op = build_op("dynet", 4, 4, 3)
    assert not hasattr(op, "reparameterize")  # input-dependent: there is no static equivalent
    x = torch.randn(2, 4, 5, 5)
    calls = []
    monkeypatch.setattr(op, "training_forward", lambda x: calls.append("train") or op.fused_forward(x))
    for mode in (op.eval, op.train):
        mode()
        op(x)
    assert calls == []  # auto (None) runs the fused form in eval and in training (the faster one)
    op.fused = False  # the paper's training form, on request
    op(x)
    assert calls == ["train"]
    op.fused = True
    op(x)
    assert calls == ["train"]


def test_gap_custom_backward_matches_mean():
    from dyconv_repro.ops.engine import gap

    x = torch.randn(2, 3, 4, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(gap, (x,))
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn(2, 3, dtype=torch.double)
    (got,) = torch.autograd.grad(gap(x_cl), x_cl, g)
    (want,) = torch.autograd.grad(x.mean((2, 3)), x, g)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ("condconv", "dynamicconv"))
def test_training_with_the_native_bank_mix_equals_reference(name, monkeypatch):
    """A bank big enough for the native mix (32->32 3x3: 9216 entries a kernel) trained through the fold:
    output and every gradient == the aten per-sample reference; the native mix ran forward and for the bank's
    gradient."""
    from dyconv_repro.ops.cpu.kernels import NATIVE_MIX_MIN
    from tests.conftest import count_native_calls

    counted = count_native_calls(monkeypatch, "bank_mix_batch")
    kwargs = {"num_experts": 4} if name == "condconv" else {}
    op = build_op(name, 32, 32, 3, bias=True, **kwargs).train()
    assert op.weight[0].numel() >= NATIVE_MIX_MIN
    x = torch.randn(3, 32, 6, 6)
    y_ref, gx_ref, gp_ref = _grads(op, x, op.reference_forward)
    assert counted.calls == 0  # the reference is aten only
    _assert_same(_grads(op, x, op), (y_ref, gx_ref, gp_ref), name)
    assert counted.calls == 2
