"""Datasets: `build_dataset(data_cfg, split, recipe_cfg)` -> (normalized CHW tensor, int label).

`DATASETS` is the registry (`dyconv-list`); each module below registers its datasets on import:
digits (offline default), fake, cifar10, cifar100, imagenet. The trainer builds the DataLoaders.
"""

from dyconv_repro.data import cifar, digits, fake, imagenet  # noqa: F401  (register the datasets)
from dyconv_repro.data.build import SPLITS, build_dataset, dataset_info
from dyconv_repro.data.registry import DATASETS

__all__ = ["DATASETS", "SPLITS", "build_dataset", "dataset_info"]
