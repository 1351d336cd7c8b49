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

Speed of the decomposed form (CPU): the sum-pool only adds, but it is memory-bound (about 1-2 ns per
element on this machine) while the dense conv runs at GEMM speed (about 0.03 ns per MAdd), so it pays
only where each pooled element saves enough multiplications. `decompose()` therefore keeps the
equivalent plain conv (as a one-stage nn.Sequential) when the MAdds saved per element read by the
sum-pool are below DECOMPOSE_MIN_GAIN (measured, see `decompose_gain`); `decompose(always=True)` always
returns SumPool + small conv. For NCHW or channels_last input that needs no gradient the sum-pool is one
native pass (csrc/sum_pool.cpp, when built); otherwise it is a channel box sum by cumulative sum + shifted
difference (or a running window over channels for large NCHW maps) and a spatial box sum by
separable shifted adds (NCHW) or avg_pool2d(divisor_override=1) / a depthwise ones-conv (channels_last).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from dyconv_repro.errors import UserError
from dyconv_repro.ops.base import ConvOp
from dyconv_repro.ops.registry import OPS
from dyconv_repro.ops.shared import native_for, nchw_or_channels_last

MODES = ("regularize", "parameterize")
# Decompose a layer only when (dense MAdds - decomposed MAdds) / (elements the sum-pool reads) reaches this.
# Measured per layer (1 thread, torch 2.14.1, batch 1 and 32, NCHW and channels_last; resnet20 and
# mobilenet_v2 shapes): gains <= 80 lost (1.1-3x slower: 16->16 3x3 @32^2, projections 576->160,
# 960->160, expansions 16->96, 24->144), gains ~100 tied (32->192), gains >= 150 won (0.5-0.95x:
# 32->32 and 64->64 3x3, 64->384, 96->576, 160->960, 960->320). Depthwise layers gain <= 5: never.
# Re-checked with the native sum-pool (2 threads, NCHW): gains 80-96 now win (576->160, 960->160, 32->192:
# 0.45-0.92x at batch 1 and 32; in channels_last 960->160 still loses at batch 1, 1.20x) and 16->16 3x3 @32^2
# (75) still loses at batch 32 (1.75x: its 8->16 2x2 conv is slow in oneDNN), so the threshold stays; the aten
# path, which runs without a build, needs it anyway.
DECOMPOSE_MIN_GAIN = 100.0
# NCHW channel box sum: a running window over channels (2 vectorized ops per output channel) beats
# torch.cumsum (a scalar scan) once each channel slab (batch * H * W) is this large.
_LOOP_MIN_SLAB = 32768
# channels_last spatial box sum: avg_pool2d up to this many elements, a depthwise ones-conv above
# (measured: the pool kernel wins on small maps, oneDNN's depthwise conv on large ones; for NCHW
# separable shifted adds beat both, 2-10x, at every size tried).
_POOL_MAX_NUMEL = 16384


def box_basis(size: int, hidden: int) -> torch.Tensor:
    """1-D structured basis (size x hidden): column j holds ones on rows j .. j + size - hidden."""
    a = torch.zeros(size, hidden, dtype=torch.float64)
    for j in range(hidden):
        a[j:j + size - hidden + 1, j] = 1.0
    return a


def _apply_factors(t: torch.Tensor, mats) -> torch.Tensor:
    """Multiply axis d+1 of `t` (axis 0 = output channels) by matrix mats[d] (out_d x in_d)."""
    for d, m in enumerate(mats):
        t = torch.movedim(torch.tensordot(t, m, dims=([d + 1], [1])), -1, d + 1)
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

    def _setup(self, out_features: int, full_dims, hidden_dims, mode: str, bias: bool, fan_in: int):
        if mode not in MODES:
            raise UserError(f"structured: unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
        self.mode = mode
        self.full_dims = tuple(int(d) for d in full_dims)
        self.hidden_dims = tuple(int(d) for d in hidden_dims)
        self._nfac = len(full_dims)
        for i, (n_full, n_hid) in enumerate(zip(self.full_dims, self.hidden_dims)):
            a = box_basis(n_full, n_hid)
            self.register_buffer(f"basis{i}", a.float(), persistent=False)
            self.register_buffer(f"pinv{i}", torch.linalg.pinv(a).float(), persistent=False)
        bound = 1.0 / math.sqrt(fan_in)  # nn.Conv2d / nn.Linear default init scale
        if mode == "regularize":
            w = torch.empty(out_features, *self.full_dims)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.weight = nn.Parameter(w)
        else:
            alpha = torch.randn(out_features, *self.hidden_dims)
            w = _apply_factors(alpha, self._bases())
            # scale alpha so that W = A alpha has the RMS of the dense layer's default init
            self.alpha = nn.Parameter(alpha * (bound / math.sqrt(3) / w.square().mean().sqrt().clamp_min(1e-12)))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None

    def _bases(self):
        return [getattr(self, f"basis{i}") for i in range(self._nfac)]

    def _pinvs(self):
        return [getattr(self, f"pinv{i}") for i in range(self._nfac)]

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """alpha = A^+ W (least squares), computed factor by factor."""
        return _apply_factors(weight, [p.to(weight.dtype) for p in self._pinvs()])

    def build(self, alpha: torch.Tensor) -> torch.Tensor:
        """W = A alpha."""
        return _apply_factors(alpha, [a.to(alpha.dtype) for a in self._bases()])

    def kernel(self) -> torch.Tensor:
        """The full kernel used by the training-time forward."""
        return self.weight if self.mode == "regularize" else self.build(self.alpha)

    def hidden_kernel(self) -> torch.Tensor:
        """alpha (the small kernel of the decomposed layer)."""
        return self.alpha if self.mode == "parameterize" else self.project(self.weight)

    def regularization_loss(self) -> torch.Tensor:
        """||(I - A A^+) W||_F / ||W||_F for this layer (exactly 0 in parameterize mode)."""
        if self.mode == "parameterize":
            return self.alpha.new_zeros(())
        w = self.weight
        resid = w - self.build(self.project(w))
        return resid.norm() / w.norm().clamp_min(1e-12)

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
                 groups=1, bias=False, c=None, n=None, mode="regularize"):
        ConvOp.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        cg = self.in_channels // self.groups
        hc = _resolve_hidden(c, cg, "c", max(1, cg // 2))
        n_pair = _pair(n) if n is not None else (None, None)
        hn = tuple(_resolve_hidden(nv, k, "n", max(1, k - 1)) for nv, k in zip(n_pair, self.kernel_size))
        self._setup(self.out_channels, (cg, *self.kernel_size), (hc, *hn), mode, bias,
                    fan_in=cg * self.kernel_size[0] * self.kernel_size[1])

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
    def decompose(self, always: bool = False) -> nn.Sequential:
        """SumPool (window (C-c+1) x (N-n+1)^2, stride 1) + C_out x c x n x n conv, equal to the conv.

        Where the sum-pool cannot pay for itself (`decompose_gain() < DECOMPOSE_MIN_GAIN`, e.g. depthwise,
        small or projecting layers) and not `always`, returns nn.Sequential(the equivalent plain conv).

        Padding: the original conv's zero padding p is applied to the INPUT of the spatial box sum (a box
        sum over zero-padded input); the small conv then uses padding 0. Padding the pooled map instead
        would be wrong at the border. Stride s and dilation d go to the small conv; the sum-pool runs at
        stride 1 with the same dilation d (its box is made of the dilated kernel taps).
        """
        if not always and self.decompose_gain() < DECOMPOSE_MIN_GAIN:
            return nn.Sequential(self.reparameterize())
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
    """
    n = x.shape[dim] - window + 1
    s = x.cumsum(dim)
    out = s.narrow(dim, window - 1, n).clone()
    if n > 1:
        out.narrow(dim, 1, n - 1).sub_(s.narrow(dim, 0, n - 1))
    return out


def _channel_box_running(x: torch.Tensor, window: int) -> torch.Tensor:
    """Same as channel_box_sum(x, window, 1) for NCHW-contiguous x, as a running window: out[j] =
    out[j-1] + x[j+window-1] - x[j-1], each step a vectorized op over a (batch, H, W) slab."""
    n = x.shape[1] - window + 1
    out = x.new_empty(x.shape[0], n, *x.shape[2:])
    out[:, 0] = x[:, :window].sum(1)
    for j in range(1, n):
        o = out[:, j]
        torch.add(out[:, j - 1], x[:, j + window - 1], out=o)
        o.sub_(x[:, j - 1])
    return out


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
        channels = self.groups * (self.cpg - wc + 1)
        # depthwise ones kernel for the channels_last spatial box sum on large maps
        self.register_buffer("ones", torch.ones(channels, 1, wh, ww), persistent=False)

    @staticmethod
    def _native(x: torch.Tensor):
        """The native one-pass kernel (csrc/sum_pool.cpp) for NCHW / channels_last input needing no gradient."""
        if x.requires_grad and torch.is_grad_enabled() or x.dim() != 4 or not nchw_or_channels_last(x):
            return None
        return native_for("sum_pool_forward", x)

    def _channel_box(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        wc = self.window[0]
        if self.groups > 1:  # the channel box never crosses a group: fold the groups into the batch
            x = x.reshape(b * self.groups, self.cpg, h, w)
        if x.is_contiguous() and x.shape[0] * h * w >= _LOOP_MIN_SLAB:
            y = _channel_box_running(x, wc)
        else:
            y = channel_box_sum(x, wc, 1)
        return y.reshape(b, -1, h, w) if self.groups > 1 else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wc, wh, ww = self.window
        ph, pw = self.padding
        native = self._native(x)
        if native is not None:
            return native.sum_pool_forward(x, self.groups, wc, wh, ww, self.padding, self.dilation)
        if wc > 1:
            x = self._channel_box(x)
        if wh * ww == 1:
            return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            if self.dilation == (1, 1) and 2 * ph <= wh and 2 * pw <= ww and x.numel() <= _POOL_MAX_NUMEL:
                # small channels_last maps: the vectorized pooling kernel (divisor 1 = a sum, zero padding)
                return F.avg_pool2d(x, (wh, ww), 1, (ph, pw), count_include_pad=True, divisor_override=1)
            return F.conv2d(x, self.ones.to(x.dtype), None, 1, (ph, pw), self.dilation, x.shape[1])
        # NCHW: separable shifted adds over the zero-padded map (no conv/pool setup cost, any dilation)
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        return _box_sum_shifted(_box_sum_shifted(x, -1, ww, self.dilation[1]), -2, wh, self.dilation[0])

    def extra_repr(self) -> str:
        return (f"channels_per_group={self.cpg}, groups={self.groups}, window={self.window}, "
                f"padding={self.padding}, dilation={self.dilation}")


class StructuredLinear(_Structured):
    """FC form: W (out x in) = A_C alpha with a sliding box of in-c+1 features; decomposes into a 1-D
    sum-pool over features + nn.Linear(c, out). Default c = in_features // 2."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, c=None, mode="regularize"):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        hc = _resolve_hidden(c, self.in_features, "c", max(1, self.in_features // 2))
        self._setup(self.out_features, (self.in_features,), (hc,), mode, bias, fan_in=self.in_features)

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
    def decompose(self, always: bool = False) -> nn.Sequential:
        """SumPool1d (window in-c+1) + nn.Linear(c, out); nn.Sequential(the plain nn.Linear) where the
        pool cannot pay for itself (`decompose_gain() < DECOMPOSE_MIN_GAIN`) and not `always`."""
        if not always and self.decompose_gain() < DECOMPOSE_MIN_GAIN:
            return nn.Sequential(self.reparameterize())
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


class SumPool1d(nn.Module):
    """Stride-1 sliding-window sum over the last dimension (features)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = int(window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_box_sum(x, self.window, -1) if self.window > 1 else x

    def extra_repr(self) -> str:
        return f"window={self.window}"
