"""Streamed per-sample kernels: regenerated chunk by chunk, never kept.

The per-sample kernels of a big layer (ResNet-18 layer4: 2.4M entries a sample, 300 MB at batch 32) cost more
than the conv itself on this CPU: autograd keeps them for backward, and every fresh block above glibc's mmap
threshold comes back as new pages. Ops whose kernel is a *linear* mix of parameters (`kernel_factors`:
CondConv, DY-Conv, WeightNet) are therefore regenerated chunk by chunk into a reused per-thread scratch buffer,
in forward and again in backward, where the mix's own gradients are written out by hand. Autograd keeps only x
and the coefficients. `streams(op, x)` picks it: always when no gradient is needed (the kernel goes to scratch
instead of a fresh allocation), in training only for big dense k > 1 kernels (small kernels do not pay: there
the grouped conv's own buffers, not the kernel, fault). Measurements: results/benchmarks/ops_cpu.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from dyconv_repro.ops.cpu import kernels, rules
from dyconv_repro.ops.cpu.scratch import scratch
from dyconv_repro.ops.engine.dispatch import ConvCall, dynamic_conv2d, select_path
from dyconv_repro.ops.engine.dynamic import DynamicConvOp
from dyconv_repro.ops.engine.mixing import BankMix

STREAM_CHUNK_ELEMS = 1 << 23  # kernel entries generated at once (32 MB fp32 scratch, two buffers) ...
STREAM_MIN_CHUNK = 8  # ... but at least this many samples: MKL's (c, K) @ (K, n) mix is much slower a sample
                      # at c = 3 than at c >= 8 (n = 512*512*9, K = 4, 2 threads)


def stream_chunk(batch: int, n: int) -> int:
    """Samples whose kernels (n entries each) the streamed path generates at once."""
    return max(1, min(batch, max(STREAM_MIN_CHUNK, STREAM_CHUNK_ELEMS // n)))


def streams(op, x: Tensor) -> bool:
    """Auto choice of the streamed path for `op` on x (CPU fp32, no autocast; the op has kernel_factors)."""
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if type(op).kernel_factors is DynamicConvOp.kernel_factors:
        return False
    if not torch.is_grad_enabled() or x.shape[0] == 1 and not op.training:
        return not torch.is_grad_enabled()
    co, ci, kh, kw = op.kernel_shape
    return op.groups == 1 and kh * kw > 1 and co * ci * kh * kw >= rules.LOOP_MIN_KERNEL and x.shape[0] > 1


def make_kernels(mix, coeff: Tensor, param: Tensor, out: Tensor) -> Tensor:
    """mix.make(coeff, param) into `out`, by the native mix for bank mixes where it may run."""
    if mix is BankMix and kernels.bank_mix_into(coeff, param.reshape(param.shape[0], -1), out):
        return out
    return mix.make(coeff, param, out)


def _chunk_path(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> str:
    """fold or loop for one chunk (1x1 kernels run as the fold's grouped conv)."""
    path = select_path(ConvCall.of(x, weight, stride, padding, dilation, groups))
    return "loop" if path == "loop" else "fold"


class _StreamedConv(torch.autograd.Function):
    """Per-sample conv whose kernels `mix.make(coeff, param)` are regenerated chunk-wise, never stored."""

    @staticmethod
    def forward(ctx, x, coeff, param, bias, mix, wshape, geometry):
        ctx.save_for_backward(x, coeff, param)
        ctx.mix, ctx.wshape, ctx.geometry, ctx.has_bias = mix, wshape, geometry, bias is not None
        return streamed_forward(x, coeff, param, bias, mix, wshape, geometry, grad=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, coeff, param = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        mix, wshape = ctx.mix, ctx.wshape
        b, n = x.shape[0], math.prod(wshape)
        chunk = stream_chunk(b, n)
        gy = gy.contiguous()
        need_x = ctx.needs_input_grad[0]
        gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        gcoeff = torch.empty_like(coeff)
        gparam = torch.zeros(param.shape[0], param.numel() // param.shape[0], dtype=param.dtype, device=param.device)
        geo = (stride, padding, dilation, False, (0, 0), groups)
        for s in range(0, b, chunk):
            c = min(chunk, b - s)
            w = make_kernels(mix, coeff[s:s + c], param, scratch("w", c * n, x).view(c, n)).view(c, *wshape)
            gw = scratch("gw", c * n, x).view(c, *wshape)
            xs, gys = x[s:s + c], gy[s:s + c]
            if _chunk_path(xs, w, stride, padding, dilation, groups) == "fold":  # the chunk as one grouped conv
                gxf, gwf, _ = torch.ops.aten.convolution_backward(
                    gys.reshape(1, -1, *gys.shape[2:]), xs.reshape(1, -1, *xs.shape[2:]), w.reshape(-1, *wshape[1:]),
                    None, stride, padding, dilation, False, (0, 0), c * groups, (need_x, True, False))
                if need_x:
                    gx[s:s + c] = gxf.view_as(xs)
                gw.view(-1).copy_(gwf.reshape(-1))
            else:  # one conv per sample; dense weight gradients as one batched matmul over im2col columns
                if groups == 1:
                    cols = F.unfold(xs, wshape[-2:], dilation, padding, stride)
                    torch.bmm(gys.reshape(c, wshape[0], -1), cols.transpose(1, 2), out=gw.view(c, wshape[0], -1))
                for i in range(c):
                    gxi, gwi, _ = torch.ops.aten.convolution_backward(
                        gys[i:i + 1], xs[i:i + 1], w[i], None, *geo, (need_x, groups != 1, False))
                    if need_x:
                        gx[s + i].copy_(gxi[0])
                    if groups != 1:
                        gw[i].copy_(gwi)
            gcoeff[s:s + c] = mix.backward(coeff[s:s + c], param, gw.view(c, n), gparam)
        gbias = gy.sum((2, 3)) if ctx.has_bias else None
        return gx, gcoeff, gparam.view_as(param), gbias, None, None, None


def streamed_forward(x: Tensor, coeff: Tensor, param: Tensor, bias: Tensor | None, mix, wshape, geometry,
                     path: str = "auto", grad: bool = False) -> Tensor:
    """Per-sample conv with the kernels generated chunk-wise into scratch (no autograd through them)."""
    b, n = x.shape[0], math.prod(wshape)
    chunk = stream_chunk(b, n)
    stride, padding, dilation, groups = geometry
    outs = []
    with torch.no_grad():
        for s in range(0, b, chunk):
            c = min(chunk, b - s)
            w = make_kernels(mix, coeff[s:s + c], param, scratch("w", c * n, x).view(c, n)).view(c, *wshape)
            xs = x[s:s + c]
            p = path if path != "auto" else (_chunk_path(xs, w, *geometry) if grad else "auto")
            outs.append(dynamic_conv2d(xs, w, None if bias is None else bias[s:s + c], stride, padding, dilation,
                                       groups, p))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def streamed_conv2d(x: Tensor, coeff: Tensor, param: Tensor, bias: Tensor | None, mix, wshape, stride, padding,
                    dilation, groups: int) -> Tensor:
    """Per-sample conv with kernels W[i] = mix.make(coeff[i], param), differentiable, never materialized."""
    geometry = (tuple(stride), tuple(padding), tuple(dilation), int(groups))
    if torch.is_grad_enabled() and (x.requires_grad or coeff.requires_grad or param.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _StreamedConv.apply(x, coeff, param, bias, mix, tuple(wshape), geometry)
    return streamed_forward(x, coeff, param, bias, mix, tuple(wshape), geometry)


def forward(op, x: Tensor) -> Tensor:
    """The op's forward by the streamed path (x may be the routing alias)."""
    factors = op.kernel_factors(x)
    if factors is None:
        raise ValueError(f"{type(op).__name__} has no streamed path (no kernel_factors)")
    coeff, param, bias, mix = factors
    return streamed_conv2d(x, coeff, param, bias, mix, op.kernel_shape, op.stride, op.padding, op.dilation,
                           op.groups)
