"""Operator library: each operator is a drop-in for the nn.Conv2d it replaces.

`build_op(name, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
bias=False, **kwargs)` builds one; `OPS` is the registry (`dyconv-list ops`).

Layout (README "Architecture"): one file per operator holding the paper's math (it registers itself in `OPS`
on import; every module of this package is imported, so a new operator is one new file), `engine/` that runs
the per-sample kernels and holds the one dispatch point, and `cpu/`, the opt-in CPU backend, imported last
(skipped when the package is absent or DYCONV_CPU_BACKEND=0).
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from torch import nn

from dyconv_repro.ops.base import ConvOp, resolve_padding
from dyconv_repro.ops.registry import OPS

BACKEND_PACKAGES = ("cpu",)
OLD_IMPORT_PATHS = ("shared", "native")  # aliases for old callers; importing them would load the CPU backend


def _import_operator_modules() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in BACKEND_PACKAGES + OLD_IMPORT_PATHS:
            importlib.import_module(f"{__name__}.{info.name}")


def cpu_backend_enabled() -> bool:
    return os.environ.get("DYCONV_CPU_BACKEND", "1").strip().lower() not in ("0", "false", "off", "no")


def _import_backends() -> None:
    if not cpu_backend_enabled():
        return
    try:
        importlib.import_module(f"{__name__}.cpu")
    except ModuleNotFoundError as e:  # the backend package removed: the library runs without it
        if e.name != f"{__name__}.cpu":
            raise


_import_operator_modules()
_import_backends()


def build_op(name: str, in_channels: int, out_channels: int, kernel_size, stride=1, padding=None,
             dilation=1, groups=1, bias=False, **kwargs) -> nn.Module:
    """Build operator `name` with nn.Conv2d's signature plus the operator's own kwargs (device/dtype too)."""
    cls = OPS.get(name)
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
               groups=groups, bias=bias, **kwargs)


__all__ = ["OPS", "build_op", "ConvOp", "resolve_padding"]
