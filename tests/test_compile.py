"""torch.compile against eager, one training step per operator on ResNet-20 (inductor on CPU, native kernels
suspended): the gradients of every parameter within 1e-3 relative. The result must agree with the gate that
`trainer.compile=true` applies (engine/compile_check.py): a verified op matches, a known-wrong op still differs
(when it stops differing, move it to COMPILE_VERIFIED), and an op in neither list is refused by the gate."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dyconv_repro.engine.compile_check import COMPILE_VERIFIED, COMPILE_WRONG, check_compile_supported
from dyconv_repro.errors import UserError
from dyconv_repro.models.build import build_model
from dyconv_repro.ops import OPS

TOL = 1e-3


def _grads(model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def compiled_vs_eager(cfg) -> tuple[float, float, str]:
    """(max, median, worst parameter) over parameters of |g_compiled - g_eager| / |g_eager| after one step from the
    same weights."""
    from dyconv_repro.ops.cpu import native

    torch.manual_seed(0)
    model = build_model(cfg).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with native.suspended():
        eager = _grads(copy.deepcopy(model), x, y)
        torch._dynamo.reset()
        compiled = _grads(torch.compile(copy.deepcopy(model), backend="inductor"), x, y)
    assert eager.keys() == compiled.keys()
    rel = {n: ((compiled[n] - eager[n]).norm() / eager[n].norm().clamp_min(1e-12)).item() for n in eager}
    worst = max(rel, key=rel.get)
    return rel[worst], sorted(rel.values())[len(rel) // 2], worst


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(OPS.names()))
def test_compiled_training_step_agrees_with_the_compile_gate(make_cfg, op):
    extra = ["policy=all"] if op == "mixconv" else []  # ResNet-20 has no depthwise conv for MixConv's placement
    cfg = make_cfg(f"op={op}", "model.name=resnet20", *extra)
    if op not in COMPILE_VERIFIED and op not in COMPILE_WRONG:
        with pytest.raises(UserError, match="has not been checked against eager"):
            check_compile_supported(op)
        pytest.skip(f"{op}: refused by the compile gate until its compiled step is measured (add it to a list)")
    err, median, worst = compiled_vs_eager(cfg)
    seen = f"max {err:.2e} ({worst}), median {median:.2e}"
    if op in COMPILE_VERIFIED:
        assert err <= TOL, f"{op}: compiled gradients differ from eager: {seen} (COMPILE_VERIFIED says they match)"
    else:
        assert err > TOL, f"{op}: compiled now matches eager ({seen}): move it to COMPILE_VERIFIED"
