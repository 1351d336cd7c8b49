"""MobileNetV1 (Howard et al. 2017), in-house because neither torchvision nor timm ships it.

Layout of the paper / TF-slim `mobilenet_v1`: a 3x3 stride-2 stem (32 ch) and 13 depthwise-separable
blocks (3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU), global pool, dropout, FC.
At width 1.0 and 224 px: 4.23M params, 569M MAdds. Width multiplier as in slim:
`max(int(c * width_mult), 8)` on every layer including the stem.

`features[0]` is the stem and `features[i]` (i = 1..13) is depthwise-separable block i, so
"layer N" in the CondConv ablations ("CondConv from layer N") is `features[N]`.
Every conv is a plain nn.Conv2d so that operator surgery can replace it afterwards.

The small config helpers shared by the in-house paper networks live here too (`cfg_get`,
`cifar_stem_enabled`).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from dyconv_repro.errors import UserError
from dyconv_repro.models.registry import BACKBONES

# (out_channels, stride) of the 13 depthwise-separable blocks.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def cfg_get(model_cfg: Any, key: str, default: Any = None) -> Any:
    """`model_cfg[key]` for a dict, a DictConfig or None; `default` when missing or null."""
    if model_cfg is None:
        return default
    value = model_cfg.get(key, default) if hasattr(model_cfg, "get") else getattr(model_cfg, key, default)
    return default if value is None else value


def cfg_kwargs(model_cfg: Any) -> dict:
    """The builder kwargs (`model.kwargs`) as a plain dict."""
    kw = cfg_get(model_cfg, "kwargs", {}) or {}
    return {str(k): kw[k] for k in kw}


def cifar_stem_enabled(model_cfg: Any, image_size: int) -> bool:
    """Resolve `model.cifar_stem` (auto|true|false; auto = image_size <= 64)."""
    value = cfg_get(model_cfg, "cifar_stem", "auto")
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return int(image_size) <= 64
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserError(f"model.cifar_stem={value!r} is not valid; use auto, true or false")


def check_choice(name: str, value: Any, choices) -> None:
    """Raise a one-line UserError when `value` is not one of `choices`."""
    if value not in choices:
        raise UserError(f"{name}={value!r} is not supported; valid values: {', '.join(map(str, choices))}")


def _depth(channels: int, width_mult: float, min_depth: int = 8) -> int:
    return max(int(channels * width_mult), min_depth)


class MobileNetV1(nn.Module):
    """MobileNetV1 with a width multiplier; `cifar_stem` makes the stem stride 1 for small images."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.0,
                 cifar_stem: bool = False):
        super().__init__()
        if width_mult <= 0:
            raise UserError(f"model.width_mult must be > 0 for mobilenet_v1 (got {width_mult})")
        cin = _depth(32, width_mult)
        layers: list[nn.Module] = [
            Conv2dNormActivation(3, cin, 3, stride=1 if cifar_stem else 2, activation_layer=nn.ReLU)]
        for cout, stride in MOBILENET_V1_BLOCKS:
            cout = _depth(cout, width_mult)
            layers.append(nn.Sequential(
                Conv2dNormActivation(cin, cin, 3, stride=stride, groups=cin, activation_layer=nn.ReLU),
                Conv2dNormActivation(cin, cout, 1, activation_layer=nn.ReLU),
            ))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


@BACKBONES.register("mobilenet_v1", help="MobileNetV1 (Howard et al. 2017), width 0.25-1.0, in-house")
def build_mobilenet_v1(model_cfg, num_classes: int, image_size: int) -> nn.Module:
    return MobileNetV1(
        num_classes=int(num_classes),
        width_mult=float(cfg_get(model_cfg, "width_mult", 1.0)),
        dropout=float(cfg_get(model_cfg, "dropout", 0.0)),
        cifar_stem=cifar_stem_enabled(model_cfg, image_size),
        **cfg_kwargs(model_cfg),
    )
