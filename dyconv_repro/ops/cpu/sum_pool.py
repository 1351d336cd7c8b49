"""The structured SumPool on CPU: the native one-pass kernel, else the aten variants measured fastest here.

For NCHW or channels_last input that needs no gradient the sum-pool is one native pass (csrc/sum_pool.cpp,
when built; at batch 1 the aten version is ~11 tiny calls that cost more than the small conv after it).
Otherwise, as measured on the project's CPU (results/benchmarks/cpu_*.md, `[decomposed]` rows):
- the channel box sum of a large NCHW map as a running window over channels (2 vectorized ops an output
  channel) once each channel slab (batch * H * W) has >= RUNNING_MIN_SLAB elements -- torch.cumsum is a
  scalar scan on CPU;
- the spatial box sum of channels_last maps as avg_pool2d(divisor_override=1) up to POOL_MAX_NUMEL elements and
  a depthwise ones-conv above (for NCHW the separable shifted adds of the device-agnostic path beat both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dyconv_repro.ops.cpu.kernels import native_for
from dyconv_repro.ops.engine.paths import nchw_or_channels_last
from dyconv_repro.ops.structured import SumPool, channel_box_sum

RUNNING_MIN_SLAB = 32768
POOL_MAX_NUMEL = 16384


def native(x: Tensor):
    """The native kernel for NCHW / channels_last input needing no gradient, or None."""
    if x.requires_grad and torch.is_grad_enabled() or x.dim() != 4 or not nchw_or_channels_last(x):
        return None
    return native_for("sum_pool_forward", x)


def channel_box_running(x: Tensor, window: int) -> Tensor:
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


def _channel_box(pool: SumPool, x: Tensor) -> Tensor:
    b, _, h, w = x.shape
    wc = pool.window[0]
    if pool.groups > 1:  # the channel box never crosses a group: fold the groups into the batch
        x = x.reshape(b * pool.groups, pool.cpg, h, w)
    if x.is_contiguous() and x.shape[0] * h * w >= RUNNING_MIN_SLAB:
        y = channel_box_running(x, wc)
    else:
        y = channel_box_sum(x, wc, 1)
    return y.reshape(b, -1, h, w) if pool.groups > 1 else y


def sum_pool(pool: SumPool, x: Tensor) -> Tensor:
    """SumPool.forward on CPU (see the module docstring)."""
    wc, wh, ww = pool.window
    kernel = native(x)
    if kernel is not None:
        return kernel.sum_pool_forward(x, pool.groups, wc, wh, ww, pool.padding, pool.dilation)
    if wc > 1:
        x = _channel_box(pool, x)
    ph, pw = pool.padding
    if wh * ww > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        if pool.dilation == (1, 1) and 2 * ph <= wh and 2 * pw <= ww and x.numel() <= POOL_MAX_NUMEL:
            # small channels_last maps: the vectorized pooling kernel (divisor 1 = a sum, zero padding)
            return F.avg_pool2d(x, (wh, ww), 1, (ph, pw), count_include_pad=True, divisor_override=1)
        return F.conv2d(x, x.new_ones(x.shape[1], 1, wh, ww), None, 1, (ph, pw), pool.dilation, x.shape[1])
    return pool.spatial_box_sum(x)
