"""`structured`: Structured Convolutions (Bhalgat et al., arXiv 2008.02454).

A C x N x N kernel (C = in_channels / groups) is *structured* with hidden size c x n x n when it is a sum
of the M = c*n*n binary basis tensors that hold a (C-c+1) x (N-n+1) x (N-n+1) block of ones at every
shift: W = A alpha. Then conv(X, W) = conv(SumPool3d(X), alpha) -- a stride-1 sum-pool shared by all
output channels followed by a C_out x c x n x n conv.

The basis is separable: A = A_C (x) A_H (x) A_W with 1-D "sliding box" bases A_N (N x n, column j =
ones on rows j..j+N-n). Hence A^+ = A_C^+ (x) A_H^+ (x) A_W^+ and both W = A alpha and the projection
A A^+ W are three small matrix products per layer -- exact and cheap; the tiny pinvs are precomputed
as non-persistent buffers (the state_dict stays that of a conv).

Two training modes:
- "parameterize": the parameter is `alpha` (C_out x c x n x n), the kernel is built as A alpha.
- "regularize":   the parameter is a free `weight` (state_dict-compatible with nn.Conv2d);
  `regularization_loss()` = ||(I - A A^+) W||_F / ||W||_F pulls it towards the structured subspace,
  and deployment uses alpha = A^+ W (so the deployed layer differs from the trained one by exactly
  the residual that the loss measures).

Math transforms stay exact: `decompose()` always returns SumPool + small conv and `reparameterize()` the plain
conv; which form pays on a given machine is the deploy tool's choice (`dyconv-deploy decompose=auto`). How the
SumPool runs is the engine's (`dispatch.sum_pool`: the CPU backend has a native one-pass kernel; the
device-agnostic form is a channel box sum by cumulative sum + shifted difference and a spatial box sum by
separable shifted adds). The basis products run in fp32 with autocast off: the structural residual is
meaningless in bf16, and mixed-dtype tensordots fail under autocast.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from dyconv_repro.errors import UserError
from dyconv_repro.ops.base import ConvOp
from dyconv_repro.ops.engine import dispatch
from dyconv_repro.ops.layers import draw_like_, kernel_std
from dyconv_repro.ops.registry import OPS

MODES = ("regularize", "parameterize")


def box_basis(size: int, hidden: int) -> torch.Tensor:
    """1-D structured basis (size x hidden): column j holds ones on rows j .. j + size - hidden."""
    a = torch.zeros(size, hidden, dtype=torch.float64)
    for j in range(hidden):
        a[j:j + size - hidden + 1, j] = 1.0
    return a


def _apply_factors(t: torch.Tensor, mats) -> torch.Tensor:
    """Multiply axis d+1 of `t` (axis 0 = output channels) by matrix mats[d] (out_d x in_d), autocast off."""
    device_type = t.device.type
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        for d, m in enumerate(mats):
            t = torch.movedim(torch.tensordot(t, m.to(t.dtype), dims=([d + 1], [1])), -1, d + 1)
    return t


def _resolve_hidden(value, full: int, name: str, default: int) -> int:
    if value is None:
        h = default
    elif isinstance(value, float) and 0 < value <= 1:  # a fraction of the full size
        h = max(1, round(full * value))
    else:
        h = int(value)
    if not 1 <= h <= full:
        raise UserError(f"structured: hidden size {name}={value!r} must be in 1..{full} (or a float "
                        f"fraction in (0, 1]) for a layer of size {full}")
    return h


class _Structured(nn.Module):
    """Shared logic: basis buffers, kernel <-> alpha, the structural regularization loss.

    Subclasses call `_setup(out_features, full_dims, hidden_dims, mode, bias, fan_in)`.
    """

    def _setup(self, out_features: int, full_dims, hidden_dims, mode: str, bias: bool, fan_in: int,
               device=None, dtype=None):
        if mode not in MODES:
            raise UserError(f"structured: unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
        self.mode = mode
        self.full_dims = tuple(int(d) for d in full_dims)
        self.hidden_dims = tuple(int(d) for d in hidden_dims)
        self._nfac = len(full_dims)
        for i, (n_full, n_hid) in enumerate(zip(self.full_dims, self.hidden_dims)):
            a = box_basis(n_full, n_hid)  # exact in float64 on CPU, then stored in the layer's dtype
            self.register_buffer(f"basis{i}", a.to(device=device, dtype=dtype or torch.float32), persistent=False)
            self.register_buffer(f"pinv{i}", torch.linalg.pinv(a).to(device=device, dtype=dtype or torch.float32),
                                 persistent=False)
        bound = 1.0 / math.sqrt(fan_in)  # nn.Conv2d / nn.Linear default init scale
        dd = dict(device=device, dtype=dtype)
        if mode == "regularize":
            w = torch.empty(out_features, *self.full_dims, **dd)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.weight = nn.Parameter(w)
        else:
            alpha = torch.randn(out_features, *self.hidden_dims, **dd)
            w = _apply_factors(alpha, self._bases())
            # scale alpha so that W = A alpha has the RMS of the dense layer's default init
            self.alpha = nn.Parameter(alpha * (bound / math.sqrt(3) / w.square().mean().sqrt().clamp_min(1e-12)))
        self.bias = nn.Parameter(torch.empty(out_features, **dd).uniform_(-bound, bound)) if bias else None

    def _bases(self):
        return [getattr(self, f"basis{i}") for i in range(self._nfac)]

    def _pinvs(self):
        return [getattr(self, f"pinv{i}") for i in range(self._nfac)]

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """alpha = A^+ W (least squares), computed factor by factor."""
        return _apply_factors(weight, self._pinvs())

    def build(self, alpha: torch.Tensor) -> torch.Tensor:
        """W = A alpha."""
        return _apply_factors(alpha, self._bases())

    def kernel(self) -> torch.Tensor:
        """The full kernel used by the training-time forward."""
        return self.weight if self.mode == "regularize" else self.build(self.alpha)

    def hidden_kernel(self) -> torch.Tensor:
        """alpha (the small kernel of the decomposed layer)."""
        return self.alpha if self.mode == "parameterize" else self.project(self.weight)

    def regularization_loss(self) -> torch.Tensor:
        """||(I - A A^+) W||_F / ||W||_F for this layer, in fp32 at least (exactly 0 in parameterize mode)."""
        if self.mode == "parameterize":
            return self.alpha.new_zeros((), dtype=torch.promote_types(self.alpha.dtype, torch.float32))
        w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        resid = w - self.build(self.project(w))
        return resid.norm() / w.norm().clamp_min(1e-12)

    @torch.no_grad()
    def init_like(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Surgery: draw the kernel (parameterize: alpha scaled so W = A alpha) at the replaced layer's scale."""
        std = kernel_std(weight)
        if self.mode == "regularize":
            self.weight.normal_(0.0, std)
        else:
            self.alpha.normal_()
            rms = self.build(self.alpha).square().mean().sqrt().clamp_min(1e-12)
            self.alpha.mul_(std / rms)
        if self.bias is not None:
            if bias is None:
                self.bias.zero_()
            else:
                draw_like_(self.bias, bias)

    @torch.no_grad()
    def load_static_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Initialize from a plain layer's kernel (projected onto the structure in parameterize mode)."""
        target = self.weight if self.mode == "regularize" else self.alpha
        if weight.shape != (target.shape[0], *self.full_dims):
            raise UserError(f"structured: load_static_weight got a kernel of shape {tuple(weight.shape)}, "
                            f"expected {(target.shape[0], *self.full_dims)}")
        w = weight.to(target)
        target.copy_(w if self.mode == "regularize" else self.project(w))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)


@OPS.register("structured", help="Structured Convolutions: kernel = A alpha (parameterize) or regularized towards it")
class StructuredConv2d(_Structured, ConvOp):
    """Structured conv with hidden size (c, n); `decompose()` -> SumPool + small conv, `reparameterize()`
    -> plain nn.Conv2d.

    Defaults: c = C // 2 for pointwise/dense (C = in_channels / groups; c = 1 for depthwise), n = k - 1
    (at least 1). `c` may be a float in (0, 1] (fraction of C). `n` may be an int or a pair.
    Grouped/depthwise convs are structured per group (the channel box never crosses a group).
    """


    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1,
                 groups=1, bias=False, c=None, n=None, mode="regularize", *, device=None, dtype=None):
        ConvOp.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        cg = self.in_channels // self.groups
        hc = _resolve_hidden(c, cg, "c", max(1, cg // 2))
        n_pair = _pair(n) if n is not None else (None, None)
        hn = tuple(_resolve_hidden(nv, k, "n", max(1, k - 1)) for nv, k in zip(n_pair, self.kernel_size))
        self._setup(self.out_channels, (cg, *self.kernel_size), (hc, *hn), mode, bias,
                    fan_in=cg * self.kernel_size[0] * self.kernel_size[1], device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        """The equivalent plain conv with W = A alpha (alpha = A^+ W in regularize mode)."""
        alpha = self.hidden_kernel()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None,
                         device=alpha.device, dtype=alpha.dtype)
        conv.weight.copy_(self.build(alpha))
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def decompose_gain(self) -> float:
        """MAdds the decomposition saves per element its sum-pool reads (inf when there is no pool)."""
        cg, kh, kw = self.full_dims
        hc, nh, nw = self.hidden_dims
        saved = self.out_channels * (cg * kh * kw - hc * nh * nw) / (self.stride[0] * self.stride[1])
        pooled = (self.in_channels if cg > hc else 0) + (self.groups * hc if kh * kw > nh * nw else 0)
        return math.inf if pooled == 0 else saved / pooled

    @torch.no_grad()
    def decompose(self) -> nn.Sequential:
        """SumPool (window (C-c+1) x (N-n+1)^2, stride 1) + C_out x c x n x n conv, equal to the conv.

        Padding: the original conv's zero padding p is applied to the INPUT of the spatial box sum (a box
        sum over zero-padded input); the small conv then uses padding 0. Padding the pooled map instead
        would be wrong at the border. Stride s and dilation d go to the small conv; the sum-pool runs at
        stride 1 with the same dilation d (its box is made of the dilated kernel taps).
        """
        alpha = self.hidden_kernel()
        cg, kh, kw = self.full_dims
        hc, nh, nw = self.hidden_dims
        pool = SumPool(cg, self.groups, (cg - hc + 1, kh - nh + 1, kw - nw + 1), self.padding, self.dilation)
        conv = nn.Conv2d(self.groups * hc, self.out_channels, (nh, nw), self.stride, 0, self.dilation,
                         self.groups, bias=self.bias is not None, device=alpha.device, dtype=alpha.dtype)
        conv.weight.copy_(alpha)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return nn.Sequential(pool.to(device=alpha.device, dtype=alpha.dtype), conv)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", hidden={self.hidden_dims}, mode={self.mode!r}"


def box_sum_channels(x: torch.Tensor, groups: int, cpg: int, window: int) -> torch.Tensor:
    """Sliding sums of `window` consecutive channels inside each group, (B, groups*cpg, H, W) ->
    (B, groups*(cpg-window+1), H, W), as a cumulative sum and one shifted difference: O(C) per pixel.
    (avg_pool3d with a channel window of ~C/2 costs O(C^2) and made decomposed models 6-20x slower
    than the dense conv; the cumsum's fp32 rounding stays within a few ulps of the box sum.)"""
    b, _, h, w = x.shape
    cs = x.reshape(b, groups, cpg, h, w).cumsum(2)
    head = cs[:, :, window - 1:]
    out = head - F.pad(cs[:, :, :cpg - window], (0, 0, 0, 0, 1, 0))
    return out.reshape(b, -1, h, w)


def channel_box_sum(x: torch.Tensor, window: int, dim: int = 1) -> torch.Tensor:
    """Stride-1 box sum of `window` consecutive entries along `dim` (size C -> C - window + 1).

    Cumulative sum + shifted difference: one scan and one subtraction, whatever the window (a pooling
    kernel would cost window additions per output). In fp32 the difference of prefix sums adds an error
    of ~eps * |prefix|, far inside fp32 test tolerances for the channel counts of real layers.
    Written out of place (the first prefix, then the shifted differences, concatenated): an in-place
    subtraction into a view of the result is what the legacy ONNX exporter records wrongly.
    """
    n = x.shape[dim] - window + 1
    s = x.cumsum(dim)
    if n == 1:
        return s.narrow(dim, window - 1, 1)
    return torch.cat([s.narrow(dim, window - 1, 1), s.narrow(dim, window, n - 1) - s.narrow(dim, 0, n - 1)], dim)


def _box_sum_shifted(x: torch.Tensor, dim: int, window: int, dilation: int) -> torch.Tensor:
    """Stride-1 box sum of `window` taps `dilation` apart along `dim`, as window - 1 shifted adds."""
    if window == 1:
        return x
    n = x.shape[dim] - dilation * (window - 1)
    y = x.narrow(dim, 0, n) + x.narrow(dim, dilation, n)
    for i in range(2, window):
        y += x.narrow(dim, i * dilation, n)
    return y


class SumPool(nn.Module):
    """Stride-1 3-D sum-pooling over (channels within a group, H, W) after zero-padding H, W.

    Input (B, groups*C, H, W) -> (B, groups*c, H', W') with c = C - window[0] + 1. Done separably: the
    channel box sum first (it commutes with the zero padding and shrinks C to c), then the spatial box
    sum on the c channels, zero padding included.
    """

    def __init__(self, channels_per_group: int, groups: int, window, padding=(0, 0), dilation=(1, 1)):
        super().__init__()
        self.cpg, self.groups = int(channels_per_group), int(groups)
        self.window = tuple(int(w) for w in window)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        wc, wh, ww = self.window
        if not 1 <= wc <= self.cpg:
            raise UserError(f"SumPool: channel window {wc} must be in 1..{self.cpg}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.sum_pool(self, x)

    def box_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The device-agnostic sum-pool (the reference of the backends' versions)."""
        b, _, h, w = x.shape
        wc = self.window[0]
        if wc > 1:  # the channel box never crosses a group: fold the groups into the batch
            y = channel_box_sum(x.reshape(b * self.groups, self.cpg, h, w) if self.groups > 1 else x, wc, 1)
            x = y.reshape(b, -1, h, w) if self.groups > 1 else y
        return self.spatial_box_sum(x)

    def spatial_box_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial box sum over the zero-padded map, as separable shifted adds (any dilation, any layout)."""
        _, wh, ww = self.window
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        return _box_sum_shifted(_box_sum_shifted(x, -1, ww, self.dilation[1]), -2, wh, self.dilation[0])

    def extra_repr(self) -> str:
        return (f"channels_per_group={self.cpg}, groups={self.groups}, window={self.window}, "
                f"padding={self.padding}, dilation={self.dilation}")


class StructuredLinear(_Structured):
    """FC form: W (out x in) = A_C alpha with a sliding box of in-c+1 features; decomposes into a 1-D
    sum-pool over features + nn.Linear(c, out). Default c = in_features // 2."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, c=None, mode="regularize", *,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        hc = _resolve_hidden(c, self.in_features, "c", max(1, self.in_features // 2))
        self._setup(self.out_features, (self.in_features,), (hc,), mode, bias, fan_in=self.in_features,
                    device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kernel(), self.bias)

    @torch.no_grad()
    def reparameterize(self) -> nn.Linear:
        alpha = self.hidden_kernel()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=alpha.device, dtype=alpha.dtype)
        lin.weight.copy_(self.build(alpha))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def decompose_gain(self) -> float:
        """MAdds the decomposition saves per feature its sum-pool reads (inf when there is no pool)."""
        saved = self.out_features * (self.in_features - self.hidden_dims[0])
        return math.inf if saved == 0 else saved / self.in_features

    @torch.no_grad()
    def decompose(self) -> nn.Sequential:
        """SumPool1d (window in-c+1) + nn.Linear(c, out), equal to the layer."""
        alpha = self.hidden_kernel()
        lin = nn.Linear(self.hidden_dims[0], self.out_features, bias=self.bias is not None,
                        device=alpha.device, dtype=alpha.dtype)
        lin.weight.copy_(alpha)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return nn.Sequential(SumPool1d(self.in_features - self.hidden_dims[0] + 1), lin)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"hidden={self.hidden_dims[0]}, mode={self.mode!r}, bias={self.bias is not None}")


StructuredConv2d.linear_form = StructuredLinear  # the classifier form (policies that replace it)


class SumPool1d(nn.Module):
    """Stride-1 sliding-window sum over the last dimension (features)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = int(window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_box_sum(x, self.window, -1) if self.window > 1 else x

    def extra_repr(self) -> str:
        return f"window={self.window}"
