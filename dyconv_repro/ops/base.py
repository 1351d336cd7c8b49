"""What every operator shares: nn.Conv2d's constructor signature and attributes.

Every operator subclasses `ConvOp` so that surgery, complexity counting and walkers can read
`in_channels, out_channels, kernel_size, stride, padding, dilation, groups` exactly as on nn.Conv2d.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.utils import _pair


def resolve_padding(kernel_size, padding, dilation) -> tuple[int, int]:
    """`padding=None` means 'same' for stride 1: dilation * (k - 1) // 2 per side."""
    k, d = _pair(kernel_size), _pair(dilation)
    if padding is None:
        return (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    if isinstance(padding, str):
        raise ValueError(f"string padding {padding!r} is not supported by dyconv ops; pass an int or None")
    return _pair(padding)


class ConvOp(nn.Module):
    """Base class: stores the nn.Conv2d attributes and validates them like nn.Conv2d does."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1,
                 groups=1, bias=False):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                f"groups ({groups})")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = resolve_padding(kernel_size, padding, dilation)
        self.groups = int(groups)
        self.use_bias = bool(bias)

    def conv_kwargs(self) -> dict:
        """Arguments of F.conv2d for this layer's geometry (without the batch folding)."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if not self.use_bias:
            s += ", bias=False"
        return s
