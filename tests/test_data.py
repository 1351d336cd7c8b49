"""Datasets: digits (default), fake, CIFAR-10/100 and ImageNet-style ImageFolder on tiny on-disk fixtures.

The CIFAR fixtures are written in the real python-pickle format (same file names, dict keys and
pixel layout as the official archives) and read by torchvision's own CIFAR classes; the ImageNet
fixture is a real JPEG folder tree read by torchvision's ImageFolder through timm's transforms.
"""

from __future__ import annotations

import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from dyconv_repro.data import DATASETS, build_dataset, dataset_info
from dyconv_repro.errors import UnknownNameError, UserError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "data")
N_DIGITS = 1797


def data_cfg(name: str, **overrides):
    """configs/data/<name>.yaml with overrides, as the trainer would pass it."""
    cfg = OmegaConf.load(os.path.join(CONFIGS, f"{name}.yaml"))
    return OmegaConf.merge(cfg, overrides)


def unnormalize(x: torch.Tensor, info: dict) -> torch.Tensor:
    mean = torch.tensor(info["mean"]).view(-1, 1, 1)
    std = torch.tensor(info["std"]).view(-1, 1, 1)
    return x * std + mean


def test_registry_names_and_bad_input():
    assert {"digits", "fake", "cifar10", "cifar100", "imagenet"} <= set(DATASETS.names())
    with pytest.raises(UnknownNameError, match="cifar10.*digits"):
        build_dataset({"name": "mnist"}, "train")
    with pytest.raises(UserError, match="train, val"):
        build_dataset(data_cfg("digits"), "test")


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_split_and_normalization():
    cfg = data_cfg("digits", augment=False)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(val) == math.ceil(0.2 * N_DIGITS) and len(train) + len(val) == N_DIGITS
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 10
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey replicated to 3 channels
    info = dataset_info(cfg)
    assert info["num_classes"] == 10 and info["image_size"] == 32
    xs = torch.stack([train[i][0] for i in range(len(train))])
    # normalized with the training-set statistics
    assert abs(xs.mean().item()) < 1e-4 and abs(xs.std().item() - 1) < 1e-3
    raw = unnormalize(xs, info)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_digits_split_is_stratified_with_every_class_in_val():
    cfg = data_cfg("digits")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    total = np.bincount(train.targets + val.targets, minlength=10)
    in_val = np.bincount(val.targets, minlength=10)
    assert (in_val > 0).all()
    # stratified: each class keeps its share to within one image
    assert np.abs(in_val - total * len(val) / N_DIGITS).max() <= 1.0


def test_digits_split_is_fixed_and_independent_of_run_seed():
    cfg = data_cfg("digits", image_size=16)  # a fresh preparation (not the cached 32x32 one)
    torch.manual_seed(1)
    a = build_dataset(cfg, "val")
    torch.manual_seed(2)
    from dyconv_repro.data import digits

    digits._prepared.cache_clear()
    b = build_dataset(cfg, "val")
    assert a.targets == b.targets and torch.equal(a.images, b.images)
    assert a[0][0].shape == (3, 16, 16)


def test_digits_are_the_real_sklearn_images():
    from sklearn.datasets import load_digits

    cfg = data_cfg("digits", image_size=8, augment=False)  # no resampling: exact pixels
    info = dataset_info(cfg)
    bunch = load_digits()
    by_pixels = {bytes(img.astype(np.uint8)): int(t) for img, t in zip(bunch.images, bunch.target)}
    seen = 0
    for split in ("train", "val"):
        ds = build_dataset(cfg, split)
        for i in range(0, len(ds), 37):
            x, y = ds[i]
            pixels = (unnormalize(x, info)[0] * 16).round().to(torch.uint8).numpy()
            assert by_pixels[bytes(pixels)] == y
            seen += 1
    assert seen > 40


def test_digits_augmentation_is_a_pad4_shift_and_seeded():
    aug = build_dataset(data_cfg("digits"), "train")
    plain = build_dataset(data_cfg("digits", augment=False), "train")
    background = -dataset_info(data_cfg("digits"))["mean"][0] / dataset_info(data_cfg("digits"))["std"][0]

    def draw(seed):
        torch.manual_seed(seed)
        return torch.stack([aug[i][0] for i in range(16)])

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every augmented image is its original shifted by at most 4 px, padded with the background
    shifted = 0
    for i in range(16):
        src = torch.nn.functional.pad(plain[i][0], (4, 4, 4, 4), value=background)
        offsets = [(dy, dx) for dy in range(9) for dx in range(9)
                   if torch.allclose(src[:, dy:dy + 32, dx:dx + 32], a[i])]
        assert offsets, f"image {i} is not a pad-4 crop of its original (a flip or other transform?)"
        shifted += (4, 4) not in offsets
    assert shifted >= 8
    assert not any(torch.equal(a[i], plain[i][0].flip(-1)) for i in range(16))


def test_digits_dataloader_workers_reproducible_from_generator():
    ds = build_dataset(data_cfg("digits"), "train")

    def first_batch(seed):
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=1, generator=g)
        return next(iter(loader))

    (xa, ya), (xb, yb), (xc, _) = first_batch(5), first_batch(5), first_batch(6)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)


def test_digits_bad_options():
    with pytest.raises(UserError, match="val_fraction"):
        build_dataset(data_cfg("digits", val_fraction=1.5), "train")
    with pytest.raises(UserError, match="num_classes=10"):
        build_dataset(data_cfg("digits", num_classes=100), "train")


# ----------------------------------------------------------------------------- fake
def test_fake_is_deterministic_per_split():
    cfg = data_cfg("fake", train_size=6, val_size=4, image_size=24, num_classes=5)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (6, 4)
    x, y = train[3]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 5
    assert torch.equal(build_dataset(cfg, "train")[3][0], x)
    assert not any(torch.equal(val[i][0], train[j][0]) for i in range(4) for j in range(6))
    assert dataset_info(cfg)["num_classes"] == 5


# ----------------------------------------------------------------------------- CIFAR
def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official archives are Python-2 pickles


def write_cifar10(root, per_batch=4, seed=0):
    """A tiny cifar-10-batches-py: the official file names, dict keys and row layout (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _pickle(folder / name, {"batch_label": f"batch {i + 1} of 6", "labels": labels, "data": data,
                                "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]})
        batches[name] = (data, labels)
    _pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "num_vis": 3072,
                                      "label_names": ["airplane", "automobile", "bird", "cat", "deer",
                                                      "dog", "frog", "horse", "ship", "truck"]})
    return batches


def write_cifar100(root, n_train=6, n_test=3, seed=0):
    """A tiny cifar-100-python: train / test / meta with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        _pickle(folder / name, {"filenames": [f"{name}_{j}.png" for j in range(n)], "batch_label": name,
                                "fine_labels": fine, "coarse_labels": [v // 5 for v in fine], "data": data})
        out[name] = (data, fine)
    _pickle(folder / "meta", {"fine_label_names": [f"class_{k}" for k in range(100)],
                              "coarse_label_names": [f"super_{k}" for k in range(20)]})
    return out


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """The one override: torchvision's CIFAR classes compare every file's MD5 with the official
    archive's (cifar.py's `check_integrity(path, md5)`, called from __init__ and _load_meta), which a
    tiny fixture cannot match. Replace only that comparison with torchvision's own existence-only
    mode (`md5=None`); everything else (file names, unpickling, label keys, pixel layout) is the
    unmodified torchvision code path. `test_cifar_md5_check_is_active` shows production keeps it."""
    real = tv_cifar.check_integrity
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: real(fpath, None))


def test_cifar10_loads_real_format(tmp_path, skip_cifar_md5):
    batches = write_cifar10(tmp_path)
    cfg = data_cfg("cifar10", root=str(tmp_path))
    info = dataset_info(cfg)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (20, 4)
    assert train.classes[0] == "airplane"
    data, labels = batches["test_batch"]
    for i in range(4):
        x, y = val[i]  # no augmentation on val: exact pixels back
        assert x.shape == (3, 32, 32) and y == labels[i]
        expected = torch.from_numpy(data[i].reshape(3, 32, 32)).float() / 255
        assert torch.allclose(unnormalize(x, info), expected, atol=1e-5)
    # train order = data_batch_1..5; augmentation keeps shape, is seeded, and changes pixels
    assert [train[i][1] for i in range(20)] == sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    torch.manual_seed(0)
    a = torch.stack([train[i][0] for i in range(20)])
    torch.manual_seed(0)
    b = torch.stack([train[i][0] for i in range(20)])
    plain = build_dataset(data_cfg("cifar10", root=str(tmp_path), augment=False), "train")
    assert a.shape == (20, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, torch.stack([plain[i][0] for i in range(20)]))


def test_cifar100_loads_real_format(tmp_path, skip_cifar_md5):
    out = write_cifar100(tmp_path)
    cfg = data_cfg("cifar100", root=str(tmp_path), augment=False)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (6, 3) and len(train.classes) == 100
    data, fine = out["train"]
    x, y = train[5]
    assert y == fine[5] and dataset_info(cfg)["num_classes"] == 100
    expected = torch.from_numpy(data[5].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(unnormalize(x, dataset_info(cfg)), expected, atol=1e-5)


def test_cifar_md5_check_is_active(tmp_path):
    write_cifar10(tmp_path)  # complete, but not the official bytes
    with pytest.raises(UserError, match="MD5") as e:
        build_dataset(data_cfg("cifar10", root=str(tmp_path)), "train")
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_says_where_and_how(tmp_path, name, folder):
    with pytest.raises(UserError) as e:
        build_dataset(data_cfg(name, root=str(tmp_path / "nowhere")), "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / folder) in msg and "data.download=true" in msg and "\n" not in msg


def test_cifar_partial_copy_names_missing_files(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3.*data.download=true"):
        build_dataset(data_cfg("cifar10", root=str(tmp_path)), "val")


def test_cifar_download_failure_is_a_user_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download cifar10.*no network"):
        build_dataset(data_cfg("cifar10", root=str(tmp_path), download=True), "train")


# ----------------------------------------------------------------------------- ImageNet (ImageFolder)
CLASSES = ("n01440764", "n01443537", "n01484850")


def write_jpeg_tree(root, per_class=(3, 2), size=(56, 44)):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for j in range(n):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{c}_{j}.JPEG", quality=90)


def test_imagenet_folder_with_timm_transforms(tmp_path):
    write_jpeg_tree(tmp_path)
    cfg = data_cfg("imagenet", root=str(tmp_path), num_classes=3, image_size=32)
    recipe = OmegaConf.create({"aug": {"auto_augment": "rand-m9-mstd0.5", "color_jitter": 0.4, "re_prob": 0.25}})
    train, val = build_dataset(cfg, "train", recipe), build_dataset(cfg, "val", recipe)
    assert (len(train), len(val)) == (9, 6) and train.classes == list(CLASSES) == val.classes
    assert sorted({y for _, y in train.samples}) == [0, 1, 2]
    names = [type(t).__name__ for t in train.transform.transforms]
    assert "RandomResizedCropAndInterpolation" in names and "RandomErasing" in names
    assert any("RandAugment" in n for n in names)
    # timm's crops draw from Python's `random`, RandAugment from numpy's (DataLoader workers seed both)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    x, y = train[4]
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert x.shape == (3, 32, 32) and y == 1 and torch.equal(train[4][0], x)
    # AutoAugment 'original' policy also builds
    original = build_dataset(cfg, "train", OmegaConf.create({"aug": {"auto_augment": "original"}}))
    assert original[0][0].shape == (3, 32, 32)
    # eval: resize the short side to 32 / crop_pct, center-crop 32, normalize (timm's defaults)
    reference = T.Compose([T.Resize(int(math.floor(32 / 0.875))), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(dataset_info(cfg)["mean"], dataset_info(cfg)["std"])])
    path, label = val.samples[5]
    x, y = val[5]
    assert y == label == 2
    assert torch.allclose(x, reference(Image.open(path).convert("RGB")), atol=1e-5)


def test_imagenet_errors_name_path_and_layout(tmp_path):
    cfg = data_cfg("imagenet", root=str(tmp_path / "missing"), num_classes=3, image_size=32)
    with pytest.raises(UserError, match="does not exist") as e:
        build_dataset(cfg, "train")
    assert str(tmp_path / "missing") in str(e.value) and "<root>/train/<class>" in str(e.value)

    (tmp_path / "inet" / "train").mkdir(parents=True)
    cfg = data_cfg("imagenet", root=str(tmp_path / "inet"), num_classes=3, image_size=32)
    with pytest.raises(UserError, match="val") as e:
        build_dataset(cfg, "val")
    assert str(tmp_path / "inet" / "val") in str(e.value)
    with pytest.raises(UserError, match="no images") as e:  # train/ exists but has no class folders
        build_dataset(cfg, "train")
    assert str(tmp_path / "inet" / "train") in str(e.value) and "<root>/train/<class>" in str(e.value)
    (tmp_path / "inet" / "train" / "n0").mkdir()  # a class folder without images
    with pytest.raises(UserError, match="no images"):
        build_dataset(cfg, "train")


def test_imagenet_class_count_and_aug_checked(tmp_path):
    write_jpeg_tree(tmp_path, per_class=(1, 1))
    with pytest.raises(UserError, match="3 class folders.*data.num_classes=3"):
        build_dataset(data_cfg("imagenet", root=str(tmp_path), image_size=32), "val")  # yaml says 1000
    cfg = data_cfg("imagenet", root=str(tmp_path), num_classes=3, image_size=32)
    with pytest.raises(UserError, match="auto_augment"):
        build_dataset(cfg, "train", {"aug": {"auto_augment": "bogus-m9"}})
