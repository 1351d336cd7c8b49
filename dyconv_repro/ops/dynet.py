"""`dynet`: DyNet dynamic convolution (Zhang et al., arXiv 2004.10694 / ICLR-2020 submission).

Each output channel t mixes its own g_t = num_bases fixed kernels: w_t(x) = sum_i eta_t^i(x) w_t^i,
eta = sigmoid(FC(ReLU(FC(GAP(x))))) (one FC when reduction=0). Two exact forms:

* training form (the paper's, `training_forward`): one static conv with C_out*g_t filters, then the
  eta-weighted sum of the g_t feature maps of each output channel;
* fused form (`kernel`): aggregate the kernels per sample, then one per-sample-kernel conv.

They are equal (tests). `fused=None` (default) and True run the fused form in training too (g_t times fewer
conv MACs; results/benchmarks/ has the speed), `fused=False` runs the paper's training form. The op is
input-dependent, so there is no `reparameterize()` to a static conv. Biases (if any) are per base and mixed
with the same eta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.engine import DynamicConvOp, gap
from dyconv_repro.ops.layers import init_bank_like_, init_conv_bank_, mlp_head
from dyconv_repro.ops.registry import OPS
from dyconv_repro.ops.routing import SharedHead


def predictor_hidden(in_features: int, reduction: int) -> int | None:
    return max(1, int(in_features) // int(reduction)) if reduction else None


@OPS.register("dynet", help="DyNet: per-output-channel sigmoid mix of g_t fixed kernels (num_bases=6)")
class DyNetConv2d(DynamicConvOp):
    """Per-output-channel dynamic kernel fusion."""


    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, num_bases: int = 6, reduction: int = 4, *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if int(num_bases) < 1 or int(reduction or 0) < 0:
            raise UserError(f"dynet needs num_bases >= 1 and reduction >= 0 (0 = one FC), got {num_bases}, {reduction}")
        dd = dict(device=device, dtype=dtype)
        self.num_bases, self.reduction = int(num_bases), int(reduction or 0)
        self.fused: bool | None = None
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, self.num_bases, in_channels // groups, kh, kw, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, self.num_bases, **dd)) if bias else None
        self.predictor = mlp_head(in_channels, out_channels * self.num_bases,
                                  predictor_hidden(in_channels, self.reduction), **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # each base kernel initialized like an nn.Conv2d kernel of this layer
        init_conv_bank_(self.weight.transpose(0, 1), None if self.bias is None else self.bias.t())

    def init_like(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Surgery: draw every base kernel at the replaced conv's scale, not PyTorch's default."""
        init_bank_like_(self.weight, self.bias, weight, bias)

    def coefficients(self, x: Tensor) -> Tensor:
        """eta: (B, C_out, g_t) in (0, 1)."""
        eta = self.block_input() if self.block_routed else torch.sigmoid(self.predictor(gap(x)))
        return eta.reshape(eta.shape[0], self.out_channels, self.num_bases)

    def kernel(self, x: Tensor):
        eta = self.coefficients(x)  # (B, T, I)
        t, i = self.out_channels, self.num_bases
        # per output channel t: (B, I) @ (I, n) -> batched over t
        w = torch.bmm(eta.transpose(0, 1), self.weight.reshape(t, i, -1)).transpose(0, 1)
        w = w.reshape(x.shape[0], *self.weight.shape[:1], *self.weight.shape[2:])
        b = None if self.bias is None else (eta * self.bias).sum(-1)
        return w, b

    def training_forward(self, x: Tensor) -> Tensor:
        """The paper's training form: conv with C_out*g_t filters, then mix the g_t maps per channel."""
        eta = self.coefficients(x)
        y = F.conv2d(x, self.weight.reshape(-1, *self.weight.shape[2:]),
                     None if self.bias is None else self.bias.reshape(-1),
                     self.stride, self.padding, self.dilation, self.groups)
        b, _, h, w = y.shape
        y = y.reshape(b, self.out_channels, self.num_bases, h, w)
        return (y * eta[..., None, None]).sum(2)

    @classmethod
    def block_head(cls, in_features: int, ops: list) -> nn.Module:
        """DyNet: one coefficient predictor per block gives the coefficients of all its dynamic convs."""
        dims = [op.out_channels * op.num_bases for op in ops]
        ref = ops[0].weight
        body = mlp_head(in_features, sum(dims), predictor_hidden(in_features, ops[0].reduction), device=ref.device,
                        dtype=ref.dtype)
        return SharedHead(body, dims, share=False, activation="sigmoid")

    def attach_block_routing(self, slot, in_features: int) -> None:
        super().attach_block_routing(slot, in_features)
        self.predictor = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_bases={self.num_bases}, reduction={self.reduction}"
