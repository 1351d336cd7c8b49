"""CIFAR ResNets (He et al. 2016, sec. 4.2): 6n+2 layers, 3 stages of 16/32/64 channels.

No library ships them, so they live here, with torchvision's parameter names (conv1, bn1,
layer{1,2,3}.{i}.conv{1,2}, fc) so that surgery and checkpoints treat them like torchvision ResNets.
Shortcut option A (the paper's CIFAR choice) zero-pads the identity; option B uses a 1x1 projection.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.models.registry import BACKBONES

DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


class PadShortcut(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN/ReLU and a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = PadShortcut(stride, planes - in_planes)
            else:
                self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                                nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; `width_mult` scales the 16/32/64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A", width_mult: float = 1.0,
                 dropout: float = 0.0, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise UserError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        shortcut = str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise UserError(f"model.shortcut must be A (zero-pad identity) or B (1x1 projection), got {shortcut!r}")
        n = (depth - 2) // 6
        widths = [max(1, round(c * width_mult)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (w, s) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, s if j == 0 else 1, shortcut))
                in_planes = w
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return self.fc(self.dropout(x))


def _register(name: str, depth: int) -> None:
    def build(model_cfg, num_classes: int, image_size: int) -> nn.Module:
        cfg = model_cfg or {}
        kwargs = dict(cfg.get("kwargs") or {})
        return CifarResNet(depth, num_classes, shortcut=cfg.get("shortcut", "A") or "A",
                           width_mult=float(cfg.get("width_mult", 1.0) or 1.0),
                           dropout=float(cfg.get("dropout", 0.0) or 0.0), **kwargs)

    BACKBONES.add(name, build, help=f"CIFAR ResNet-{depth} (He et al. 2016; 16/32/64 channels, shortcut A|B)")


for _name, _depth in DEPTHS.items():
    _register(_name, _depth)
