"""Pretrained / init_from loading: key report, strictness, RefConv from torchvision weights."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from dyconv_repro.errors import UserError
from dyconv_repro.models import BACKBONES, build_model
from dyconv_repro.models.pretrained import check_state_dict, load_checked, read_checkpoint
from dyconv_repro.ops import OPS


def cfg(model="mobilenet_v2", op="conv", num_classes=1000, image_size=224, op_kwargs=None, **model_keys):
    return OmegaConf.create({"model": {"name": model, "source": "dyconv", "cifar_stem": "auto", **model_keys},
                             "op": {"name": op, "kwargs": op_kwargs or {}}, "policy": {"name": "auto"},
                             "data": {"num_classes": num_classes, "image_size": image_size}})


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    """A torchvision MobileNetV2 state_dict saved like torchvision's released weights."""
    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v2()
    with torch.no_grad():  # non-trivial BN statistics, so eval outputs depend on them
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2-7ebf99e0.pth"
    torch.save(ref.state_dict(), path)
    return path, ref.eval()


def test_torchvision_file_loads_with_zero_missing(tv_file, capsys):
    path, ref = tv_file
    model = build_model(cfg(pretrained=str(path)))
    out = capsys.readouterr().out
    n = len(ref.state_dict())
    assert f"{n} loaded, 0 missing, 0 unexpected, 0 shape-mismatched" in out
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_pretrained_true_reads_the_torch_hub_cache(tv_file, tmp_path, monkeypatch):
    path, ref = tv_file
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    os.symlink(path, hub / "checkpoints" / "mobilenet_v2-7ebf99e0.pth")
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        model = build_model(cfg(pretrained=True, num_classes=10))  # classifier re-initialized: allowed
        assert torch.equal(model.features[3].conv[1][0].weight, ref.features[3].conv[1][0].weight)
        assert model.classifier[1].out_features == 10

        def offline(*a, **k):
            raise urllib.error.URLError("no network")

        monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
        with pytest.raises(UserError, match="not cached"):
            build_model(cfg(model="resnet18", pretrained=True))
    finally:
        torch.hub.set_dir(old)
    with pytest.raises(UserError, match="no library weights"):
        build_model(cfg(model="resnet10", pretrained=True))


@pytest.mark.skipif("refconv" not in OPS, reason="the refconv operator does not exist yet")
def test_refconv_from_torchvision_weights_equals_original(tv_file):
    from dyconv_repro.ops.walkers import reparameterize_model

    path, ref = tv_file
    model = build_model(cfg(op="refconv", op_kwargs={"init": "zero"}, pretrained=str(path)))
    refs = dict(ref.named_modules())
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "RefConv"]
    assert len(layers) == 18  # stem + 17 depthwise
    for name, m in layers:
        assert torch.equal(m.weight, refs[name].weight)  # basis == the original kernel
    deployed = reparameterize_model(model)
    assert {k: v.shape for k, v in deployed.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=1e-5, atol=1e-5)


def test_bad_checkpoint_names_the_keys(tmp_path):
    rn = BACKBONES.get("resnet18")({}, 10, 224).state_dict()
    bad = tmp_path / "rn18.pt"
    torch.save({"model": rn, "epoch": 3}, bad)
    with pytest.raises(UserError, match=r"missing \[features\.0\.0\.weight.*\(\+\d+ more\).*unexpected \[conv1"):
        build_model(cfg(init_from=str(bad)))
    sd = BACKBONES.get("mobilenet_v2")({}, 10, 32).state_dict()
    sd["features.1.conv.1.weight"] = torch.zeros(16, 32, 3, 3)
    wrong = tmp_path / "wrong.pt"
    torch.save(sd, wrong)
    with pytest.raises(UserError, match=r"1 shape-mismatched \[features\.1\.conv\.1\.weight: checkpoint "
                                         r"\(16, 32, 3, 3\) vs model \(16, 32, 1, 1\)\]"):
        build_model(cfg(init_from=str(wrong), num_classes=10, image_size=32))
    with pytest.raises(UserError, match="does not exist"):
        build_model(cfg(init_from=str(tmp_path / "nope.pt")))
    # ImageNet weights into a CIFAR-stem ResNet: the 7x7 stem no longer fits
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv_rn18.pth")
    with pytest.raises(UserError, match="cifar_stem=false"):
        build_model(cfg(model="resnet18", num_classes=10, image_size=32, pretrained=str(tmp_path / "tv_rn18.pth")))


def test_init_from_our_checkpoint_of_a_swapped_model(tmp_path):
    torch.manual_seed(0)
    c = cfg(model="resnet20", op="se", num_classes=10, image_size=32, op_kwargs={"reduction": 4})
    model = build_model(c)
    ckpt = tmp_path / "last.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, ckpt)
    torch.manual_seed(1)
    c.model.init_from = str(ckpt)
    again = build_model(c)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    # the plain checkpoint of the backbone goes in before the surgery and is copied into the op
    plain = BACKBONES.get("resnet20")({}, 10, 32)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    c.model.init_from = str(tmp_path / "plain.pt")
    swapped = build_model(c)
    assert torch.equal(swapped.layer1[0].conv1.conv.weight, plain.layer1[0].conv1.weight)


def test_allowed_missing_keys_declared_by_an_op():
    class Op(torch.nn.Module):
        allowed_missing_keys = ("extra",)

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))
            self.extra = torch.nn.Parameter(torch.ones(2))

    model = torch.nn.Sequential(Op(), torch.nn.BatchNorm1d(2))
    sd = {"0.weight": torch.full((2,), 3.0), "1.weight": torch.ones(2), "1.bias": torch.zeros(2),
          "1.running_mean": torch.zeros(2), "1.running_var": torch.ones(2)}
    rep = load_checked(model, sd, "test", verbose=False)
    assert rep.ok and sorted(rep.allowed) == ["0.extra", "1.num_batches_tracked"]
    assert torch.equal(model[0].weight, torch.full((2,), 3.0))
    assert not check_state_dict(torch.nn.Linear(2, 2), {"weight": torch.zeros(2, 2)}, "x").ok


def test_read_checkpoint_formats(tmp_path):
    sd = {"a": torch.zeros(1)}
    for i, obj in enumerate([sd, {"model": sd, "optimizer": {}}, {"state_dict": {"_orig_mod.a": torch.zeros(1)}}]):
        torch.save(obj, tmp_path / f"{i}.pt")
        assert list(read_checkpoint(tmp_path / f"{i}.pt")) == ["a"]
    torch.save({"foo": 1}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="no state_dict"):
        read_checkpoint(tmp_path / "bad.pt")


def _timm_cc_b0_4e(num_classes: int):
    """timm's own CondConv EfficientNet-B0 (4 experts), randomly initialized, with non-trivial BN statistics."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("efficientnet_cc_b0_4e", pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return ref.eval()


def _ours_cc4(overrides=()):
    from dyconv_repro.cli.complexity import compose

    return compose(["experiment=condconv/t2_effnet_b0_cc4_ours", "data.image_size=96", "model.cifar_stem=false",
                    *overrides])


def test_timm_condconv_effnet_checkpoint_is_remapped_into_ours(tmp_path, capsys):
    """Issue #22 item 7: timm's flat expert banks [E, out*in/g*k*k] and per-block `routing_fn` load into our
    CondConv EfficientNet (block routing) with every tensor remapped, and the two models compute the same."""
    c = _ours_cc4()
    ref = _timm_cc_b0_4e(int(c.data.num_classes))
    path = tmp_path / "efficientnet_cc_b0_4e.pth"
    torch.save(ref.state_dict(), path)
    c.model.init_from = str(path)
    ours = build_model(c).eval()
    out = capsys.readouterr().out
    assert "remapped from the timm CondConv2d layout" in out and "0 missing, 0 unexpected, 0 shape-mismatched" in out
    bns = dict(ours.named_modules())
    for name, m in ref.named_modules():  # BN eps/momentum are not in a state dict: compare the same arithmetic
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = bns[name].eps
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_a_condconv_checkpoint_that_cannot_be_remapped_is_refused_in_one_line(tmp_path):
    """Without block routing each of our CondConvs has its own router: timm's block `routing_fn` has no exact
    equivalent, so the load stops and names the keys."""
    c = _ours_cc4(["policy.block_routing=false"])
    path = tmp_path / "efficientnet_cc_b0_4e.pth"
    torch.save(_timm_cc_b0_4e(int(c.data.num_classes)).state_dict(), path)
    c.model.init_from = str(path)
    with pytest.raises(UserError) as e:
        build_model(c)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit the model" in msg
    assert "routing_fn" in msg and "router.weight" in msg
