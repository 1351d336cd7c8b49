"""The native kernels' entry points: when one may run, and the autograd functions around the calls.

A native call runs only where it computes exactly what the aten path would: built and not suspended, CPU fp32
inputs, no CPU autocast (aten would compute in the autocast dtype), no TorchDispatchMode (FlopCounterMode must
see aten ops), not compiling, tracing or exporting (`dispatch.traced()`, checked first: dynamo must not meet the
dispatch-mode query, and a tracer records no native call -- it would bake its result into the graph).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dyconv_repro.ops.cpu import native
from dyconv_repro.ops.engine.dispatch import traced
from dyconv_repro.ops.engine.paths import is_channels_last, is_depthwise

NATIVE_MIX_MIN = 1 << 13  # kernel entries a sample from which the native mix beats mm plus its Python call


def loaded():
    """The native module, unless a reference computation suspended it (`native.suspended()`)."""
    return None if native.is_suspended() else native.get()


def no_dispatch_mode() -> bool:
    """No TorchDispatchMode (FlopCounterMode, ...) is active: those must see the aten ops, not native calls."""
    return not torch._C._len_torch_dispatch_stack()


def native_for(function: str, *tensors: Tensor):
    """The native module if its `function` may run on these tensors here (see the module docstring)."""
    if traced():  # first: dynamo must not meet the dispatch-mode query, a tracer must not meet a native call
        return None
    kernel = loaded()
    if (kernel is None or not hasattr(kernel, function)
            or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
            or torch.is_autocast_enabled("cpu") or not no_dispatch_mode()):
        return None
    return kernel


def native_mix_ready(coeff: Tensor, bank2d: Tensor):
    """The native module if it can compute coeff @ bank2d here (`native_for`, a contiguous bank)."""
    return native_for("bank_mix_batch", coeff, bank2d) if bank2d.is_contiguous() else None


class NativeBankMix(torch.autograd.Function):
    """coeff (B, K) @ bank (K, n) by the native one-pass mix (csrc/mix.cpp).

    The bank's gradient coeff^T @ g is the same kind of skinny product -- K outputs, each a mix of the B rows
    of g -- so it runs on the same kernel where it may (`native_mix_ready` again: a FlopCounterMode or a
    suspension around backward sees aten). coeff's gradient g @ bank^T stays mm (MKL does well on it).
    Measurements: results/benchmarks/ and the commit history of this file.
    """

    @staticmethod
    def forward(ctx, coeff, bank2d, kernel):
        coeff = coeff.contiguous()
        out = coeff.new_empty(coeff.shape[0], bank2d.shape[1])
        kernel.bank_mix_batch(coeff, bank2d, out)
        ctx.save_for_backward(coeff, bank2d)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        coeff, bank2d = ctx.saved_tensors
        gcoeff = torch.mm(g, bank2d.t()) if ctx.needs_input_grad[0] else None
        gbank = None
        if ctx.needs_input_grad[1]:
            coeff_t = coeff.t().contiguous()
            kernel = native_mix_ready(coeff_t, g)
            if kernel is None:
                gbank = torch.mm(coeff_t, g)
            else:
                gbank = g.new_empty(bank2d.shape)
                kernel.bank_mix_batch(coeff_t, g, gbank)
        return gcoeff, gbank, None


def bank_mix(coeff: Tensor, bank2d: Tensor) -> Tensor | None:
    """The native mix for banks of >= NATIVE_MIX_MIN entries a kernel, else None (mm)."""
    if bank2d.shape[1] < NATIVE_MIX_MIN:
        return None
    kernel = native_mix_ready(coeff, bank2d)
    return None if kernel is None else NativeBankMix.apply(coeff, bank2d, kernel)


def bank_mix_into(coeff: Tensor, bank2d: Tensor, out: Tensor) -> bool:
    """coeff @ bank2d written into `out` by the native mix; False (nothing written) where it may not run."""
    kernel = native_mix_ready(coeff, bank2d)
    if kernel is None:
        return False
    kernel.bank_mix_batch(coeff.contiguous(), bank2d, out)
    return True


def native_depthwise_ready(x: Tensor, weight: Tensor):
    """The native module if its channels_last depthwise kernel can run this call (`native_for`, x channels_last)."""
    return native_for("depthwise_forward", x, weight) if is_channels_last(x) else None


class NativeDepthwise(torch.autograd.Function):
    """Per-sample depthwise conv by the native channels_last kernel (csrc/depthwise.cpp), with its gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, kernel):
        b, c, _, kh, kw = weight.shape
        kernels = weight.reshape(b, c, kh * kw).transpose(1, 2).contiguous()  # (B, taps, C): channels innermost
        ctx.save_for_backward(x, kernels)
        ctx.geometry, ctx.has_bias, ctx.kernel = (kh, kw, stride, padding, dilation), bias is not None, kernel
        return kernel.depthwise_forward(x, kernels, bias, kh, kw, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, kernels = ctx.saved_tensors
        kh, kw, stride, padding, dilation = ctx.geometry
        kernel = ctx.kernel
        gy = gy.contiguous(memory_format=torch.channels_last)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = kernel.depthwise_input_grad(gy, kernels, x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            gw = kernel.depthwise_kernel_grad(gy, x, kh, kw, stride, padding, dilation)
            gw = gw.transpose(1, 2).reshape(x.shape[0], x.shape[1], 1, kh, kw)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((2, 3))
        return gx, gw, gb, None, None, None, None


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                     groups: int) -> Tensor:
    """The `depthwise` path: per-sample depthwise conv of a channels_last x with weight (B, C, 1, kh, kw)."""
    if groups != x.shape[1]:
        raise ValueError(f"the depthwise path needs groups == in_channels ({x.shape[1]}), got {groups}")
    kernel = native_depthwise_ready(x, weight) if is_depthwise(x, weight, groups) else None
    if kernel is None:
        raise ValueError("the depthwise path needs a depthwise kernel (B, C, 1, kh, kw), a channels_last float32 CPU "
                         f"input and the native kernels built (`dyconv-native`; now: {native.status()})")
    return NativeDepthwise.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), kernel)
