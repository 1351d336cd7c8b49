"""`build_dataset` / `dataset_info`: the two entry points the trainer and the CLIs call.

Every registered dataset is a class with two static methods, `build(data_cfg, split, recipe_cfg)`
and `info(data_cfg)`; this module only validates the arguments and dispatches on `data_cfg.name`.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from dyconv_repro.data.registry import DATASETS
from dyconv_repro.errors import UserError

SPLITS = ("train", "val")


def build_dataset(data_cfg: Any, split: str, recipe_cfg: Any = None) -> Dataset:
    """The `split` ("train" | "val") of dataset `data_cfg.name`, yielding (CHW float tensor, int label).

    Transforms (augmentation for train, normalization for both) are included; `recipe_cfg.aug`
    configures the ImageNet augmentation. Missing data raises UserError saying where and how.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return DATASETS.get(data_cfg.get("name")).build(data_cfg, split, recipe_cfg)


def dataset_info(data_cfg: Any) -> dict:
    """dict(num_classes, image_size, mean, std) of the dataset as `build_dataset` delivers it."""
    return DATASETS.get(data_cfg.get("name")).info(data_cfg)


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[key]` for a dict or DictConfig (None-safe), `default` when absent or null."""
    if cfg is None:
        return default
    value = cfg.get(key, default)
    return default if value is None else value


def positive_int(cfg: Any, key: str, dataset: str) -> int:
    """An integer data option that must be > 0 (image sizes, class counts, dataset sizes)."""
    value = cfg_get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"data.{key} must be a positive integer for dataset {dataset!r}, got {value!r}")
    return value
