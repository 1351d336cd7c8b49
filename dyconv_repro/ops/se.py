"""`se`: a static conv followed by a Squeeze-and-Excitation block (Hu et al., SENet).

The baseline attention of the WeightNet / dynamic-conv comparisons: GAP -> FC(C/r) -> ReLU -> FC(C) ->
sigmoid, scaling the conv's output channels. The SE block is timm's `SEModule` with an exact C/r
hidden width (no rounding to multiples of 8).
"""

from __future__ import annotations

import torch
from timm.layers import SEModule
from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.base import ConvOp
from dyconv_repro.ops.registry import OPS


class SqueezeExcite(SEModule):
    """SE block on `channels` with hidden width max(1, round(channels / reduction))."""

    def __init__(self, channels: int, reduction: float = 4):
        if reduction <= 0:
            raise UserError(f"se: reduction must be > 0, got {reduction}")
        super().__init__(channels, rd_ratio=1.0 / reduction, rd_divisor=1)
        self.reduction = reduction


@OPS.register("se", help="static conv followed by an SE block (reduction=4)")
class SEConv(ConvOp):
    """`conv` (an nn.Conv2d, keys `conv.weight`/`conv.bias`) then `se` (SqueezeExcite on C_out)."""


    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1,
                 groups=1, bias=False, reduction=4, *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, self.stride, self.padding,
                              self.dilation, self.groups, bias=bias, device=device, dtype=dtype)
        self.se = SqueezeExcite(self.out_channels, reduction).to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv(x))

    @torch.no_grad()
    def init_like(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Surgery: the static conv keeps the replaced conv's own kernel (the backbone's init draw)."""
        self.load_static_weight(weight, bias)

    @torch.no_grad()
    def load_static_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy the replaced conv's kernel (and bias) into the static conv."""
        if weight.shape != self.conv.weight.shape:
            raise UserError(f"se: load_static_weight got a kernel of shape {tuple(weight.shape)}, "
                            f"expected {tuple(self.conv.weight.shape)}")
        self.conv.weight.copy_(weight)
        if bias is not None and self.conv.bias is not None:
            self.conv.bias.copy_(bias)
