"""Normalization constants and the small transform pipelines shared by the datasets.

Kept in one place so a model, a deploy check or a visualisation can undo the exact normalization a
dataset applied (see `dataset_info`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

# Per-channel statistics of the training sets (values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# FakeData images are torch.randn converted to uint8 (so mostly 0 and 255): no meaningful statistics.
FAKE_MEAN = (0.5, 0.5, 0.5)
FAKE_STD = (0.5, 0.5, 0.5)


def cifar_transform(train: bool, augment: bool, mean: Sequence[float], std: Sequence[float],
                    image_size: int = 32) -> T.Compose:
    """PIL -> normalized tensor; training adds the standard pad-4 random crop + horizontal flip."""
    ops: list = []
    if train and augment:
        ops += [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()]
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def plain_transform(mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL -> normalized tensor, no augmentation."""
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
