"""Pieces every input-dependent operator shares: one per-sample kernel per input, one fast conv.

CondConv, DY-Conv, WeightNet and DyNet (fused) all reduce to: pooled input -> routing head ->
coefficients -> per-sample kernel W (B, C_out, C_in/g, k, k) (+ bias (B, C_out)) -> conv of each
sample with its own kernel. `dynamic_conv2d` runs that last step with the fastest exact path for
the regime (measured with scripts/time_dynamic_paths.py on the 2-thread CPU):

* ``fold``   : batch folded into conv groups, X -> (1, B*C_in, H, W), groups = B*g (any geometry).
               At batch 1 this *is* the plain conv with the aggregated kernel.
* ``matmul`` : 1x1 kernels with zero padding as a batched matmul (stride = subsampling first);
               keeps channels_last inputs channels_last. 2-5x faster than ``fold`` on CPU.
* ``loop``   : one plain conv per sample (unbind/cat). The reference for tests, and the faster path
               for big per-sample convs: dense/grouped k > 1 with >= 50M MACs per sample, depthwise
               on maps >= ~40^2. Measured fwd+bwd / static floor (scripts/time_dynamic_paths.py,
               dynamicconv, 2 threads, batch 32 | 64):
                 layer               fold          loop
                 3x3 64@56^2         1.09 | 1.34   1.16 | 1.09
                 3x3 128@28^2        1.18 | 1.32   1.32 | 1.26
                 3x3 256@14^2        2.29 | 2.41   2.05 | 1.82
                 3x3 512@7^2         6.10          4.52
                 dw3x3 144@56^2      2.21 | 2.27   1.08 | 0.87
                 dw3x3 192@28^2      1.54 | 2.04   1.72 | 1.07
                 dw3x3 576@14^2      2.22 | 2.29   2.34 | 2.85
                 3x3 16@32^2 (CIFAR) 1.31 | 1.30   7.05 | 3.69   <- small convs: per-sample calls are slow
                 3x3 32@16^2         1.43 | 1.40   6.02 | 2.93
                 3x3 64@8^2          2.12 | 2.13   4.95 | 3.46
At batch 1 every path is the plain conv with the aggregated kernel (``fold`` with B = 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyconv_repro.ops.base import ConvOp

PATHS = ("auto", "fold", "matmul", "loop")


class _GlobalAvgPool(torch.autograd.Function):
    """x.mean((2, 3)) whose backward returns a stride-0 *view* of grad / (H*W).

    Autograd's own MeanBackward divides the expanded gradient, which writes a full-size tensor and
    then costs another full pass to accumulate into x's gradient; on the memory-bound layers
    (1x1 projections, depthwise) that doubled the routing overhead. Here the division is on (B, C).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, g):
        b, c, h, w = ctx.shape
        return (g / (h * w)).reshape(b, c, 1, 1).expand(b, c, h, w)


def gap(x: Tensor) -> Tensor:
    """Global average pooling to (B, C); memory-format agnostic; cheap backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GlobalAvgPool.apply(x)
    return x.mean(dim=(2, 3))


def aggregate(coeff: Tensor, bank: Tensor) -> Tensor:
    """Mix a bank of K tensors (K, *shape) with per-sample coefficients (B, K) -> (B, *shape)."""
    k = bank.shape[0]
    return torch.mm(coeff, bank.reshape(k, -1)).reshape(coeff.shape[0], *bank.shape[1:])


def mlp_head(in_features: int, out_features: int, hidden: int | None = None, bias: bool = True) -> nn.Module:
    """Routing head on pooled features: Linear, or Linear -> ReLU -> Linear when `hidden` is given."""
    if not hidden:
        return nn.Linear(in_features, out_features, bias=bias)
    return nn.Sequential(nn.Linear(in_features, hidden, bias=bias), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features, bias=bias))


def init_conv_bank_(bank: Tensor, bias_bank: Tensor | None = None) -> None:
    """Initialize each of the K leading slices like nn.Conv2d initializes its weight/bias (independently)."""
    for i in range(bank.shape[0]):
        nn.init.kaiming_uniform_(bank[i], a=math.sqrt(5))
    if bias_bank is not None:
        fan_in = bank[0].numel() // bank.shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias_bank, -bound, bound)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


LOOP_MIN_MACS = 50_000_000  # dense/grouped: per-sample conv work above which per-sample convs beat the fold
LOOP_MIN_DW_PIXELS = 1600     # depthwise: output map size (~40^2) above which per-sample convs beat the fold


def select_path(x: Tensor, weight: Tensor, stride, padding, groups: int) -> str:
    """The fast path for this regime (see module docstring for the measurements behind it)."""
    b, kh, kw = x.shape[0], *weight.shape[-2:]
    if b == 1:
        return "fold"  # = the plain conv with the aggregated kernel
    if kh == kw == 1 and tuple(padding) == (0, 0) and groups == 1:
        return "matmul"
    h_out = (x.shape[-2] + 2 * padding[0] - kh) // stride[0] + 1
    w_out = (x.shape[-1] + 2 * padding[1] - kw) // stride[1] + 1
    if groups > 1 and groups == x.shape[1] and weight.shape[2] == 1:  # depthwise
        return "loop" if h_out * w_out >= LOOP_MIN_DW_PIXELS else "fold"
    macs = weight[0].numel() * h_out * w_out
    return "loop" if macs >= LOOP_MIN_MACS else "fold"


def fold_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """Per-sample kernels as one grouped conv with the batch folded into the groups."""
    b, c_in, h, w = x.shape
    c_out = weight.shape[1]
    y = F.conv2d(x.reshape(1, b * c_in, h, w), weight.reshape(b * c_out, *weight.shape[2:]),
                 None if bias is None else bias.reshape(-1), stride, padding, dilation, b * groups)
    return y.reshape(b, c_out, y.shape[-2], y.shape[-1])


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense.

    `y.sum().backward()` (and similar) hands back a stride-0 expanded gradient, which sends CPU bmm
    to a per-batch copy loop (~10x slower); a conv makes its grad contiguous itself, bmm does not.
    """

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def matmul_conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None, stride) -> Tensor:
    """1x1, zero-padding, groups=1 per-sample conv as a batched matmul; output keeps x's memory format."""
    sh, sw = stride
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    b, c_in, h, w = x.shape
    wmat = weight.reshape(b, weight.shape[1], c_in)
    if _is_channels_last(x):
        xm = x.permute(0, 2, 3, 1).reshape(b, h * w, c_in)
        if bias is None:
            y = torch.bmm(xm, wmat.transpose(1, 2))
        else:
            y = torch.baddbmm(bias.unsqueeze(1), xm, wmat.transpose(1, 2))
        if y.requires_grad:
            y = _DenseGrad.apply(y)
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    xm = x.reshape(b, c_in, h * w)
    y = torch.bmm(wmat, xm) if bias is None else torch.baddbmm(bias.unsqueeze(2), wmat, xm)
    if y.requires_grad:
        y = _DenseGrad.apply(y)
    return y.reshape(b, -1, h, w)


def loop_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """One plain conv per sample: the reference, and (unbind/stack, no per-slice zero-filled
    gradients) a competitive path where plain convs beat the folded grouped conv."""
    biases = [None] * x.shape[0] if bias is None else bias.unbind(0)
    outs = [F.conv2d(xi.unsqueeze(0), wi, bi, stride, padding, dilation, groups)
            for xi, wi, bi in zip(x.unbind(0), weight.unbind(0), biases)]
    return torch.cat(outs, 0)


def dynamic_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
                   path: str = "auto") -> Tensor:
    """Convolve sample i of x with weight[i] (+ bias[i]); `path` forces an implementation (tests)."""
    if path == "auto":
        path = select_path(x, weight, stride, padding, groups)
    if path == "matmul":
        if weight.shape[-2:] != (1, 1) or tuple(padding) != (0, 0) or groups != 1:
            raise ValueError("the matmul path needs a 1x1 kernel, zero padding and groups=1")
        return matmul_conv1x1(x, weight, bias, stride)
    if path == "fold":
        return fold_conv2d(x, weight, bias, stride, padding, dilation, groups)
    if path == "loop":
        return loop_conv2d(x, weight, bias, stride, padding, dilation, groups)
    raise ValueError(f"unknown dynamic conv path {path!r}; valid: {', '.join(PATHS)}")


class DynamicConvOp(ConvOp):
    """Base of the per-sample-kernel operators: subclasses implement `kernel(x) -> (weight, bias)`.

    Routing input: GAP of the layer input by default; when block routing is wired
    (`dyconv_repro.ops.routing`), the enclosing block's hook puts the shared routing input in
    `self._slot.value` and the op reads it instead. `path` forces an implementation (tests, benchmarks).
    """

    path: str = "auto"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slot = None

    @property
    def block_routed(self) -> bool:
        return self._slot is not None

    def block_input(self) -> Tensor:
        """The routing input handed over by the enclosing block (block routing only)."""
        value = self._slot.value
        if value is None:
            raise RuntimeError(f"{type(self).__name__} is wired for block routing but its block's hook did not "
                               "run: call the enclosing block, not the op alone")
        return value

    def kernel(self, x: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.kernel(x)
        return dynamic_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups, self.path)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Slow reference: the same per-sample kernels applied one sample at a time."""
        weight, bias = self.kernel(x)
        return loop_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    # --- block routing protocol (see dyconv_repro/ops/routing.py) ---
    @classmethod
    def block_head(cls, in_features: int, ops: list) -> nn.Module:  # pragma: no cover - abstract
        """The module that turns the pooled block input into one routing input per op."""
        raise NotImplementedError

    def attach_block_routing(self, slot, in_features: int) -> None:
        """Read the routing input from `slot` (a tensor of `in_features` columns) from now on."""
        self._slot = slot
