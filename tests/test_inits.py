"""Initialization: a replaced layer starts at the init scale of the static layer it replaces (issue #22 item 6),
and WeightNet starts with the official code's statistics.

Measured "kernel std" per operator: the std of the whole kernel bank for the banked ops (CondConv experts,
DY-Conv kernels, DyNet bases, ODConv kernels; DCD's static W0), the per-sample kernel generated on a random input for WeightNet, the full
kernel W = A alpha for Structured, the refocused kernel for RefConv, the conv's kernel for SE, and for MixConv
each group's kernel divided by k / k_i (its init scale, see MixConv.init_like), and for KernelWarehouse the
layer's own cells in its (shared) warehouse (the kernel it is assembled from at temperature 1) divided by the
official init rule's factor (KWConv2d.official_init_factor: the official code draws the cells with kaiming fan_out
over the cell view, which differs from the conv's fan_out where cells do not span the layer or r != 1)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dyconv_repro.models.build import build_backbone, build_model_with_report
from dyconv_repro.models.policy import Policy
from dyconv_repro.models.surgery import swap_convs
from dyconv_repro.ops import OPS, build_op
from dyconv_repro.ops.condconv import CondConv2d, CondLinear
from dyconv_repro.ops.dcd import DCDConv2d
from dyconv_repro.ops.dynamicconv import DynamicConv2d
from dyconv_repro.ops.dynet import DyNetConv2d
from dyconv_repro.ops.kernelwarehouse import KWConv2d
from dyconv_repro.ops.mixconv import MixConv
from dyconv_repro.ops.odconv import ODConv2d
from dyconv_repro.ops.refconv import RefConv
from dyconv_repro.ops.se import SEConv
from dyconv_repro.ops.structured import _Structured
from dyconv_repro.ops.weightnet import WeightNetConv2d
from tests.test_surgery import make_cfg

GRID = {  # backbone -> (model config, image size); each builds in well under a second
    "resnet20": ({"name": "resnet20", "source": "dyconv"}, 32),
    "mobilenet_v2": ({"name": "mobilenet_v2", "source": "torchvision", "width_mult": 0.5}, 32),
    "resnet18": ({"name": "resnet18", "source": "torchvision"}, 32),
    "efficientnet_b0": ({"name": "efficientnet_b0", "source": "timm"}, 32),
}
OPS_UNDER_TEST = [n for n in OPS.names() if not getattr(OPS.get(n), "baseline", False)]
TOLERANCE = 0.15  # the bound on |std(op) / std(static) - 1|


def effective_std(op, x: torch.Tensor) -> float:
    """The initial kernel std of one replaced layer (module docstring)."""
    with torch.no_grad():
        if isinstance(op, CondConv2d | DynamicConv2d | DyNetConv2d | CondLinear | ODConv2d | DCDConv2d):
            return float(op.weight.std())
        if isinstance(op, WeightNetConv2d):
            return float(op.kernel(x)[0].std())
        if isinstance(op, _Structured):
            return float(op.kernel().std())
        if isinstance(op, RefConv):
            return float(op.refocused_weight().std())
        if isinstance(op, KWConv2d):  # its own cells, divided by the official fan-out rule's factor
            start, end = op.cell_range
            return float(op.cells()[start:end].std()) / op.official_init_factor()
        if isinstance(op, SEConv):
            return float(op.conv.weight.std())
        if isinstance(op, MixConv):
            k = op.kernel_size[0]
            return float(torch.cat([(c.weight * (ki / k)).flatten()
                                    for c, (ki, _) in zip(op.convs, op.group_geometry)]).std())
    raise AssertionError(f"no kernel-std measurement for {type(op).__name__}; add one to effective_std")


def _grid_policy(op_name: str) -> Policy:
    """Every conv but the 3-channel stem (and the classifier where the op has a linear form)."""
    roles = ("depthwise", "pointwise", "dense", "head")
    roles += ("classifier",) if OPS.get(op_name).linear_form is not None else ()
    return Policy("init_grid", roles=roles, allow_empty=True)


@pytest.mark.parametrize("backbone", list(GRID))
@pytest.mark.parametrize("op_name", OPS_UNDER_TEST)
def test_replaced_layers_start_at_the_static_layers_std(op_name, backbone):
    model_cfg, size = GRID[backbone]
    torch.manual_seed(0)
    model = build_backbone(OmegaConf.create(model_cfg), 10, size)
    static = {n: float(m.weight.detach().std()) for n, m in model.named_modules() if hasattr(m, "weight")
              and isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}
    reports = swap_convs(model, op_name, _grid_policy(op_name), {}, image_size=size)
    replaced = [r for r in reports if r.replaced]
    if not replaced:
        pytest.skip(f"{op_name} replaces no layer of {backbone} (e.g. depthwise-only on a dense net)")
    off = []
    for r in replaced:
        x = torch.randn(2, r.module.in_channels if hasattr(r.module, "in_channels") else r.module.in_features, 8, 8)
        got, want = effective_std(r.module, x), static[r.name]
        if abs(got / want - 1) > TOLERANCE:
            off.append(f"{r.name}: {got:.4f} vs static {want:.4f}")
    assert not off, f"{op_name} on {backbone}: {len(off)} of {len(replaced)} layers off: " + "; ".join(off[:5])


def official_fc2_std(inp: int, oup: int, k: int, G: int, depthwise: bool) -> float:
    """Official: N(0, 1/weight.shape[1]), MegEngine's grouped weight being (groups, out/groups, in/groups, 1, 1):
    wn_fc2 has out = oup*inp*k*k in G*oup groups (WeightNet_DW: inp*k*k in inp groups)."""
    return 1.0 / (k * k if depthwise else oup * inp * k * k // (G * oup))


@pytest.mark.parametrize("inp,oup,k,groups", [(58, 58, 1, 1), (116, 232, 1, 1), (116, 116, 3, 116)])
def test_weightnet_official_init_statistics(inp, oup, k, groups):
    torch.manual_seed(0)
    op = build_op("weightnet", inp, oup, k, groups=groups, init="official")
    dw = groups > 1
    assert float(op.fc2.detach().std()) == pytest.approx(official_fc2_std(inp, oup, k, 2, dw), rel=0.05)
    assert torch.count_nonzero(op.fc1.bias) == 0 and torch.count_nonzero(op.reduce.bias) == 0
    assert float(op.fc1.weight.detach().std()) == pytest.approx(1.0 / op.fc1.in_features, rel=0.05)
    assert float(op.reduce.weight.detach().std()) == pytest.approx(1.0 / inp, rel=0.1)


def test_weightnet_paper_model_keeps_the_official_init():
    """The paper rows (configs/op/weightnet.yaml: init official) on the official backbone, block-routed x_gap."""
    torch.manual_seed(0)
    cfg = make_cfg("weightnet_shufflenet_v2", "weightnet", 224)
    model, reports = build_model_with_report(cfg, verbose=False)
    ops = [m for m in model.modules() if isinstance(m, WeightNetConv2d)]
    assert ops and all(op.init == "official" for op in ops)
    for op in ops:
        k = op.kernel_size[0]
        want = official_fc2_std(op.in_channels, op.out_channels, k, op.G, op.depthwise)
        assert float(op.fc2.detach().std()) == pytest.approx(want, rel=0.15), op
        assert torch.count_nonzero(op.fc1.bias) == 0
    heads = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "block_head" in n]
    for h in heads:
        assert torch.count_nonzero(h.bias) == 0
        assert float(h.weight.detach().std()) == pytest.approx(1.0 / h.in_features, rel=0.15)


def test_weightnet_replaced_init_matches_official_on_official_1x1_layers():
    """init="replaced" on a 1x1 conv with the official N(0, 1/C_in) init gives the official fc2 std (= 2/C_in)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(116, 116, 1, bias=False)
    torch.nn.init.normal_(conv.weight, 0, 1 / 116)
    op = build_op("weightnet", 116, 116, 1)
    op.init_like(conv.weight)
    assert float(op.fc2.detach().std()) == pytest.approx(official_fc2_std(116, 116, 1, 2, False), rel=0.05)


def _modules(name: str, dynamic: bool) -> dict:
    torch.manual_seed(0)
    cfg = OmegaConf.create({"name": name, "source": "dyconv", "kwargs": {"dynamic": dynamic}})
    return dict(build_backbone(cfg, 10, 32).named_modules())


@pytest.mark.parametrize("name", ["dy_mobile", "dy_shuffle", "dy_resnet18"])
def test_dynet_nets_start_at_their_static_twins_init(name):
    """DyNet's own nets build their dynamic convs directly (no surgery): each starts at the std of the same conv
    in the static twin (kwargs.dynamic=false), the kaiming-normal(fan_out) the nets give their static convs."""
    def stds(dynamic: bool) -> dict[str, float]:
        return {n: effective_std(m, None) if isinstance(m, DyNetConv2d) else float(m.weight.detach().std())
                for n, m in _modules(name, dynamic).items() if isinstance(m, DyNetConv2d | torch.nn.Conv2d)}

    dyn, static = stds(True), stds(False)
    dynamic_names = {n for n, m in _modules(name, True).items() if isinstance(m, DyNetConv2d)}
    assert dynamic_names and dynamic_names <= set(static), name
    off = [f"{n}: {dyn[n]:.4f} vs {static[n]:.4f}" for n in sorted(dynamic_names)
           if abs(dyn[n] / static[n] - 1) > TOLERANCE]
    assert not off, off[:5]
