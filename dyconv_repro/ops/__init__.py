"""Operator library: each operator is a drop-in for the nn.Conv2d it replaces.

`build_op(name, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1,
groups=1, bias=False, **kwargs)` builds one; `OPS` is the registry (`dyconv-list ops`).
"""

from __future__ import annotations

import importlib

from torch import nn

from dyconv_repro.ops.base import ConvOp, resolve_padding
from dyconv_repro.ops.registry import OPS

# One module per operator; each registers itself in OPS on import. A module that does not exist
# yet is skipped so that a partial checkout still imports.
_OP_MODULES = ("conv", "condconv", "dynamicconv", "dynet", "weightnet", "mixconv", "structured", "refconv", "se")
for _m in _OP_MODULES:
    try:
        importlib.import_module(f"dyconv_repro.ops.{_m}")
    except ModuleNotFoundError as e:  # pragma: no cover - only while the library is being written
        if e.name != f"dyconv_repro.ops.{_m}":
            raise


def build_op(name: str, in_channels: int, out_channels: int, kernel_size, stride=1, padding=None,
             dilation=1, groups=1, bias=False, **kwargs) -> nn.Module:
    """Build operator `name` with nn.Conv2d's signature plus the operator's own kwargs."""
    cls = OPS.get(name)
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
               groups=groups, bias=bias, **kwargs)


__all__ = ["OPS", "build_op", "ConvOp", "resolve_padding"]
