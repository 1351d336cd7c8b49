"""Building blocks the operators' math is written with: routing heads and kernel-bank initialization."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyconv_repro.errors import UserError


def plain(module: nn.Module, *types) -> bool:
    """`module` is exactly one of `types` and has no forward hooks (so a functional call may replace it)."""
    return type(module) in types and not (module._forward_hooks or module._forward_pre_hooks)


class MLPHead(nn.Sequential):
    """Linear -> ReLU -> Linear (an nn.Sequential: same state_dict keys) that runs its three children as
    functional calls: the routing is a handful of tiny ops and three nested module calls were a large share of
    it. Children with hooks (or swapped for other types) run the normal way."""

    def linears(self) -> tuple[nn.Linear, nn.Linear] | None:
        """(fc1, fc2) when the children are a plain Linear, ReLU, Linear (so functional calls may replace
        them); None when one was hooked or swapped."""
        fc1, act, fc2 = self._modules.values()
        if plain(fc1, nn.Linear) and plain(act, nn.ReLU) and plain(fc2, nn.Linear):
            return fc1, fc2
        return None

    def forward(self, z: Tensor) -> Tensor:
        fcs = self.linears()
        if fcs is not None:
            fc1, fc2 = fcs
            return F.linear(torch.relu(F.linear(z, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        return super().forward(z)


def mlp_head(in_features: int, out_features: int, hidden: int | None = None, bias: bool = True,
             device=None, dtype=None) -> nn.Module:
    """Routing head on pooled features: Linear, or Linear -> ReLU -> Linear when `hidden` is given."""
    dd = dict(device=device, dtype=dtype)
    if not hidden:
        return nn.Linear(in_features, out_features, bias=bias, **dd)
    return MLPHead(nn.Linear(in_features, hidden, bias=bias, **dd), nn.ReLU(inplace=True),
                   nn.Linear(hidden, out_features, bias=bias, **dd))


def init_conv_bank_(bank: Tensor, bias_bank: Tensor | None = None) -> None:
    """Initialize each of the K leading slices like nn.Conv2d initializes its weight/bias (independently)."""
    for i in range(bank.shape[0]):
        nn.init.kaiming_uniform_(bank[i], a=math.sqrt(5))
    if bias_bank is not None:
        fan_in = bank[0].numel() // bank.shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias_bank, -bound, bound)


def kernel_std(weight: Tensor) -> float:
    """The std of a replaced layer's kernel: the scale its backbone's initializer (or its training) gave it."""
    return float(weight.detach().float().std()) if weight.numel() > 1 else 0.0


def draw_like_(tensor: Tensor, weight: Tensor, scale: float = 1.0) -> None:
    """Fill `tensor` from N(0, scale * std(weight)): a fresh kernel at the replaced layer's init scale."""
    with torch.no_grad():
        tensor.normal_(0.0, scale * kernel_std(weight))


def init_bank_like_(bank: Tensor, bias_bank: Tensor | None, weight: Tensor, bias: Tensor | None) -> None:
    """Draw every kernel of a bank (and its bias) independently at the replaced layer's scale.

    The TF CondConv reference gives each expert the layer's own initializer; PyTorch's default
    kaiming_uniform(a=sqrt(5)) is 2-3x smaller than the kaiming-normal(fan_out) backbones use.
    """
    draw_like_(bank, weight)
    if bias_bank is not None:
        if bias is None:
            with torch.no_grad():
                bias_bank.zero_()
        else:
            draw_like_(bias_bank, bias)


def copy_static_into_bank(bank: Tensor, bias_bank: Tensor | None, weight: Tensor, bias: Tensor | None,
                          name: str) -> None:
    """Copy a static layer's kernel (and bias) into every slice of a bank (K, *kernel shape)."""
    if tuple(weight.shape) != tuple(bank.shape[1:]):
        raise UserError(f"{name}: static weight has shape {tuple(weight.shape)}, expected {tuple(bank.shape[1:])}")
    with torch.no_grad():
        bank.copy_(weight.detach().to(bank).unsqueeze(0).expand_as(bank))
        if bias_bank is not None:
            if bias is None:
                bias_bank.zero_()
            else:
                bias_bank.copy_(bias.detach().to(bias_bank).unsqueeze(0).expand_as(bias_bank))


def batch_norm(bn: nn.modules.batchnorm._BatchNorm, z: Tensor) -> Tensor:
    """`bn(z)`, except that a training batch with one value per channel (batch 1 of a (B, C) routing vector)
    is normalized with the running statistics instead of raising (nn.BatchNorm refuses it: the batch
    statistics of one value are degenerate). Routing heads with a BN (ODConv's) stay usable at batch 1."""
    if bn.training and z.numel() // z.shape[1] <= 1:
        return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(z)
