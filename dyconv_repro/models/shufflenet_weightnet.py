"""ShuffleNetV2 with WeightNet's reduced widths (Ma et al., ECCV 2020; megvii-model/WeightNet).

Built on torchvision's `ShuffleNetV2` / `InvertedResidual` classes (so surgery and block routing
recognize the blocks), with three differences taken from the official `shufflenet_v2.py`:

* widths `[24, 48|112|176|248, x2, x4, 1024]` for 0.5x/1.0x/1.5x/2.0x (slightly narrower than the
  standard ShuffleNetV2 so that the WeightNet version keeps the FLOPs of the baseline);
* the stride-2 block keeps the official split: the projection branch is dw(inp) -> pw(inp -> inp)
  and the main branch pw(inp -> oup/2) -> dw -> pw(oup/2 -> oup - inp). torchvision instead gives
  both branches oup/2 outputs; the two only differ in the first stage (24 -> 112/176/248);
* the 3x3 stem conv and the 1x1 `conv_last` (here `conv5`) have a bias; dropout before the
  classifier (0.2 for 2.0x, 0 otherwise, as officially; `model.dropout` overrides).

Static counts (224 px, FlopCounterMode): 1.368M/40.5M, 2.213M/137.6M, 3.509M/299.0M,
5.505M/557.3M MAdds. Params equal TABLES.md "Derived checks" 3; MAdds are 0.3-0.6 % below its
recount (40.6/138.3/300.7/560.7) and equal to the README baselines (41/138/299/557).
Every conv inside the blocks is a plain nn.Conv2d: the WeightNet variant is this network after
`swap_convs(model, "weightnet", policy)` plus block routing (the per-block shared `x_gap`); with
M=2, G=2 that gives 1.464M/40.6M, 2.436M/137.8M, 3.915M/299.4M, 6.198M/557.9M (derived:
1.464/40.7, 2.436/138.5, 3.915/301.1, 6.198/561.4).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2

from dyconv_repro.models.mobilenet_v1 import cfg_get, cfg_kwargs, check_choice, cifar_stem_enabled
from dyconv_repro.models.registry import BACKBONES

WEIGHTNET_WIDTHS: dict[float, list[int]] = {
    0.5: [24, 48, 96, 192, 1024],
    1.0: [24, 112, 224, 448, 1024],
    1.5: [24, 176, 352, 704, 1024],
    2.0: [24, 248, 496, 992, 1024],
}
STAGE_REPEATS = [4, 8, 4]


class WeightNetInvertedResidual(InvertedResidual):
    """torchvision's ShuffleNetV2 block; at stride 2 with the official branch widths (see module doc)."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__(inp, oup, stride)
        if self.stride == 1 or inp == oup // 2:
            return  # identical to torchvision
        mid, out_main = oup // 2, oup - inp
        self.branch1 = nn.Sequential(
            self.depthwise_conv(inp, inp, kernel_size=3, stride=self.stride, padding=1),
            nn.BatchNorm2d(inp),
            nn.Conv2d(inp, inp, 1, bias=False),
            nn.BatchNorm2d(inp),
            nn.ReLU(inplace=True),
        )
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            self.depthwise_conv(mid, mid, kernel_size=3, stride=self.stride, padding=1),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, out_main, 1, bias=False),
            nn.BatchNorm2d(out_main),
            nn.ReLU(inplace=True),
        )


class WeightNetShuffleNetV2(ShuffleNetV2):
    """torchvision ShuffleNetV2 + biased stem/conv_last + dropout + optional CIFAR stem."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float | None = None,
                 cifar_stem: bool = False, official_init: bool = True):
        check_choice("model.width_mult", float(width_mult), list(WEIGHTNET_WIDTHS))
        widths = WEIGHTNET_WIDTHS[float(width_mult)]
        super().__init__(STAGE_REPEATS, widths, num_classes=num_classes,
                         inverted_residual=WeightNetInvertedResidual)
        self.width_mult = float(width_mult)
        self.conv1[0] = nn.Conv2d(3, widths[0], 3, 1 if cifar_stem else 2, 1, bias=True)
        if cifar_stem:
            self.maxpool = nn.Identity()
        self.conv5[0] = nn.Conv2d(widths[-2], widths[-1], 1, 1, 0, bias=True)
        if dropout is None:
            dropout = 0.2 if self.width_mult == 2.0 else 0.0
        self.dropout = nn.Dropout(float(dropout))
        if official_init:
            self._official_init()

    def _official_init(self) -> None:
        """Official init: convs N(0, 1/fan_in-channels) (stem N(0, 0.01)), BN beta 1e-4, FC N(0, 0.01)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                std = 0.01 if name.startswith("conv1") else 1.0 / m.weight.shape[1]
                nn.init.normal_(m.weight, 0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 1e-4)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x).mean([2, 3])
        return self.fc(self.dropout(x))


@BACKBONES.register("weightnet_shufflenet_v2",
                    help="ShuffleNetV2 with WeightNet's reduced widths (0.5/1.0/1.5/2.0x), in-house")
def build_weightnet_shufflenet_v2(model_cfg, num_classes: int, image_size: int) -> nn.Module:
    dropout = cfg_get(model_cfg, "dropout", None)
    return WeightNetShuffleNetV2(
        width_mult=float(cfg_get(model_cfg, "width_mult", 1.0)),
        num_classes=int(num_classes),
        dropout=None if dropout is None else float(dropout),
        cifar_stem=cifar_stem_enabled(model_cfg, image_size),
        **cfg_kwargs(model_cfg),
    )
