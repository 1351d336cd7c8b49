"""The device-agnostic ways to convolve sample i of x with its own kernel weight[i].

Every path takes x (B, C_in, H, W), weight (B, C_out, C_in/g, kh, kw) and bias (B, C_out) or None and returns
the same values; `loop_conv2d` is the reference the tests compare the others with. Which one runs is decided in
one place, `dispatch.select_path`.

* ``fold``  : the batch folded into conv groups, x -> (1, B*C_in, H, W), groups = B*g: one grouped conv for any
              geometry (DY-Conv's and CondConv's official code do the same). At batch 1 it is the plain conv
              with the aggregated kernel.
* ``matmul``: a 1x1, zero-padding, one-group kernel as a batched matmul (stride = subsampling first); keeps
              channels_last inputs channels_last.
* ``loop``  : one plain conv per sample.
* ``export``: patches (unfold, written as a one-hot conv) + batched matmul, depthwise kernels as shifted
              multiply-adds, with the batch the only free dimension (no batch-dependent group count, no
              per-sample Python loop, no layout branch): the one path a tracer or exporter sees
              (`dispatch.exporting()`), so that an ONNX / torch.export file takes any batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def is_channels_last(x: Tensor) -> bool:
    """4-D and laid out channels_last (and not also plain contiguous, as a 1x1 map is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def nchw_or_channels_last(x: Tensor) -> bool:
    """x is dense in one of the two layouts convs read (no strided view)."""
    return x.is_contiguous() or is_channels_last(x)


def is_pointwise(kernel_size, padding, groups: int) -> bool:
    """1x1, no padding, one group: the per-sample conv is a (batched) matmul at every batch size."""
    return tuple(kernel_size) == (1, 1) and tuple(padding) == (0, 0) and groups == 1


def is_depthwise(x: Tensor, weight: Tensor, groups: int) -> bool:
    """One input channel per group, one output channel per input channel (no channel multiplier)."""
    return groups > 1 and groups == x.shape[1] == weight.shape[1] and weight.shape[2] == 1


def fold_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """Per-sample kernels as one grouped conv with the batch folded into the groups."""
    b, c_in, h, w = x.shape
    c_out = weight.shape[1]
    y = F.conv2d(x.reshape(1, b * c_in, h, w), weight.reshape(b * c_out, *weight.shape[2:]),
                 None if bias is None else bias.reshape(-1), stride, padding, dilation, b * groups)
    return y.reshape(b, c_out, y.shape[-2], y.shape[-1])


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense.

    `y.sum().backward()` (and similar) hands back a stride-0 expanded gradient, which sends bmm to a per-batch
    copy loop; a conv makes its gradient contiguous itself, bmm does not.
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
    if is_channels_last(x):
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


def matmul_path(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """`matmul_conv1x1` with the common path signature (and its geometry check)."""
    if weight.shape[-2:] != (1, 1) or tuple(padding) != (0, 0) or groups != 1:
        raise ValueError("the matmul path needs a 1x1 kernel, zero padding and groups=1")
    return matmul_conv1x1(x, weight, bias, stride)


def loop_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """One plain conv per sample: the reference (and, on CPU, a fast path for big per-sample convs)."""
    biases = [None] * x.shape[0] if bias is None else bias.unbind(0)
    outs = [F.conv2d(xi.unsqueeze(0), wi, bi, stride, padding, dilation, groups)
            for xi, wi, bi in zip(x.unbind(0), weight.unbind(0), biases)]
    return torch.cat(outs, 0)


def patches(x: Tensor, channels: int, kh: int, kw: int, stride, padding, dilation) -> Tensor:
    """F.unfold(x) (B, C*kh*kw, L) as a conv with one one-hot kernel per tap (groups = C): one Conv node in an
    exported graph, where unfold becomes Gather-based index arithmetic that onnxruntime runs far slower."""
    taps = kh * kw
    eye = torch.eye(taps, dtype=x.dtype, device=x.device).reshape(taps, 1, kh, kw).repeat(channels, 1, 1, 1)
    return F.conv2d(x, eye, None, stride, padding, dilation, channels).flatten(2)


def depthwise_taps(x: Tensor, weight: Tensor, kh: int, kw: int, h_out, w_out, stride, padding, dilation) -> Tensor:
    """Per-sample depthwise conv as sum_t weight[:, :, t] * (x shifted by tap t): strided slices, multiplies and
    adds (no kh*kw-fold patch tensor). weight (B, C, kh*kw)."""
    (sh, sw), (ph, pw), (dh, dw) = tuple(stride), tuple(padding), tuple(dilation)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    y = None
    for i in range(kh):
        for j in range(kw):
            tap = x[:, :, i * dh:i * dh + sh * (h_out - 1) + 1:sh, j * dw:j * dw + sw * (w_out - 1) + 1:sw]
            term = tap * weight[:, :, i * kw + j].unsqueeze(-1).unsqueeze(-1)
            y = term if y is None else y + term
    return y


def export_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
                  kernel_shape=None) -> Tensor:
    """Per-sample kernels as patches (unfold) + batched matmul: only the batch is left symbolic.

    The fold puts the batch into the conv's group count and the loop unrolls it, so neither gives an exported
    graph that accepts another batch size; here the batch appears only as the leading (-1) dimension of
    reshapes. `kernel_shape` (C_out, C_in/g, kh, kw) as Python ints (the op's) keeps the kernel size a constant
    of the graph where a tracer would otherwise record it as the size of a computed tensor (the legacy ONNX
    exporter refuses a non-constant unfold kernel).
    """
    c_out, cin_g, kh, kw = tuple(kernel_shape) if kernel_shape is not None else weight.shape[1:]
    h, w = x.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = tuple(stride), tuple(padding), tuple(dilation)
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps, cout_g = cin_g * kh * kw, c_out // groups
    if cout_g == 1 and cin_g == 1:  # depthwise: a per-sample, per-channel weighted sum of the shifted maps
        y = depthwise_taps(x, weight.reshape(-1, c_out, kh * kw), kh, kw, h_out, w_out, stride, padding, dilation)
        return y if bias is None else y + bias.reshape(-1, c_out, 1, 1)
    if (kh, kw, ph, pw) == (1, 1, 0, 0):  # 1x1: the (subsampled) map is already the column matrix
        cols = (x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x).flatten(2)
    else:
        cols = patches(x, cin_g * groups, kh, kw, stride, padding, dilation)
    cols = cols.unflatten(1, (groups, taps))  # (B, g, taps, L)
    y = torch.matmul(weight.reshape(-1, groups, cout_g, taps), cols).reshape(-1, c_out, h_out, w_out)
    return y if bias is None else y + bias.reshape(-1, c_out, 1, 1)


# name -> implementation; backends add their own (e.g. the CPU backend's native depthwise kernel)
PATHS = {"fold": fold_conv2d, "matmul": matmul_path, "loop": loop_conv2d, "export": export_conv2d}
