"""The native batch-1 kernel (csrc/batch_one.cpp) == the Python batch-1 path == the per-sample reference;
the loader (native.py)."""

from __future__ import annotations

import pytest
import torch

from dyconv_repro.ops import build_op
from dyconv_repro.ops.cpu import native
from tests.conftest import count_native_calls

ATOL = 1e-5

# Cases on both sides of the kernel's size switches: aten pooling (C*H*W >= 2^16), parallel mix
# (K * kernel entries >= 2^16), MKL addmv for the routing (>= 2^14 multiply-adds); the rest are small.
CASES = [
    ("condconv", dict(in_channels=6, out_channels=8, kernel_size=3, bias=True), (9, 9)),
    ("condconv", dict(in_channels=6, out_channels=8, kernel_size=3, routing="softmax", num_experts=3), (5, 7)),
    ("condconv", dict(in_channels=128, out_channels=128, kernel_size=3, bias=True), (6, 6)),  # parallel mix
    ("condconv", dict(in_channels=8, out_channels=8, kernel_size=3, groups=8), (8, 8)),  # depthwise
    ("dynamicconv", dict(in_channels=6, out_channels=10, kernel_size=1, bias=True), (6, 6)),  # 1x1 (matmul)
    ("dynamicconv", dict(in_channels=512, out_channels=16, kernel_size=3, stride=2), (4, 4)),  # aten addmv
    ("dynamicconv", dict(in_channels=32, out_channels=8, kernel_size=3, bias=True), (80, 80)),  # aten pooling
    ("weightnet", dict(in_channels=8, out_channels=8, kernel_size=3), (7, 7)),
    ("weightnet", dict(in_channels=16, out_channels=16, kernel_size=3, groups=16, bias=True), (9, 9)),
]


@pytest.fixture
def counted(monkeypatch):
    return count_native_calls(monkeypatch, "kernel_one")


@pytest.mark.parametrize("name, kwargs, hw", CASES)
def test_native_kernel_equals_python_path_and_reference(name, kwargs, hw, counted, monkeypatch):
    op = build_op(name, **kwargs).eval()
    x = torch.randn(1, kwargs["in_channels"], *hw)
    for xin in (x, x.to(memory_format=torch.channels_last)):
        with torch.no_grad():
            before = counted.calls
            fast = op(xin)
            assert counted.calls == before + 1, "the native kernel did not run"
            with monkeypatch.context() as m:
                m.setattr(native, "get", lambda: None)
                slow = op(xin)
            torch.testing.assert_close(fast, slow, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(fast, op.reference_forward(x), atol=ATOL, rtol=1e-4)


def test_native_kernel_skips_an_input_it_cannot_read(counted):
    """A strided view (neither NCHW- nor channels_last-contiguous) goes the Python way, with the same result."""
    op = build_op("dynamicconv", 6, 6, 3).eval()
    x = torch.randn(1, 6, 12, 12)[:, :, ::2, ::2]
    with torch.no_grad():
        y = op(x)
    assert counted.calls == 0
    torch.testing.assert_close(y, op.reference_forward(x.contiguous()), atol=ATOL, rtol=1e-4)


def test_native_status_disabled_and_broken_build(monkeypatch, tmp_path):
    """DYCONV_NATIVE=0 turns it off; an unreadable build warns once, says so in `status()`, and the op still
    computes the right output through the Python path."""
    monkeypatch.setattr(native, "_module", native._UNSET)
    monkeypatch.setenv("DYCONV_NATIVE", "0")
    assert native.get() is None and native.status() == "off (DYCONV_NATIVE=0)"

    monkeypatch.setattr(native, "_module", native._UNSET)
    monkeypatch.setenv("DYCONV_NATIVE", "1")
    monkeypatch.setenv("DYCONV_NATIVE_DIR", str(tmp_path))
    assert native.get() is None and native.status().startswith("off (not built")

    monkeypatch.setattr(native, "_module", native._UNSET)
    library = native.build_dir() / f"{native.NAME}.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a shared object")
    with pytest.warns(UserWarning, match="did not load"):
        assert native.get() is None
    assert native.status() == "off (failed to load)"
    op = build_op("condconv", 4, 4, 3).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(op(x), op.reference_forward(x), atol=ATOL, rtol=1e-4)


def test_build_dir_follows_the_source(monkeypatch, tmp_path):
    """A changed source gets a new build directory, so an old binary is never loaded for new code."""
    monkeypatch.setenv("DYCONV_NATIVE_DIR", str(tmp_path))
    first = native.build_dir()
    for original in native.SOURCES + native.HEADERS:
        changed = tmp_path / original.name
        changed.write_text(original.read_text() + "\n// changed\n")
        attr = "SOURCES" if original in native.SOURCES else "HEADERS"
        with monkeypatch.context() as m:
            m.setattr(native, attr, [changed if f == original else f for f in getattr(native, attr)])
            assert native.build_dir() != first and native.build_dir().parent == tmp_path, original.name
    assert native.build_dir() == first


@pytest.mark.parametrize("rows, k, n", [(1, 1, 5), (3, 4, 2048), (5, 6, 4099), (2, 9, 20000), (32, 4, 9216)])
def test_native_bank_mix_equals_mm(rows, k, n, monkeypatch):
    """The training mix (csrc/mix.cpp) == torch.mm, for K off and on its 4-kernel passes and n off its blocks."""
    counted = count_native_calls(monkeypatch, "bank_mix_batch")
    coeff, bank = torch.rand(rows, k), torch.randn(k, n)
    out = torch.full((rows, n), float("nan"))
    counted.bank_mix_batch(coeff, bank, out)
    torch.testing.assert_close(out, coeff @ bank, atol=1e-5, rtol=1e-5)


def test_aggregate_uses_the_native_mix_and_its_gradients_equal_mm_s(monkeypatch):
    """aggregate() of a big bank runs the native mix (a small one stays mm), and so does the bank's gradient
    when the incoming gradient is contiguous (a transposed one takes mm); values and gradients == mm."""
    from dyconv_repro.ops.cpu.kernels import NATIVE_MIX_MIN
    from dyconv_repro.ops.cpu.kernels import NativeBankMix as _NativeBankMix
    from dyconv_repro.ops.engine import aggregate

    counted = count_native_calls(monkeypatch, "bank_mix_batch")
    for entries, transposed, native_calls in ((NATIVE_MIX_MIN, False, 2), (NATIVE_MIX_MIN, True, 1),
                                              (NATIVE_MIX_MIN - 1, False, 0)):
        counted.calls = 0
        coeff = torch.rand(3, 4, requires_grad=True)
        bank = torch.randn(4, entries, 1, 1, requires_grad=True)
        gy = torch.randn(entries, 3).t() if transposed else torch.randn(3, entries)

        def loss(flat, gy=gy):  # a transposed gy hands the mix a non-contiguous gradient
            return (flat * gy).sum()

        if transposed:
            y = _NativeBankMix.apply(coeff, bank.reshape(4, -1), counted)
        else:
            y = aggregate(coeff, bank).reshape(3, entries)
        got = (y, *torch.autograd.grad(loss(y), (coeff, bank)))
        y_ref = torch.mm(coeff, bank.reshape(4, -1))
        want = (y_ref, *torch.autograd.grad(loss(y_ref), (coeff, bank)))
        assert counted.calls == native_calls, (entries, transposed)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_reference_forward_never_runs_native_code(monkeypatch):
    """The per-sample reference is aten only (`native.suspended()`), so fast == reference checks native code
    against something else; the fast path of the same op does use it."""
    counted = count_native_calls(monkeypatch, "")
    op = build_op("dynamicconv", 64, 64, 3).train()  # 64*64*9 kernel entries: the native mix
    x = torch.randn(2, 64, 5, 5)
    op.reference_forward(x)
    assert counted.calls == 0
    op(x)
    assert counted.calls > 0


def _plan(op):
    from dyconv_repro.ops.cpu.batch_one import PLAN

    return op.__dict__.get(PLAN)


@pytest.mark.parametrize("name", ["dynamicconv", "condconv", "weightnet"])
def test_batch_one_plan_is_reused_and_follows_every_change(name, counted):
    """The cached native call (`NativeOnePlan`) serves later batch-1 calls; every change it was derived from
    makes a new one (or the Python path), and each output equals the per-sample reference."""
    torch.manual_seed(0)
    op = build_op(name, 8, 8, 3, bias=True).eval()
    x = torch.randn(1, 8, 7, 7)

    def check(inp=x, new_plan=True):
        before, calls = _plan(op), counted.calls
        with torch.no_grad():
            y = op(inp)
        assert counted.calls == calls + 1, "the native kernel did not run"
        assert (_plan(op) is not before) == new_plan
        torch.testing.assert_close(y, op.reference_forward(inp), atol=ATOL, rtol=1e-4)

    check()
    check(new_plan=False)  # reused
    with torch.no_grad():
        next(op.parameters()).mul_(1.5)  # in place: the plan reads the values at call time
    check(new_plan=False)
    check(torch.randn(1, 8, 9, 5))  # another input size: 1/(H*W) changes
    check(torch.randn(1, 8, 9, 5).to(memory_format=torch.channels_last), new_plan=False)
    routing = [m for m in op.modules() if isinstance(m, torch.nn.Linear)][0]
    routing.weight = torch.nn.Parameter(torch.randn_like(routing.weight))  # a replaced parameter
    check()
    op.bias = torch.nn.Parameter(torch.randn_like(op.bias))
    check()
    if name == "dynamicconv":
        op.set_temperature(7.0)  # 1/tau is an alpha of the routing
        check()
    with torch.inference_mode():  # inference tensors: other scratch views
        y = op(x)
    torch.testing.assert_close(y, op.reference_forward(x), atol=ATOL, rtol=1e-4)
    check()  # back under no_grad: a new plan, which the hook below must set aside
    seen = []
    handle = routing.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        op(x)
    assert seen, "a hook inside the op must make it take the module path"
    handle.remove()
    import copy
    import pickle

    assert _plan(copy.deepcopy(op)) is None and _plan(pickle.loads(pickle.dumps(op))) is None


def test_batch_one_plan_steps_aside_for_references_and_dispatch_modes(counted):
    """native.suspended() (the references) and FlopCounterMode (MAdds) must see aten calls, plan or not."""
    from torch.utils.flop_counter import FlopCounterMode

    op = build_op("dynamicconv", 8, 8, 3).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        op(x)
        calls = counted.calls
        with native.suspended():
            op(x)
        with FlopCounterMode(display=False) as flops:
            op(x)
    assert counted.calls == calls and flops.get_total_flops() > 0
