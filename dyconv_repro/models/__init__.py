"""Backbones (BACKBONES registry), conv surgery under replacement policies, and model building.

Builder modules register themselves in BACKBONES on import. Modules written elsewhere in the
project are skipped only when the module itself does not exist yet (a partial checkout).
"""

from __future__ import annotations

import importlib

from dyconv_repro.models.registry import BACKBONES

_BUILDER_MODULES = ("cifar_resnet", "torchvision_models", "timm_models")
_OPTIONAL_MODULES = ("dynet_nets", "shufflenet_weightnet", "mobilenet_v1")
for _m in _BUILDER_MODULES:
    importlib.import_module(f"dyconv_repro.models.{_m}")
for _m in _OPTIONAL_MODULES:
    try:
        importlib.import_module(f"dyconv_repro.models.{_m}")
    except ModuleNotFoundError as e:  # pragma: no cover - only while the library is being written
        if e.name != f"dyconv_repro.models.{_m}":
            raise

from dyconv_repro.models.build import build_backbone, build_model  # noqa: E402
from dyconv_repro.models.surgery import print_layer_table, swap_convs  # noqa: E402

__all__ = ["BACKBONES", "build_backbone", "build_model", "print_layer_table", "swap_convs"]
