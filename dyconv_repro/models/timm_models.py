"""Backbones taken from timm (EfficientNet, the CondConv reference, MixNet, MnasNet-A1, any timm name).

timm's definitions are faithful ports of the TF reference networks, so they are used as they are;
`pretrained` weights are loaded later by pretrained.py (never downloaded here).
"""

from __future__ import annotations

import timm
from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.models.registry import BACKBONES
from dyconv_repro.models.torchvision_models import maybe_cifar_stem

# our backbone name -> timm name
TIMM_BACKBONES = {
    "efficientnet_b0": "efficientnet_b0",
    "efficientnet_cc_b0_4e": "efficientnet_cc_b0_4e",  # timm's port of the reference CondConv network
    "efficientnet_cc_b0_8e": "efficientnet_cc_b0_8e",
    "mixnet_s": "mixnet_s",
    "mixnet_m": "mixnet_m",
    "mixnet_l": "mixnet_l",
    "mnasnet_a1": "semnasnet_100",  # MnasNet-A1 (with SE) is `semnasnet_100` in timm
}


def _create(timm_name: str, model_cfg, num_classes: int, image_size: int, label: str) -> nn.Module:
    cfg = model_cfg or {}
    kwargs = dict(cfg.get("kwargs") or {})
    if cfg.get("dropout") is not None:
        kwargs.setdefault("drop_rate", float(cfg.get("dropout")))
    width = cfg.get("width_mult")
    if width not in (None, 1.0):
        kwargs.setdefault("channel_multiplier", float(width))
    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"timm model {timm_name} does not accept these options ({e}); drop them from "
                        "model.dropout / model.width_mult / model.kwargs") from None
    model.pretrained_ref = ("timm", timm_name)
    return maybe_cifar_stem(model, cfg, image_size, label)


def _register(name: str, timm_name: str) -> None:
    def build(model_cfg, num_classes: int, image_size: int) -> nn.Module:
        return _create(timm_name, model_cfg, num_classes, image_size, name)

    BACKBONES.add(name, build, help=f"timm {timm_name}")


for _name, _timm_name in TIMM_BACKBONES.items():
    _register(_name, _timm_name)


def build_timm(model_cfg, num_classes: int, image_size: int) -> nn.Module:
    """`model=timm model.name=<any timm name>`."""
    name = str((model_cfg or {}).get("name", ""))
    if name in TIMM_BACKBONES:
        return BACKBONES.get(name)(model_cfg, num_classes, image_size)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:20] if name else []
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise UserError(f"unknown timm model {name!r}.{hint} List them with "
                        "`python -c \"import timm; print(timm.list_models())\"`")
    return _create(name, model_cfg, num_classes, image_size, name)
