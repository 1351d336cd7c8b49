"""DyNet's networks (Zhang et al., ICLR-2020 submission "DyNet: Dynamic Convolution for Accelerating
Convolution Neural Networks"): Dy-mobile, Dy-shuffle, Dy-ResNet18, Dy-ResNet50 and their static twins.

DyNet saves MAdds by redesigning the blocks around dynamic convs (operator `dynet`: per output
channel t, w_t = sum_i eta_t^i w_t^i over g_t = `num_bases` fixed kernels). One coefficient
predictor per block, GAP(block input) -> FC (ResNets: FC C_in -> C_in/4 -> ReLU -> FC) -> sigmoid,
gives the coefficients (C_out * g_t per conv) of every dynamic conv of the block.

The paper gives no layer tables, only the block rules (TABLES.md section 3). Assumptions, chosen so
that the static (fused, batch-1) MAdds hit the paper's numbers:

* Dy-mobile: MobileNetV2's layout (stem 32, 17 blocks with c/n/s = 16/1/1, 24/2/2, 32/3/2, 64/4/2,
  96/3/1, 160/3/2, 320/1/1, head 1x1 -> 1280, FC) with each block replaced by the Dy-mobile block:
  1x1 C_in -> C, 3x3 C -> C with C/6 groups (6 channels per group; stride here), 1x1 C -> C, no
  expansion, C = MobileNetV2's c rounded up to a multiple of 6 (18, 24, 36, 66, 96, 162, 324);
  residual when stride 1 and C_in == C; ReLU6 after the first two convs, linear after the last.
  All three convs are dynamic, also in the first block; stem, head and FC are static.
  This is exactly the block of the paper's FLOP-ratio formula (12C^2 + 54C vs 2C^2 + 54C per
  pixel = 6 - 135/(C + 27)) at MobileNetV2's widths.
  -> 130.5M MAdds (paper 129M; our count of MobileNetV2 is 300.8M vs the paper's 298M).
* Dy-shuffle: ShuffleNetV2 widths (0.5x-2.0x, 1.0x = 24/116/232/464/1024) with a 3:1 split:
  the right quarter (rounded up to a multiple of 6: 30/60/120 at 1.0x) goes through a dynamic
  1x1 -> 3x3 (groups = C_r/6, "dw groups adjusted") -> 1x1, the left part is the identity. The
  stride-2 unit uses the same 3:1 output split: left = static dw 3x3 s2 + 1x1 (C_in -> C - C_r),
  right = dynamic 1x1 (C_in -> C_r) -> 3x3 s2 grouped -> 1x1. Channel shuffle with 4 groups
  (a 3:1 split is four quarters, so every quarter reaches the right branch over the next blocks).
  The predictor sees GAP of the whole block input (all C channels, not only the right split).
  -> 87.4M MAdds (paper 88M; our ShuffleNetV2 1.0x 144.9M vs the paper's 146M). At 1.5x the same
  rules give 159.3M where the paper's Dy-/Fix-shuffle (1.5) ablation says 171M (-7 %, unresolved).
* Dy-ResNet18/50: "halve the output channels of the dynamic conv layers in each block". All block
  convs are dynamic, so every block is half as wide: BasicBlock widths 32/64/128/256, Bottleneck
  widths 32/64/128/256 with outputs 128/256/512/1024. The 7x7 stem (64), the projection
  shortcuts (1x1 + BN) and the FC are static; stride on the 3x3 (torchvision v1.5).
  -> 577.5M / 1127.4M MAdds; the paper's 550M / 1075M. The paper counts ResNet18/50 as 1730M/3890M
  where FlopCounterMode gives 1814M/4089M (x0.953/0.951); scaled by that convention ratio ours are
  550.6M / 1072M.
* Static twins (`fix_mobile`, `fix_shuffle`, or `model.kwargs.dynamic=false` on any dy_* net):
  the same channels with plain nn.Conv2d, used in the paper's Fix-mobile / Fix-shuffle ablation.
* `model.kwargs.num_bases` = g_t (paper: 6; ablation 1, 2, 4, 6). `model.width_mult` scales the
  channels (before the rounding to multiples of 6); `model.dropout` (default 0) before the FC.

The dynamic convs come from `make_conv` (operator `dynet`, one FC predictor for mobile/shuffle,
reduction 4 for the ResNets); `share_predictor` wires the block's single predictor through the
operator's block routing (ops/routing.py). Dynamic nets at 224 px, g_t = 6 (params / MAdds of the
fused eval form incl. predictor and kernel aggregation): dy_mobile 7.62M / 136.4M, dy_shuffle
8.75M / 94.5M, dy_resnet18 17.3M / 594.4M, dy_resnet50 43.6M / 1169M (the paper gives no params).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.shufflenetv2 import channel_shuffle
from torchvision.ops.misc import Conv2dNormActivation

from dyconv_repro.errors import UserError
from dyconv_repro.models.mobilenet_v1 import cfg_get, cfg_kwargs, check_choice, cifar_stem_enabled
from dyconv_repro.models.registry import BACKBONES
from dyconv_repro.ops import build_op
from dyconv_repro.ops.routing import wire_block

MOBILE_SETTINGS = ((16, 1, 1), (24, 2, 2), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
SHUFFLE_WIDTHS = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
CHANNELS_PER_GROUP = 6  # Dy-mobile / Dy-shuffle 3x3 convs: groups = C / 6


def round_up(c: float, multiple: int = CHANNELS_PER_GROUP) -> int:
    """Round a channel count up to a multiple (the paper: "C_out rounded up to a multiple of 6")."""
    return max(multiple, int(math.ceil(c / multiple - 1e-9)) * multiple)


def make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNetV2's rounding (nearest multiple of 8, never below 90 %) for the stem and head."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def make_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
              dynamic: bool = True, num_bases: int = 6, reduction: int = 0) -> nn.Module:
    """A block conv: operator `dynet` (g_t = num_bases) when dynamic, else a plain nn.Conv2d.

    `reduction` sets the block predictor: 0 = one FC, r = FC C_in -> C_in/r -> ReLU -> FC.
    """
    padding = kernel_size // 2
    if not dynamic:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
    return build_op("dynet", in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                    groups=groups, num_bases=num_bases, reduction=reduction)


def share_predictor(block: nn.Module, in_channels: int, dynamic: bool) -> None:
    """One coefficient predictor per block, fed GAP(block input), for all the block's dynamic convs.

    Uses the operator's block routing (ops/routing.py): the block gets a `block_router` child that
    runs before the block and hands each dynet conv its (B, C_out, g_t) coefficients.
    """
    if dynamic and not wire_block(block, channel_slice="all", in_channels=in_channels):
        raise RuntimeError(f"{type(block).__name__}: no dynamic conv to share a predictor with")


class DyMobileBlock(nn.Module):
    """1x1 C_in->C, 3x3 C->C (groups C/6, stride), 1x1 C->C; no expansion; residual when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, dynamic: bool = True, num_bases: int = 6):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        self.conv1 = make_conv(cin, cout, 1, dynamic=dynamic, num_bases=num_bases)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = make_conv(cout, cout, 3, stride, groups=cout // CHANNELS_PER_GROUP, dynamic=dynamic,
                               num_bases=num_bases)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv3 = make_conv(cout, cout, 1, dynamic=dynamic, num_bases=num_bases)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6(inplace=True)
        share_predictor(self, cin, dynamic)

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return x + y if self.use_res else y


class DyShuffleBlock(nn.Module):
    """ShuffleNetV2 unit with a 3:1 split; the right branch (1x1 -> grouped 3x3 -> 1x1) is dynamic."""

    def __init__(self, cin: int, cout: int, stride: int, dynamic: bool = True, num_bases: int = 6):
        super().__init__()
        self.stride = stride
        self.right = round_up(cout / 4)
        self.left = cout - self.right
        if stride == 1 and cin != cout:
            raise ValueError(f"stride-1 Dy-shuffle unit needs cin == cout (got {cin}, {cout})")
        r = self.right
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, self.left, 1, bias=False), nn.BatchNorm2d(self.left), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Identity()
        self.conv1 = make_conv(cin if stride > 1 else r, r, 1, dynamic=dynamic, num_bases=num_bases)
        self.bn1 = nn.BatchNorm2d(r)
        self.conv2 = make_conv(r, r, 3, stride, groups=r // CHANNELS_PER_GROUP, dynamic=dynamic,
                               num_bases=num_bases)
        self.bn2 = nn.BatchNorm2d(r)
        self.conv3 = make_conv(r, r, 1, dynamic=dynamic, num_bases=num_bases)
        self.bn3 = nn.BatchNorm2d(r)
        self.act = nn.ReLU(inplace=True)
        share_predictor(self, cin, dynamic)

    def forward(self, x):
        if self.stride == 1:
            left, right = x.split([self.left, self.right], dim=1)
        else:
            left, right = self.branch1(x), x
        y = self.act(self.bn1(self.conv1(right)))
        y = self.bn2(self.conv2(y))
        y = self.act(self.bn3(self.conv3(y)))
        return channel_shuffle(torch.cat((left, y), dim=1), 4)


class DyBasicBlock(nn.Module):
    """ResNet BasicBlock with dynamic 3x3 convs; predictor FC C_in -> C_in/4 -> ReLU -> FC."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, dynamic: bool = True, num_bases: int = 6):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = make_conv(cin, width, 3, stride, dynamic=dynamic, num_bases=num_bases, reduction=4)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make_conv(width, cout, 3, dynamic=dynamic, num_bases=num_bases, reduction=4)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)
        share_predictor(self, cin, dynamic)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class DyBottleneck(nn.Module):
    """ResNet Bottleneck (stride on the 3x3) with dynamic convs; predictor C_in -> C_in/4 -> FC."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, dynamic: bool = True, num_bases: int = 6):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = make_conv(cin, width, 1, dynamic=dynamic, num_bases=num_bases, reduction=4)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make_conv(width, width, 3, stride, dynamic=dynamic, num_bases=num_bases, reduction=4)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = make_conv(width, cout, 1, dynamic=dynamic, num_bases=num_bases, reduction=4)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)
        share_predictor(self, cin, dynamic)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class DyNetClassifier(nn.Module):
    """stem -> features (blocks) -> head -> GAP -> dropout -> FC, shared by the four DyNet networks."""

    def __init__(self, stem: nn.Module, features: nn.Sequential, head: nn.Module, num_features: int,
                 num_classes: int, dropout: float):
        super().__init__()
        self.stem = stem
        self.features = features
        self.head = head
        self.num_features = num_features
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if type(m) is nn.Conv2d:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif callable(getattr(m, "init_like", None)) and hasattr(m, "kernel_size"):
                # a dynamic conv starts at the init of the static conv it stands for (the Fix- twin's)
                w = torch.empty(m.out_channels, m.in_channels // m.groups, *m.kernel_size)
                m.init_like(nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = self.head(self.features(self.stem(x)))
        return self.fc(self.dropout(x.mean((2, 3))))


def dy_mobile(num_classes=1000, width_mult=1.0, dropout=0.0, cifar_stem=False, dynamic=True, num_bases=6):
    stem_c = make_divisible(32 * width_mult)
    stem = Conv2dNormActivation(3, stem_c, 3, stride=1 if cifar_stem else 2, activation_layer=nn.ReLU6)
    blocks, cin = [], stem_c
    for c, n, s in MOBILE_SETTINGS:
        cout = round_up(c * width_mult)
        for i in range(n):
            blocks.append(DyMobileBlock(cin, cout, s if i == 0 else 1, dynamic, num_bases))
            cin = cout
    last = make_divisible(1280 * max(1.0, width_mult))
    head = Conv2dNormActivation(cin, last, 1, activation_layer=nn.ReLU6)
    return DyNetClassifier(stem, nn.Sequential(*blocks), head, last, num_classes, dropout)


def dy_shuffle(num_classes=1000, width_mult=1.0, dropout=0.0, cifar_stem=False, dynamic=True, num_bases=6):
    check_choice("model.width_mult", float(width_mult), list(SHUFFLE_WIDTHS))
    widths = SHUFFLE_WIDTHS[float(width_mult)]
    stem = nn.Sequential(
        Conv2dNormActivation(3, widths[0], 3, stride=1 if cifar_stem else 2, activation_layer=nn.ReLU),
        nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1))
    blocks, cin = [], widths[0]
    for cout, repeats in zip(widths[1:4], (4, 8, 4)):
        for i in range(repeats):
            blocks.append(DyShuffleBlock(cin, cout, 2 if i == 0 else 1, dynamic, num_bases))
            cin = cout
    head = Conv2dNormActivation(cin, widths[4], 1, activation_layer=nn.ReLU)
    return DyNetClassifier(stem, nn.Sequential(*blocks), head, widths[4], num_classes, dropout)


def dy_resnet(depth: int, num_classes=1000, width_mult=1.0, dropout=0.0, cifar_stem=False, dynamic=True,
              num_bases=6):
    block, repeats = {18: (DyBasicBlock, (2, 2, 2, 2)), 50: (DyBottleneck, (3, 4, 6, 3))}[depth]
    if cifar_stem:
        stem = Conv2dNormActivation(3, 64, 3, stride=1, activation_layer=nn.ReLU)
    else:
        stem = nn.Sequential(Conv2dNormActivation(3, 64, 7, stride=2, activation_layer=nn.ReLU),
                             nn.MaxPool2d(3, 2, 1))
    blocks, cin = [], 64
    for stage, n in enumerate(repeats):
        width = max(int(round(32 * 2 ** stage * width_mult)), 1)  # ResNet widths halved
        for i in range(n):
            blocks.append(block(cin, width, 2 if (i == 0 and stage > 0) else 1, dynamic, num_bases))
            cin = width * block.expansion
    return DyNetClassifier(stem, nn.Sequential(*blocks), nn.Identity(), cin, num_classes, dropout)


def _builder(fn, dynamic_default: bool, **fixed):
    def build(model_cfg, num_classes: int, image_size: int) -> nn.Module:
        kw = cfg_kwargs(model_cfg)
        dynamic = bool(kw.pop("dynamic", dynamic_default))
        num_bases = int(kw.pop("num_bases", 6))
        if num_bases < 1:
            raise UserError(f"model.kwargs.num_bases (g_t) must be >= 1 (got {num_bases}); the paper uses 1, 2, 4, 6")
        if kw:
            raise UserError(f"unknown model.kwargs {sorted(kw)} for {cfg_get(model_cfg, 'name', fn.__name__)}; "
                            "valid: dynamic, num_bases")
        return fn(num_classes=int(num_classes), width_mult=float(cfg_get(model_cfg, "width_mult", 1.0)),
                  dropout=float(cfg_get(model_cfg, "dropout", 0.0)),
                  cifar_stem=cifar_stem_enabled(model_cfg, image_size), dynamic=dynamic,
                  num_bases=num_bases, **fixed)

    return build


BACKBONES.add("dy_mobile", _builder(dy_mobile, True), "DyNet Dy-mobile (no-expansion MBv2 blocks, dynet convs)")
BACKBONES.add("fix_mobile", _builder(dy_mobile, False), "DyNet Fix-mobile: Dy-mobile channels, static convs")
BACKBONES.add("dy_shuffle", _builder(dy_shuffle, True), "DyNet Dy-shuffle (ShuffleNetV2, 3:1 split, dynet convs)")
BACKBONES.add("fix_shuffle", _builder(dy_shuffle, False), "DyNet Fix-shuffle: Dy-shuffle channels, static convs")
BACKBONES.add("dy_resnet18", _builder(dy_resnet, True, depth=18), "DyNet Dy-ResNet18 (half-width dynamic blocks)")
BACKBONES.add("dy_resnet50", _builder(dy_resnet, True, depth=50), "DyNet Dy-ResNet50 (half-width dynamic blocks)")
