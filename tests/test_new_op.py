"""Adding an operator is one file: a throwaway op written here, registered only in this process, runs through
the equivalence grid, surgery, complexity and one training epoch without touching any other file of the project
(its placement given as policy overrides, as its configs/op/<name>.yaml would select it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dyconv_repro.analysis.complexity import count_madds
from dyconv_repro.models.build import build_model_with_report
from dyconv_repro.ops import OPS
from dyconv_repro.ops.engine import DynamicConvOp, gap
from dyconv_repro.pipeline import train_run as train

from .test_ops_dynamic import assert_paths_equal_reference

NAME = "test_channel_gate"


class ChannelGateConv(DynamicConvOp):
    """W(x)[b, o] = sigmoid(FC(GAP(x)))[b, o] * W[o]: an output-channel attention folded into the kernel
    (ODConv's output-channel head on its own). The paper's math only: parameters, init, kernel(x)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        dd = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **dd))
        self.bias = nn.Parameter(torch.zeros(out_channels, **dd)) if bias else None
        self.gate = nn.Linear(in_channels, out_channels, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def kernel(self, x):
        g = torch.sigmoid(self.gate(gap(x)))  # (B, C_out)
        bias = None if self.bias is None else g * self.bias
        return g[:, :, None, None, None] * self.weight, bias


@pytest.fixture
def registered():
    OPS.register(NAME, help="test: output-channel gate")(ChannelGateConv)
    yield ChannelGateConv
    OPS.unregister(NAME)


def test_new_op_equals_its_reference_on_every_path(registered):
    torch.manual_seed(0)
    assert_paths_equal_reference(NAME)


def test_new_op_through_surgery_complexity_and_training(registered, make_cfg):
    cfg = make_cfg(f"op.name={NAME}", "policy.name=gate", "policy.roles=[dense]", "trainer.epochs=1",
                   "trainer.max_steps_per_epoch=2", "recipe.batch_size=16")
    model, reports = build_model_with_report(cfg, verbose=False)
    replaced = [r for r in reports if r.replaced]
    assert replaced and {r.role for r in replaced} == {"dense"}  # the placement it was given
    assert all(type(r.module) is ChannelGateConv for r in replaced)
    static, _ = build_model_with_report(make_cfg(), verbose=False)
    assert count_madds(model, 32) > count_madds(static, 32)  # the gate's FC is counted
    assert ChannelGateConv.capabilities() == []  # no optional methods declared
    summary = train(cfg)
    run_dir = Path(summary["run_dir"])
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["status"] == "finished" and saved["params"] > sum(p.numel() for p in static.parameters())
