"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1797 real images, no download).

The default dataset, so that `dyconv-train` with no arguments trains for real on any machine in
about a minute: the images are upsampled to `image_size` (32), replicated to 3 channels, split
once into a fixed stratified train/val split (seed 0, independent of the run seed) and normalized
with the training-set statistics. Everything is pre-computed as tensors; the only per-sample work
is the training augmentation (pad-4 random crop on the tensor, no flip: digits are not
mirror-symmetric), whose randomness comes from torch's RNG so DataLoader seeding reproduces it.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T

from dyconv_repro.data.build import cfg_get, positive_int
from dyconv_repro.data.registry import DATASETS
from dyconv_repro.errors import UserError

SPLIT_SEED = 0  # the split never depends on the run seed: every run sees the same val images
NUM_CLASSES = 10
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class TensorImageDataset(Dataset):
    """Pre-computed normalized CHW images + labels, with an optional per-sample tensor transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None, classes=None):
        self.images, self.labels, self.transform = images, labels, transform
        self.targets = labels.tolist()
        self.classes = list(classes) if classes is not None else sorted(set(self.targets))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


@lru_cache(maxsize=4)
def _prepared(image_size: int, val_fraction: float, interpolation: str):
    """(train_x, train_y, val_x, val_y, mean, std); normalized, cached across train/val builds."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0,1]
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    kw = {"align_corners": False} if interpolation != "nearest" else {}
    x = F.interpolate(x, size=(image_size, image_size), mode=interpolation, **kw).clamp_(0.0, 1.0)
    idx_train, idx_val = train_test_split(
        torch.arange(len(y)).numpy(), test_size=val_fraction, stratify=y.numpy(), random_state=SPLIT_SEED)
    idx_train, idx_val = torch.as_tensor(idx_train), torch.as_tensor(idx_val)
    mean = x[idx_train].mean().item()
    std = x[idx_train].std().item()
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()  # grey -> 3 identical channels
    return x[idx_train], y[idx_train], x[idx_val], y[idx_val], mean, std


def _options(data_cfg) -> tuple[int, float, str]:
    image_size = positive_int(data_cfg, "image_size", "digits")
    val_fraction = float(cfg_get(data_cfg, "val_fraction", 0.2))
    if not 0.0 < val_fraction < 1.0 or round(val_fraction * 1797) < NUM_CLASSES:
        raise UserError(f"data.val_fraction must be in (0, 1) with at least one val image per class, "
                        f"got {val_fraction}")
    interpolation = str(cfg_get(data_cfg, "interpolation", "bilinear"))
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown data.interpolation {interpolation!r} for digits; "
                        f"valid: {', '.join(INTERPOLATIONS)}")
    num_classes = cfg_get(data_cfg, "num_classes", NUM_CLASSES)
    if num_classes != NUM_CLASSES:
        raise UserError(f"digits has {NUM_CLASSES} classes but data.num_classes={num_classes}; "
                        f"set data.num_classes={NUM_CLASSES}")
    return image_size, val_fraction, interpolation


@DATASETS.register("digits", help="scikit-learn 8x8 handwritten digits upsampled to 32x32x3 (offline default)")
class Digits:
    """scikit-learn's handwritten digits, upsampled, fixed stratified split."""

    @staticmethod
    def build(data_cfg, split: str, recipe_cfg=None) -> TensorImageDataset:
        image_size, val_fraction, interpolation = _options(data_cfg)
        xt, yt, xv, yv, mean, std = _prepared(image_size, val_fraction, interpolation)
        if split == "val":
            return TensorImageDataset(xv, yv, classes=range(NUM_CLASSES))
        transform = None
        if cfg_get(data_cfg, "augment", True):
            # pad with the normalized value of the black background, then crop back to image_size
            transform = T.RandomCrop(image_size, padding=4, fill=-mean / std)
        return TensorImageDataset(xt, yt, transform, classes=range(NUM_CLASSES))

    @staticmethod
    def info(data_cfg) -> dict:
        image_size, val_fraction, interpolation = _options(data_cfg)
        *_, mean, std = _prepared(image_size, val_fraction, interpolation)
        return {"num_classes": NUM_CLASSES, "image_size": image_size, "mean": (mean,) * 3, "std": (std,) * 3}
