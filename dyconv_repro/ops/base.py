"""What every operator shares: nn.Conv2d's constructor signature and attributes, and a self-description.

Every operator subclasses `ConvOp` so that surgery, complexity counting and walkers can read
`in_channels, out_channels, kernel_size, stride, padding, dilation, groups` exactly as on nn.Conv2d, and
declares on its class what the rest of the system would otherwise look up by name: whether it only replaces
depthwise convs, its fully connected form for the classifier, whether
surgery must hand it the replaced kernel. `capabilities()` lists the optional methods it has. Where the paper
places it is configuration, not code: configs/op/<op>.yaml selects its policy.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.utils import _pair

# optional methods that walkers, the trainer and deploy look for (duck-typed) -> the capability they give
CAPABILITY_METHODS = {"reparameterize": "reparameterize", "decompose": "decompose",
                      "set_temperature": "set_temperature", "regularization_loss": "regularization_loss",
                      "load_static_weight": "load_static_weight", "block_head": "block_routing",
                      "training_forward": "training_form", "share_across_layers": "cross_layer_sharing"}


def resolve_padding(kernel_size, padding, dilation) -> tuple[int, int]:
    """`padding=None` means 'same' for stride 1: dilation * (k - 1) // 2 per side."""
    k, d = _pair(kernel_size), _pair(dilation)
    if padding is None:
        return (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    if isinstance(padding, str):
        raise ValueError(f"string padding {padding!r} is not supported by dyconv ops; pass an int or None")
    return _pair(padding)


def capabilities(cls: type) -> list[str]:
    """The optional capabilities a class provides (methods it defines, a classifier form)."""
    caps = []
    for method, capability in CAPABILITY_METHODS.items():
        attr = getattr(cls, method, None)
        if callable(attr) and not getattr(attr, "_absent", False):
            caps.append(capability)
    if getattr(cls, "linear_form", None) is not None:
        caps.append("classifier")
    return caps


def absent(fn):
    """Mark a base-class method as 'not provided' (capabilities() skips it until a subclass overrides it)."""
    fn._absent = True
    return fn


class ConvOp(nn.Module):
    """Base class: stores the nn.Conv2d attributes and validates them like nn.Conv2d does.

    Class attributes an operator sets to describe itself (read by surgery, policies and `dyconv-list`):

    - `depthwise_only`: the operator is only defined for depthwise convs (surgery keeps the others, with a note).
    - `linear_form`: the nn.Linear-shaped class that replaces a classifier (None: it cannot).
    - `copies_static_weight`: surgery always loads the replaced conv's kernel (`load_static_weight`), because
      the operator is defined relative to it (RefConv's basis).
    """

    depthwise_only: bool = False
    linear_form: type | None = None
    copies_static_weight: bool = False

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

    @classmethod
    def capabilities(cls) -> list[str]:
        return capabilities(cls)

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
