"""Old import paths of the single-module engine, kept for callers written against it (the GPU check in
../shared/gpu/). New code imports from `ops.engine` (the contract, paths, dispatch) and `ops.cpu` (the CPU
backend). Not imported by the package itself."""

from __future__ import annotations

from torch import Tensor

from dyconv_repro.ops.engine import ConvCall, DynamicConvOp, aggregate, dynamic_conv2d, gap, loop_conv2d
from dyconv_repro.ops.engine import select_path as _select


def select_path(x: Tensor, weight: Tensor, stride, padding, groups: int, dilation=(1, 1)) -> str:
    """The dispatch point's choice for per-sample kernels `weight` on x (the old signature)."""
    return _select(ConvCall.of(x, weight, stride, padding, dilation, groups))


__all__ = ["DynamicConvOp", "aggregate", "dynamic_conv2d", "gap", "loop_conv2d", "select_path"]
