"""Surgery: every design-card backbone x every registered operator builds, trains a step, deploys;
roles on known models; policies select what the papers replace."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from dyconv_repro.config_dir import config_dir
from dyconv_repro.errors import UserError
from dyconv_repro.models import BACKBONES, build_model, swap_convs
from dyconv_repro.models.build import build_model_with_report
from dyconv_repro.models.policy import Policy, load_policy
from dyconv_repro.models.roles import infer_layers
from dyconv_repro.models.surgery import layer_table
from dyconv_repro.ops import OPS
from dyconv_repro.ops.walkers import reparameterize_model

DESIGN_CARD = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50",
               "shufflenet_v2_x1_0"]
FAST = {"mobilenet_v2", "mobilenet_v3_small"}  # the rest: `-m slow` (also at 32), to keep the suite fast


# structured's default "regularize" mode deploys the *projection* of the kernel (equal only after the
# regularizer converged); "parameterize" trains the structured kernel itself, so deploy == train exactly.
EXACT_DEPLOY_KWARGS = {"structured": {"mode": "parameterize"}}


def op_kwargs(name: str) -> dict:
    path = Path(config_dir()) / "op" / f"{name}.yaml"
    kwargs = (yaml.safe_load(path.read_text()) or {}).get("kwargs") or {} if path.is_file() else {}
    return {**kwargs, **EXACT_DEPLOY_KWARGS.get(name, {})}


def make_cfg(model: str, op: str, image_size: int, policy="auto", **model_keys):
    return OmegaConf.create({"model": {"name": model, "source": "dyconv", "cifar_stem": "auto", **model_keys},
                             "op": {"name": op, "kwargs": op_kwargs(op)}, "policy": {"name": policy},
                             "data": {"num_classes": 10, "image_size": image_size}})


def _matrix(image_size: int):
    for model in DESIGN_CARD:
        for op in OPS.names():
            slow = image_size > 64 or model not in FAST
            yield pytest.param(model, op, image_size, id=f"{model}-{op}-{image_size}",
                               marks=[pytest.mark.slow] if slow else [])


def _check_backbone_op(model_name: str, op: str, image_size: int):
    torch.manual_seed(0)
    try:
        model, reports = build_model_with_report(make_cfg(model_name, op, image_size), verbose=False)
    except UserError as e:  # e.g. a policy that needs block_routing.py not written yet
        pytest.skip(str(e))
    replaced = [r.name for r in reports if r.replaced]
    selected = [r.name for r in reports if load_policy("auto", op).selects(r)]
    assert replaced == ([] if op == "conv" else selected)  # e.g. mixconv on ResNet-18: no depthwise conv
    assert all(r.op == op for r in reports if r.replaced)
    x = torch.randn(2, 3, image_size, image_size)
    model.train()
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    if any(callable(getattr(m, "reparameterize", None)) for m in model.modules()):
        model.eval()
        deployed = reparameterize_model(model)
        assert not any(callable(getattr(m, "reparameterize", None)) for m in deployed.modules())
        with torch.no_grad():
            ref, dep = model(x), deployed(x)
        torch.testing.assert_close(dep, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name,op,image_size", list(_matrix(32)) + list(_matrix(224)))
def test_backbone_x_operator(model_name, op, image_size):
    _check_backbone_op(model_name, op, image_size)


def _roles(reports):
    return Counter(r.role for r in reports)


def test_roles_mobilenet_v2():
    reports = infer_layers(BACKBONES.get("mobilenet_v2")({}, 10, 224), 224)
    roles = _roles(reports)
    assert roles["stem"] == 1 and roles["depthwise"] == 17 and roles["head"] == 1 and roles["classifier"] == 1
    assert roles["pointwise"] == 33 and roles["dense"] == 0
    by_role = {r.role: r for r in reports}
    assert by_role["stem"].name == "features.0.0" and by_role["head"].name == "features.18.0"
    assert by_role["classifier"].name == "classifier.1"
    # stages follow the resolution: 112 (1) ... 7 (5)
    stages = {r.name: r.stage for r in reports}
    assert stages["features.1.conv.0.0"] == 1 and stages["features.2.conv.0.0"] == 2
    assert stages["features.17.conv.1.0"] == 5


def test_roles_resnet18_and_shufflenet_and_cifar():
    rn = infer_layers(BACKBONES.get("resnet18")({}, 10, 224), 224)
    roles = _roles(rn)
    assert roles == Counter({"stem": 1, "dense": 16, "pointwise": 3, "classifier": 1})  # no head conv
    assert {r.stage for r in rn if r.role == "dense"} == {1, 2, 3, 4}
    sn = infer_layers(BACKBONES.get("shufflenet_v2_x1_0")({}, 10, 32), 32)
    by_role = {r.role: r.name for r in sn}
    assert by_role["stem"] == "conv1.0" and by_role["head"] == "conv5.0" and by_role["classifier"] == "fc"
    assert {r.stage for r in sn if r.role == "depthwise"} == {2, 3, 4}
    cr = infer_layers(BACKBONES.get("resnet20")({"shortcut": "B"}, 10, 32), 32)
    assert _roles(cr) == Counter({"stem": 1, "dense": 18, "pointwise": 2, "classifier": 1})


def test_se_convs_are_never_replaced():
    model = BACKBONES.get("mobilenet_v3_small")({}, 10, 32)
    reports = infer_layers(model, 32)
    se = [r for r in reports if r.role == "se"]
    assert len(se) == 2 * 9  # fc1/fc2 of the 9 SE blocks
    all_roles = Policy("x", roles=("all",))
    reports = swap_convs(model, "se", all_roles, {"reduction": 4})
    assert not any(r.replaced for r in reports if r.role == "se")
    assert sum(r.replaced for r in reports) == sum(r.role in ("stem", "depthwise", "pointwise", "dense", "head")
                                                   for r in reports)


def test_second_swap_leaves_operator_internals_alone():
    model = BACKBONES.get("resnet20")({}, 10, 32)
    first = swap_convs(model, "se", "se", {"reduction": 4})
    n = sum(r.replaced for r in first)
    assert n == 18
    second = swap_convs(model, "se", "se", {"reduction": 4})
    assert not any(r.replaced for r in second)  # ops are not re-wrapped, their inner convs are internal
    assert sum(r.role == "internal" for r in second) == 3 * n  # the static conv + the SE's two 1x1 convs


def test_timm_stages_and_condconv_effnet_policy():
    model = BACKBONES.get("efficientnet_b0")({}, 10, 64)
    reports = infer_layers(model, 64)
    policy = load_policy("condconv_effnet")
    chosen = [r for r in reports if policy.selects(r)]
    # blocks.4 (3 blocks) + blocks.5 (4) + blocks.6 (1), three convs each (pw expand, dw, pw project)
    assert len(chosen) == 24 and {r.stage for r in chosen} == {4, 5, 6}
    assert all(r.name.startswith(("blocks.4.", "blocks.5.", "blocks.6.")) for r in chosen)
    assert {r.role for r in reports if "se." in r.name} == {"se"}
    assert next(r for r in reports if r.role == "head").name == "conv_head"


def test_policies_select_the_paper_placements():
    reports = infer_layers(BACKBONES.get("mobilenet_v2")({}, 10, 32), 32)

    def chosen(name, op="conv"):
        policy = load_policy(name, op)
        return {r.role for r in reports if policy.selects(r)}, sum(policy.selects(r) for r in reports)

    assert chosen("dynamicconv") == ({"depthwise", "pointwise"}, 50)  # all but stem and the last 1x1
    assert chosen("condconv") == ({"stem", "depthwise", "pointwise", "head", "classifier"}, 53)
    assert chosen("refconv") == ({"stem", "depthwise"}, 18)
    assert chosen("mixconv") == ({"depthwise"}, 17)
    assert chosen("none") == (set(), 0)
    assert chosen("auto", "conv") == (set(), 0)
    assert load_policy({"name": "auto", "stages": [5], "block_routing": None}, "dynamicconv").stages == (5,)
    # CIFAR stem (stride 1): stage 4 = features.14-17 (the 2x2 maps at 32 px), three convs each
    assert chosen({"name": "dynamicconv", "stages": [4, 5]})[1] == 3 * 4


def test_policy_errors():
    with pytest.raises(UserError, match="Valid policies"):
        load_policy("nope", "conv")
    with pytest.raises(UserError, match="valid roles"):
        Policy("x", roles=("everything",))
    with pytest.raises(UserError, match="unknown key"):
        load_policy({"name": "none", "rolez": []})


def test_classifier_replacement_needs_a_linear_form():
    model = BACKBONES.get("resnet20")({}, 10, 32)
    with pytest.raises(UserError, match="classifier"):
        swap_convs(model, "se", Policy("x", roles=("classifier",)), {})


def test_copy_weights_and_role_kwargs():
    torch.manual_seed(0)
    model = BACKBONES.get("resnet20")({}, 10, 32)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    reports = swap_convs(model, "se", Policy("x", roles=("dense",), copy_weights=True,
                                             role_kwargs={"dense": {"reduction": 8}}), {"reduction": 4})
    for r in reports:
        if r.replaced:
            assert torch.equal(r.module.conv.weight, original[r.name])
            assert r.module.se.reduction == 8
    text = layer_table(reports)
    assert "replaced 18 of 19 convs" in text and "layer1.0.conv1" in text


def test_build_model_unknown_names():
    with pytest.raises(UserError, match="Valid backbones"):
        build_model(make_cfg("mobilenet_v9", "conv", 32))
    with pytest.raises(UserError, match="Valid operators"):
        build_model(make_cfg("resnet20", "no_such_op", 32))
