"""`imagenet`: any ImageFolder tree `<root>/{train,val}/<class>/*.JPEG` with timm's transforms.

Train: timm's RandomResizedCrop + flip + color jitter, optional AutoAugment / RandAugment
(`recipe.aug.auto_augment`, e.g. 'rand-m9-mstd0.5' or 'original') and random erasing
(`recipe.aug.re_prob`); eval: resize to image_size / eval_crop_pct then center crop (256 -> 224).
Mixup, CutMix and label smoothing act on batches and are the trainer's job.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from dyconv_repro.data.build import cfg_get, positive_int
from dyconv_repro.data.registry import DATASETS
from dyconv_repro.errors import UserError

# timm's IMAGENET_DEFAULT_MEAN / _STD; written out so listing datasets does not import timm (~3 s)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG (the same class folders in both)"


def imagenet_transform(data_cfg, train: bool, recipe_cfg=None):
    """timm's `create_transform` configured from data_cfg (size, crop_pct) and recipe_cfg.aug."""
    from timm.data import create_transform

    aug = cfg_get(recipe_cfg, "aug", {})
    kwargs = dict(input_size=positive_int(data_cfg, "image_size", "imagenet"), is_training=train,
                  interpolation=str(cfg_get(data_cfg, "interpolation", "bilinear")),
                  mean=tuple(cfg_get(data_cfg, "mean", IMAGENET_MEAN)),
                  std=tuple(cfg_get(data_cfg, "std", IMAGENET_STD)))
    if train:
        kwargs.update(color_jitter=float(cfg_get(aug, "color_jitter", 0.4)),
                      auto_augment=cfg_get(aug, "auto_augment"),
                      re_prob=float(cfg_get(aug, "re_prob", 0.0)),
                      re_mode=str(cfg_get(aug, "re_mode", "pixel")),  # timm's train.py default
                      re_count=int(cfg_get(aug, "re_count", 1)))
    else:
        kwargs.update(crop_pct=float(cfg_get(data_cfg, "eval_crop_pct", 0.875)))
    try:
        return create_transform(**kwargs)
    except (AssertionError, KeyError, ValueError) as e:
        raise UserError(f"invalid ImageNet augmentation settings ({e!r}): check recipe.aug.auto_augment "
                        f"(e.g. 'rand-m9-mstd0.5', 'original', 'v0', 'augmix') and data.interpolation "
                        f"(bilinear | bicubic | random); got {kwargs}") from e


@DATASETS.register("imagenet", help="ImageNet-style ImageFolder tree (data.root) with timm transforms")
class ImageNet:
    """ImageFolder train/val tree with timm's train/eval transforms."""

    @staticmethod
    def build(data_cfg, split: str, recipe_cfg=None) -> ImageFolder:
        root = cfg_get(data_cfg, "root")
        if root is None:
            raise UserError(f"data.root is not set for imagenet; set data.root=/path with layout {LAYOUT}")
        root = Path(str(root)).expanduser().resolve()
        folder = root / split
        if not root.is_dir():
            raise UserError(f"ImageNet root {root} does not exist; set data.root to a folder laid out as "
                            f"{LAYOUT} (no automatic download: get ILSVRC-2012 from image-net.org)")
        if not folder.is_dir():
            raise UserError(f"ImageNet split folder {folder} does not exist; expected layout {LAYOUT}")
        transform = imagenet_transform(data_cfg, split == "train", recipe_cfg)
        try:
            ds = ImageFolder(str(folder), transform=transform)
        except FileNotFoundError as e:  # no class folders, or class folders without images
            raise UserError(f"ImageNet split folder {folder} has no images ({e}); expected layout {LAYOUT}") from e
        num_classes = cfg_get(data_cfg, "num_classes")
        if num_classes is not None and len(ds.classes) != num_classes:
            # a val split missing a class would silently shift every later label index
            raise UserError(f"{folder} has {len(ds.classes)} class folders but data.num_classes={num_classes}; "
                            f"set data.num_classes={len(ds.classes)} or fix the folder (layout {LAYOUT})")
        return ds

    @staticmethod
    def info(data_cfg) -> dict:
        return {"num_classes": positive_int(data_cfg, "num_classes", "imagenet"),
                "image_size": positive_int(data_cfg, "image_size", "imagenet"),
                "mean": tuple(cfg_get(data_cfg, "mean", IMAGENET_MEAN)),
                "std": tuple(cfg_get(data_cfg, "std", IMAGENET_STD))}
