"""Global average pooling for the routing heads, with a backward that does not write a full-size tensor.

Every input-dependent op pools its input to (B, C) for routing. Autograd's MeanBackward writes the expanded
gradient and then spends another full pass summing it into x's gradient; `gap` returns a stride-0 view instead,
and `pool_tee` lets the routing's (B, C) gradient be added into the conv's gradient of x in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dyconv_repro.ops.engine.paths import nchw_or_channels_last


def _pooled_grad(g: Tensor, shape) -> Tensor:
    """The (B, C, 1, 1) gradient of x for GAP's (B, C) output gradient `g` (broadcasts over H, W)."""
    b, c, h, w = shape
    return (g / (h * w)).reshape(b, c, 1, 1)


class _GlobalAvgPool(torch.autograd.Function):
    """x.mean((2, 3)) whose backward returns a stride-0 *view* of grad / (H*W)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, g):
        return _pooled_grad(g, ctx.shape).expand(ctx.shape)


def _dense(t: Tensor) -> bool:
    return t.dim() == 4 and not t.requires_grad and 0 not in t.stride() and nchw_or_channels_last(t)


class _PoolTee(torch.autograd.Function):
    """(an alias of x, GAP(x)): the alias feeds the conv, the pooled (B, C) the routing.

    With plain `gap`, x has two gradients (conv and routing) that autograd sums into a fresh full-size tensor.
    Here the routing's (B, C) gradient is broadcast-added into the conv's gradient for x in place (when that
    gradient is a dense tensor and no graph is being built; otherwise out of place).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.view_as(x), x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, g_x, g_pooled):
        if g_pooled is None:
            return g_x
        spread = _pooled_grad(g_pooled, ctx.shape)
        if g_x is None:
            return spread.expand(ctx.shape)
        if not torch.is_grad_enabled() and _dense(g_x):
            return g_x.add_(spread)
        return g_x + spread


def pool_tee(x: Tensor) -> Tensor:
    """x as an alias that carries GAP(x) (read back by `gap`), so the two gradients of x meet in place."""
    alias, pooled = _PoolTee.apply(x)
    alias._dyconv_pooled = pooled
    return alias


def gap(x: Tensor) -> Tensor:
    """Global average pooling to (B, C); memory-format agnostic; cheap backward. On an alias made by
    `pool_tee` it returns the pooled vector computed there."""
    pooled = getattr(x, "_dyconv_pooled", None)
    if pooled is not None:
        return pooled
    if torch.is_grad_enabled() and x.requires_grad:
        return _GlobalAvgPool.apply(x)
    return x.mean(dim=(2, 3))
