"""`refconv`: RefConv (Cai et al., arXiv 2310.10563) -- a frozen basis kernel refocused by a learned conv.

Refocusing learns connections between the pretrained kernel's own parameters, so the model improves at no
inference cost: after training the layer is re-parameterized to a plain conv.

W_t = W_b + convmap(W_b): the C_out x (C_in/g) 2-D kernels of the basis W_b are the channels of one
k x k "image" (N = C_out*C_in/g channels) and convmap = Conv2d(N, N, map_k, padding map_k//2,
groups = C_in*C_out/g^2, bias=False) -- i.e. every convmap group mixes g consecutive 2-D kernels: a
dense C->C mix for a depthwise layer, one map_k x map_k filter per 2-D kernel for a dense layer.

State-dict compatibility: the basis is a (persistent) buffer called `weight` and the bias a Parameter
called `bias`, so `<layer>.weight` means the same tensor as in the baseline conv. A baseline checkpoint
loads into a RefConv model with `strict=False` (only `convmap.weight` is missing), and the deployed model
(`reparameterize()` -> nn.Conv2d with weight W_t) has exactly the baseline's keys and shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.base import ConvOp
from dyconv_repro.ops.layers import draw_like_
from dyconv_repro.ops.registry import OPS

INITS = ("zero", "xavier", "default")
BASES = ("pretrained", "random")


@OPS.register("refconv", help="RefConv: frozen basis kernel + trainable refocusing conv over the kernel")
class RefConv(ConvOp):
    """Refocusing conv. Options (the paper's ablations):

    - init: "zero" (model == baseline at step 0), "xavier" (the paper, xavier_uniform), "default"
      (PyTorch's Conv2d init, as in the official code).
    - basis: "pretrained" (filled by `load_static_weight`) or "random" (a fixed random basis;
      `load_static_weight` then copies only the bias).
    - train_basis: the basis becomes a trainable Parameter (still named `weight`).
    """

    copies_static_weight = True  # the refocusing is defined relative to the replaced (pretrained) kernel

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1,
                 groups=1, bias=False, map_k=3, init="zero", train_basis=False, basis="pretrained", *, device=None,
                 dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        dd = dict(device=device, dtype=dtype)
        if init not in INITS:
            raise UserError(f"refconv: unknown init {init!r}; valid choices: {', '.join(INITS)}")
        if basis not in BASES:
            raise UserError(f"refconv: unknown basis {basis!r}; valid choices: {', '.join(BASES)}")
        if int(map_k) < 1 or int(map_k) % 2 == 0:
            raise UserError(f"refconv: map_k must be an odd positive integer (got {map_k}) so that the "
                            "refocusing conv keeps the kernel size")
        self.map_k, self.init, self.basis, self.train_basis = int(map_k), init, basis, bool(train_basis)
        cin_g = self.in_channels // self.groups
        self.num_kernels = self.out_channels * cin_g  # N: 2-D kernels treated as channels
        w = torch.empty(self.out_channels, cin_g, *self.kernel_size, **dd)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Conv2d's init (the "random" basis)
        if self.train_basis:
            self.weight = nn.Parameter(w)
        else:
            self.register_buffer("weight", w)
        if bias:
            bound = 1.0 / math.sqrt(cin_g * self.kernel_size[0] * self.kernel_size[1])
            self.bias = nn.Parameter(torch.empty(self.out_channels, **dd).uniform_(-bound, bound))
        else:
            self.bias = None
        self.convmap = nn.Conv2d(self.num_kernels, self.num_kernels, self.map_k, padding=self.map_k // 2,
                                 groups=self.num_kernels // self.groups, bias=False, **dd)
        if init == "zero":
            nn.init.zeros_(self.convmap.weight)
        elif init == "xavier":
            nn.init.xavier_uniform_(self.convmap.weight)

    def refocused_weight(self) -> torch.Tensor:
        """W_t = W_b + convmap(W_b)."""
        wb = self.weight
        delta = self.convmap(wb.reshape(1, self.num_kernels, *self.kernel_size))
        return wb + delta.reshape(wb.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.refocused_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    @torch.no_grad()
    def init_like(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Surgery: a random basis is drawn at the replaced conv's scale (a pretrained one is then copied over)."""
        draw_like_(self.weight, weight)
        if self.bias is not None:
            if bias is None:
                self.bias.zero_()
            else:
                draw_like_(self.bias, bias)

    @torch.no_grad()
    def load_static_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Set the basis from a (pretrained) conv kernel; with basis="random" only the bias is copied."""
        if weight.shape != self.weight.shape:
            raise UserError(f"refconv: load_static_weight got a kernel of shape {tuple(weight.shape)}, "
                            f"expected {tuple(self.weight.shape)}")
        if self.basis == "pretrained":
            self.weight.copy_(weight)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        """A plain nn.Conv2d holding W_t: same keys/shapes as the baseline conv, same inference cost."""
        wt = self.refocused_weight()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None, device=wt.device,
                         dtype=wt.dtype)
        conv.weight.copy_(wt)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", map_k={self.map_k}, init={self.init!r}, basis={self.basis!r}, "
                f"train_basis={self.train_basis}")
