"""Backbones: registry names, CIFAR ResNets, torchvision/timm builders, CIFAR stem, dropout."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dyconv_repro.errors import UserError
from dyconv_repro.models import BACKBONES, build_backbone
from dyconv_repro.models.torchvision_models import resolve_cifar_stem

MINE = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet10", "resnet18", "resnet34",
        "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
        "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
        "efficientnet_b0", "efficientnet_cc_b0_4e", "efficientnet_cc_b0_8e", "mixnet_s", "mixnet_m",
        "mixnet_l", "mnasnet_a1"]


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def test_every_backbone_is_registered():
    assert set(MINE) <= set(BACKBONES.names())


@pytest.mark.parametrize("name", ["resnet10", "mobilenet_v3_large", "shufflenet_v2_x0_5", "efficientnet_cc_b0_4e",
                                  "mixnet_s", "mnasnet_a1"])
def test_backbone_forward_cifar(name):
    model = BACKBONES.get(name)({"dropout": 0.1}, 7, 32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.slow
@pytest.mark.parametrize("name", MINE)
def test_every_backbone_forward_224(name):
    model = BACKBONES.get(name)({}, 1000, 224).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_params_match_he_et_al(depth, params):
    # He et al. 2016, Table 6 (option A): 0.27M / 0.46M / 0.85M / 1.7M
    model = BACKBONES.get(f"resnet{depth}")({"shortcut": "A"}, 10, 32)
    assert abs(n_params(model) - params) / params < 0.03


def test_cifar_resnet_shortcuts():
    a = BACKBONES.get("resnet20")({"shortcut": "A"}, 10, 32)
    b = BACKBONES.get("resnet20")({"shortcut": "B"}, 10, 32)
    extra = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64  # two 1x1 projections + their BN
    assert n_params(b) - n_params(a) == extra
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == b(x).shape == (2, 10)
    with pytest.raises(UserError, match="shortcut"):
        BACKBONES.get("resnet20")({"shortcut": "C"}, 10, 32)


def test_torchvision_layout_and_weights_fit():
    for name in ("resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "mobilenet_v3_small"):
        ours = BACKBONES.get(name)({"dropout": 0.3, "cifar_stem": False}, 1000, 224)
        ref = torchvision.models.get_model(name)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    rn10 = BACKBONES.get("resnet10")({}, 10, 224)
    assert [len(getattr(rn10, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert isinstance(rn10, torchvision.models.ResNet)


def test_width_mult_and_dropout():
    small = BACKBONES.get("mobilenet_v2")({"width_mult": 0.5, "dropout": 0.5}, 10, 224)
    assert small.features[0][0].out_channels == 16 and small.classifier[0].p == 0.5
    sn = BACKBONES.get("shufflenet_v2_x1_0")({"dropout": 0.5}, 10, 224)
    sn.train()
    x = torch.randn(2, 3, 64, 64)
    assert not torch.equal(sn(x), sn(x))  # dropout active in train mode
    sn.eval()
    assert torch.equal(sn(x), sn(x))


def test_cifar_stem_keeps_parameter_names():
    assert resolve_cifar_stem({"cifar_stem": "auto"}, 32) and not resolve_cifar_stem({"cifar_stem": "auto"}, 224)
    with pytest.raises(UserError, match="cifar_stem"):
        resolve_cifar_stem({"cifar_stem": "maybe"}, 32)
    for name in ("mobilenet_v2", "shufflenet_v2_x1_0", "resnet18", "efficientnet_b0"):
        cifar = BACKBONES.get(name)({"cifar_stem": True}, 10, 32)
        imnet = BACKBONES.get(name)({"cifar_stem": False}, 10, 32)
        assert list(cifar.state_dict()) == list(imnet.state_dict())
        with torch.no_grad():
            c = cifar.eval()
            feats = {}
            first = next(m for m in c.modules() if isinstance(m, torch.nn.Conv2d))
            first.register_forward_hook(lambda m, i, o, feats=feats: feats.update(stem=o.shape[-1]))
            c(torch.randn(1, 3, 32, 32))
        assert feats["stem"] == 32  # stride-1 stem
    rn = BACKBONES.get("resnet18")({"cifar_stem": "auto"}, 10, 32)
    assert rn.conv1.kernel_size == (3, 3) and isinstance(rn.maxpool, torch.nn.Identity)


def test_generic_sources_and_unknown_names():
    tv = build_backbone({"name": "squeezenet1_1", "source": "torchvision", "cifar_stem": False}, 10, 224)
    assert isinstance(tv, torchvision.models.SqueezeNet)
    tm = build_backbone({"name": "resnet10t", "source": "timm"}, 10, 32)
    assert tm(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(UserError, match="Valid backbones: .*mobilenet_v2"):
        build_backbone({"name": "mobilenet_v9", "source": "dyconv"}, 10, 32)
    with pytest.raises(UserError, match="unknown torchvision classifier 'resnet9'.*resnet18"):
        build_backbone({"name": "resnet9", "source": "torchvision"}, 10, 32)
    with pytest.raises(UserError, match="unknown timm model"):
        build_backbone({"name": "no_such_net", "source": "timm"}, 10, 32)
    with pytest.raises(UserError, match="model.source"):
        build_backbone({"name": "resnet18", "source": "keras"}, 10, 32)
