"""Backbones taken from torchvision, with torchvision's names and parameter layout.

Keeping the layout means torchvision's ImageNet weights load as they are (see pretrained.py).
Options on top: `num_classes`, `dropout`, `width_mult` (MobileNets) and a CIFAR stem
(`cifar_stem: auto` = image_size <= 64) that makes the first conv stride 1 and drops the max-pool
without renaming any parameter.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.shufflenetv2 import ShuffleNetV2

from dyconv_repro.errors import UserError
from dyconv_repro.models.registry import BACKBONES

SHUFFLENET_V2_WIDTHS = {
    "shufflenet_v2_x0_5": [24, 48, 96, 192, 1024],
    "shufflenet_v2_x1_0": [24, 116, 232, 464, 1024],
    "shufflenet_v2_x1_5": [24, 176, 352, 704, 1024],
    "shufflenet_v2_x2_0": [24, 244, 488, 976, 2048],
}


def _get(cfg, key, default=None):
    value = cfg.get(key, default) if cfg is not None else default
    return default if value is None else value


def resolve_cifar_stem(model_cfg, image_size: int) -> bool:
    """`cifar_stem: auto|true|false`; auto means a small input (image_size <= 64)."""
    value = _get(model_cfg, "cifar_stem", "auto")
    if isinstance(value, str):
        low = value.lower()
        if low == "auto":
            return int(image_size) <= 64
        if low in ("true", "false"):
            return low == "true"
        raise UserError(f"model.cifar_stem must be auto, true or false, got {value!r}")
    return bool(value)


def _first_conv(module: nn.Module) -> nn.Conv2d | None:
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def apply_cifar_stem(model: nn.Module) -> str | None:
    """Make the stem stride 1 and drop the stem max-pool, keeping parameter names.

    Returns a short description of what changed, or None when the layout is not recognized.
    A 7x7 stride-2 ResNet conv1 becomes a fresh 3x3 stride-1 conv (its weight shape changes,
    so ImageNet weights for conv1 no longer fit: load them with cifar_stem=false).
    """
    maxpool = getattr(model, "maxpool", None)
    conv1 = getattr(model, "conv1", None)
    if conv1 is not None and maxpool is not None:  # ResNet (torchvision / timm), ShuffleNetV2
        if isinstance(conv1, nn.Conv2d):
            if conv1.kernel_size[0] > 3:
                new = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=conv1.bias is not None)
                nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
                model.conv1 = new
            else:
                conv1.stride = (1, 1)
        else:
            first = _first_conv(conv1)
            if first is None:
                return None
            first.stride = (1, 1)
        model.maxpool = nn.Identity()
        return "conv1 -> stride 1, maxpool -> Identity"
    for attr in ("conv_stem",):  # timm EfficientNet / MobileNetV3 / MixNet / MnasNet
        stem = getattr(model, attr, None)
        if isinstance(stem, nn.Conv2d):
            stem.stride = (1, 1)
            return f"{attr} -> stride 1"
    for attr in ("features", "layers"):  # torchvision MobileNetV2/V3, EfficientNet, MnasNet
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.Sequential) and len(seq):
            first = _first_conv(seq[0])
            if first is not None and first.stride != (1, 1):
                first.stride = (1, 1)
                return f"{attr}.0 conv -> stride 1"
    return None


def maybe_cifar_stem(model: nn.Module, model_cfg, image_size: int, name: str) -> nn.Module:
    """Apply the CIFAR stem when asked; an explicit `true` on an unknown layout is an error."""
    if not resolve_cifar_stem(model_cfg, image_size):
        return model
    if apply_cifar_stem(model) is None:
        explicit = str(_get(model_cfg, "cifar_stem", "auto")).lower() != "auto"
        if explicit:
            raise UserError(f"model.cifar_stem=true is not supported for {name!r} (stem layout not "
                            "recognized); use model.cifar_stem=false")
    return model


def add_dropout_before(model: nn.Module, attr: str, p: float) -> None:
    """Dropout in front of a parameter-free module (e.g. ResNet's avgpool): no parameter is renamed."""
    if p:
        setattr(model, attr, nn.Sequential(getattr(model, attr), nn.Dropout(p)))


class ShuffleNetV2Dropout(ShuffleNetV2):
    """torchvision's ShuffleNetV2 plus optional dropout before `fc` (same parameter names)."""

    def __init__(self, stages_repeats, stages_out_channels, num_classes=1000, dropout: float = 0.0, **kwargs):
        super().__init__(stages_repeats, stages_out_channels, num_classes=num_classes, **kwargs)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(self.dropout(x.mean([2, 3])))


def _resnet(name: str, model_cfg, num_classes: int) -> nn.Module:
    kwargs = dict(_get(model_cfg, "kwargs", {}) or {})
    if name == "resnet10":
        model = tv_resnet.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes, **kwargs)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    add_dropout_before(model, "avgpool", float(_get(model_cfg, "dropout", 0.0)))
    return model


def _mobilenet(name: str, model_cfg, num_classes: int) -> nn.Module:
    kwargs = dict(_get(model_cfg, "kwargs", {}) or {})
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                        width_mult=float(_get(model_cfg, "width_mult", 1.0)),
                                        dropout=float(_get(model_cfg, "dropout", 0.2)), **kwargs)


def _shufflenet(name: str, model_cfg, num_classes: int) -> nn.Module:
    kwargs = dict(_get(model_cfg, "kwargs", {}) or {})
    widths = list(kwargs.pop("stages_out_channels", SHUFFLENET_V2_WIDTHS[name]))
    repeats = list(kwargs.pop("stages_repeats", [4, 8, 4]))
    return ShuffleNetV2Dropout(repeats, widths, num_classes=num_classes,
                               dropout=float(_get(model_cfg, "dropout", 0.0)), **kwargs)


# backbone name -> (family builder, torchvision name whose weights fit, or None)
TORCHVISION_BACKBONES = {
    "resnet10": (_resnet, None),
    **{n: (_resnet, n) for n in ("resnet18", "resnet34", "resnet50", "resnet101")},
    **{n: (_mobilenet, n) for n in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")},
    **{n: (_shufflenet, n) for n in SHUFFLENET_V2_WIDTHS},
}


def _register(name: str) -> None:
    family, weights_name = TORCHVISION_BACKBONES[name]

    def build(model_cfg, num_classes: int, image_size: int) -> nn.Module:
        model = family(name, model_cfg, num_classes)
        model.pretrained_ref = ("torchvision", weights_name) if weights_name else None
        return maybe_cifar_stem(model, model_cfg, image_size, name)

    BACKBONES.add(name, build, help=f"torchvision {name}" + ("" if weights_name else " (ResNet class, BasicBlock [1,1,1,1])"))


for _name in TORCHVISION_BACKBONES:
    _register(_name)


def torchvision_names() -> list[str]:
    """Every classification model torchvision knows."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_torchvision(model_cfg, num_classes: int, image_size: int) -> nn.Module:
    """`model=torchvision model.name=<any torchvision classifier>`."""
    name = str(_get(model_cfg, "name", ""))
    if name in TORCHVISION_BACKBONES:
        return BACKBONES.get(name)(model_cfg, num_classes, image_size)
    names = torchvision_names()
    if name not in names:
        raise UserError(f"unknown torchvision classifier {name!r}. Valid names: {', '.join(names)}")
    kwargs = dict(_get(model_cfg, "kwargs", {}) or {})
    if _get(model_cfg, "width_mult", None) not in (None, 1.0):
        kwargs.setdefault("width_mult", float(model_cfg.get("width_mult")))
    if _get(model_cfg, "dropout", None) is not None:
        kwargs.setdefault("dropout", float(model_cfg.get("dropout")))
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"torchvision {name} does not accept these options ({e}); drop them from "
                        "model.dropout / model.width_mult / model.kwargs") from None
    model.pretrained_ref = ("torchvision", name)
    return maybe_cifar_stem(model, model_cfg, image_size, name)
