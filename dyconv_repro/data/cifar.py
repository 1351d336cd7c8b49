"""`cifar10` / `cifar100`: torchvision's CIFAR datasets with the standard augmentation.

Loading is torchvision's own (python-pickle batches under `<root>/cifar-10-batches-py` or
`<root>/cifar-100-python`, MD5-verified by torchvision); this module only turns torchvision's
generic RuntimeError into a UserError that names the folder it looked in, the files that are
missing and how to get them.
"""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets

from dyconv_repro.data.build import cfg_get
from dyconv_repro.data.registry import DATASETS
from dyconv_repro.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    cifar_transform,
)
from dyconv_repro.errors import UserError

IMAGE_SIZE = 32


def _expected_files(cls) -> list[str]:
    """The file names torchvision's class reads (its own lists, so they never drift from it)."""
    return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _load(cls, name: str, data_cfg, split: str, transform):
    root = cfg_get(data_cfg, "root")
    if root is None:
        raise UserError(f"data.root is not set for {name}; set data.root=/path/to/{name}")
    root = Path(str(root)).expanduser().resolve()
    folder = root / cls.base_folder
    download = bool(cfg_get(data_cfg, "download", False))
    how = (f"run once with data.download=true on a machine with internet, or download {cls.url} "
           f"and extract it into {root} (it unpacks to {folder.name}/)")
    if not download:
        missing = [f for f in _expected_files(cls) if not (folder / f).is_file()]
        if missing:
            where = (f"{folder} does not exist" if not folder.is_dir()
                     else f"{folder} lacks {', '.join(missing)}")
            raise UserError(f"{name} not found: {where}. To get it: {how}")
    try:
        return cls(str(root), train=split == "train", transform=transform, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (MD5 mismatch)
        raise UserError(f"{name} in {folder} failed torchvision's MD5 check ({e}); the files are "
                        f"corrupted or not the python-version archive. To fix: delete {folder} and {how}") from e
    except OSError as e:  # download without network, unwritable root, ...
        raise UserError(f"could not download {name} into {root}: {e}. Without internet, download "
                        f"{cls.url} elsewhere and extract it into {root}") from e


def _make(name: str, cls, num_classes: int, mean, std):
    class Cifar:
        @staticmethod
        def build(data_cfg, split: str, recipe_cfg=None):
            train = split == "train"
            image_size = cfg_get(data_cfg, "image_size", IMAGE_SIZE)
            if image_size != IMAGE_SIZE:
                raise UserError(f"{name} images are {IMAGE_SIZE}x{IMAGE_SIZE}; got data.image_size="
                                f"{image_size}, set data.image_size={IMAGE_SIZE}")
            if cfg_get(data_cfg, "num_classes", num_classes) != num_classes:
                raise UserError(f"{name} has {num_classes} classes but data.num_classes="
                                f"{data_cfg.get('num_classes')}; set data.num_classes={num_classes}")
            transform = cifar_transform(train, bool(cfg_get(data_cfg, "augment", True)), mean, std)
            return _load(cls, name, data_cfg, split, transform)

        @staticmethod
        def info(data_cfg) -> dict:
            return {"num_classes": num_classes, "image_size": IMAGE_SIZE, "mean": mean, "std": std}

    Cifar.__name__ = Cifar.__qualname__ = name.upper()
    Cifar.__doc__ = f"torchvision {name.upper()} (pad-4 crop + flip, {name.upper()} mean/std)."
    return Cifar


DATASETS.add("cifar10", _make("cifar10", datasets.CIFAR10, 10, CIFAR10_MEAN, CIFAR10_STD),
             help="CIFAR-10 (torchvision; data.root, data.download=false)")
DATASETS.add("cifar100", _make("cifar100", datasets.CIFAR100, 100, CIFAR100_MEAN, CIFAR100_STD),
             help="CIFAR-100 (torchvision; data.root, data.download=false)")
