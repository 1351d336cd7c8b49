"""`conv`: the static nn.Conv2d baseline."""

from __future__ import annotations

from torch import nn

from dyconv_repro.ops.base import resolve_padding
from dyconv_repro.ops.registry import OPS


@OPS.register("conv", help="static nn.Conv2d (the baseline)")
class StaticConv(nn.Conv2d):
    """Plain nn.Conv2d whose `padding=None` means 'same' like every other operator."""

    baseline = True  # surgery keeps the model's own convs instead of re-initializing them
    depthwise_only = False
    linear_form = None
    copies_static_weight = False

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1,
                 groups=1, bias=False, *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=resolve_padding(kernel_size, padding, dilation), dilation=dilation,
                         groups=groups, bias=bias, device=device, dtype=dtype)

    @classmethod
    def capabilities(cls) -> list[str]:
        return []
