"""`fake`: torchvision FakeData (random images, random labels) for tests and smoke runs.

Deterministic per split: FakeData seeds each image from its index, and the val split starts its
indices after the train split's so the two never share an image.
"""

from __future__ import annotations

from torchvision.datasets import FakeData

from dyconv_repro.data.build import positive_int
from dyconv_repro.data.registry import DATASETS
from dyconv_repro.data.transforms import FAKE_MEAN, FAKE_STD, plain_transform


@DATASETS.register("fake", help="torchvision FakeData: random images for tests and smoke runs")
class Fake:
    """torchvision FakeData with train_size / val_size images."""

    @staticmethod
    def build(data_cfg, split: str, recipe_cfg=None) -> FakeData:
        size = positive_int(data_cfg, f"{split}_size", "fake")
        image_size = positive_int(data_cfg, "image_size", "fake")
        offset = 0 if split == "train" else positive_int(data_cfg, "train_size", "fake")
        return FakeData(size=size, image_size=(3, image_size, image_size),
                        num_classes=positive_int(data_cfg, "num_classes", "fake"),
                        transform=plain_transform(FAKE_MEAN, FAKE_STD), random_offset=offset)

    @staticmethod
    def info(data_cfg) -> dict:
        return {"num_classes": positive_int(data_cfg, "num_classes", "fake"),
                "image_size": positive_int(data_cfg, "image_size", "fake"),
                "mean": FAKE_MEAN, "std": FAKE_STD}
