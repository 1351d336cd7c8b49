"""Per-sample kernels that are linear mixes of parameters, and how to make them.

CondConv and DY-Conv mix a bank of K kernels with per-sample coefficients (`BankMix`: W = coeff @ bank);
WeightNet's grouped fc2 scales each kernel row by its own coefficients (`RowMix`). An op that can say so
(`kernel_factors`) lets a backend regenerate its kernels on demand instead of keeping them (the CPU backend's
streamed path); `make` / `backward` are that mix and its hand-written gradients, in aten.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dyconv_repro.ops.engine import dispatch


def aggregate(coeff: Tensor, bank: Tensor) -> Tensor:
    """Mix a bank of K tensors (K, *shape) with per-sample coefficients (B, K) -> (B, *shape)."""
    k = bank.shape[0]
    mixed = dispatch.bank_mix(coeff, bank.reshape(k, -1))
    return mixed.reshape(coeff.shape[0], *bank.shape[1:])


class BankMix:
    """W = coeff @ bank: coeff (B, K), bank (K, *kernel shape) -- CondConv / DY-Conv."""

    @staticmethod
    def make(coeff: Tensor, param: Tensor, out: Tensor) -> Tensor:
        return torch.mm(coeff, param.reshape(param.shape[0], -1), out=out)

    @staticmethod
    def backward(coeff: Tensor, param: Tensor, gw: Tensor, gparam: Tensor) -> Tensor:
        """Accumulate d(param) into `gparam` (flat (K, n)); return d(coeff)."""
        gparam.addmm_(coeff.t(), gw)
        return torch.mm(gw, param.reshape(param.shape[0], -1).t())


class RowMix:
    """W[b, r, e] = sum_m coeff[b, r, m] * param[r, e, m] -- WeightNet's grouped fc2."""

    @staticmethod
    def make(coeff: Tensor, param: Tensor, out: Tensor) -> Tensor:
        b, (r, e, m) = coeff.shape[0], param.shape
        if m == 1:
            return torch.mul(coeff, param.reshape(r, e), out=out.view(b, r, e)).view(b, -1)
        return out.copy_(torch.einsum("brm,rem->bre", coeff, param).reshape(b, -1))

    @staticmethod
    def backward(coeff: Tensor, param: Tensor, gw: Tensor, gparam: Tensor) -> Tensor:
        b, (r, e, _) = coeff.shape[0], param.shape
        gw = gw.view(b, r, e)
        gparam.add_(torch.einsum("bre,brm->rem", gw, coeff).reshape(gparam.shape))
        return torch.einsum("bre,rem->brm", gw, param)
