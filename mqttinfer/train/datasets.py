"""Datasets as in-memory uint8 arrays (torch-free).

Every loader returns a :class:`Dataset` whose images are ``uint8 [N, C, H, W]`` and labels
``int64 [N]`` — exactly the frames a camera app sends to the devices. Supported:

- ``fashion-mnist``: the IDX files (``.gz`` or not) of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or any copy of them;
- ``cifar10``: the python-pickle folder (``cifar-10-batches-py``) or an image-folder layout
  (``train/<class>/*.jpg`` and ``test/<class>/*.jpg``);
- ``digits``: scikit-learn's 8×8 digits (only when scikit-learn is installed);
- ``imagefolder``: any ``train/<class>/…`` + ``test/<class>/…`` folder of images, or a bare
  ``<class>/…`` folder, of which a seeded 20% becomes the test set.

A missing dataset raises :class:`~mqttinfer.errors.ConfigError` saying how to get it.
"""

from __future__ import annotations

import importlib
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mqttinfer.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx
from mqttinfer.errors import ConfigError, DependencyError

log = logging.getLogger(__name__)

U8Array = npt.NDArray[np.uint8]
I64Array = npt.NDArray[np.int64]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DEFAULT_DIRS = {
    "fashion-mnist": FASHION_MNIST_DIR,
    "cifar10": Path("data/cifar10"),
}
DATASETS = ("fashion-mnist", "cifar10", "digits", "imagefolder")
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".webp"})


@dataclass(frozen=True)
class ImageSet:
    """Images ``uint8 [N, C, H, W]`` and labels ``int64 [N]``."""

    images: U8Array
    labels: I64Array

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: npt.NDArray[np.int64] | slice) -> ImageSet:
        """The images at ``index`` (a copy for index arrays, a view for slices)."""
        return ImageSet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Dataset:
    """A named dataset with class names, a training set and a test set."""

    name: str
    classes: tuple[str, ...]
    train: ImageSet
    test: ImageSet

    @property
    def shape(self) -> tuple[int, int, int]:
        """Input shape (C, H, W)."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class Splits:
    """Train / validation / test sets derived from a :class:`Dataset`."""

    name: str
    classes: tuple[str, ...]
    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load one of :data:`DATASETS` (``data_dir`` overrides the default location)."""
    loaders: dict[str, Callable[[Path | None], Dataset]] = {
        "fashion-mnist": _load_fashion_mnist,
        "cifar10": _load_cifar10,
        "digits": _load_digits,
        "imagefolder": _load_imagefolder,
    }
    key = name.strip().lower().replace("_", "-")
    key = {
        "fmnist": "fashion-mnist",
        "fashionmnist": "fashion-mnist",
        "cifar-10": "cifar10",
        "image-folder": "imagefolder",
    }.get(key, key)
    if key not in loaders:
        raise ConfigError(
            f"unknown dataset {name!r}", source="--dataset", fix=f"use one of {', '.join(DATASETS)}"
        )
    dataset = loaders[key](Path(data_dir) if data_dir is not None else None)
    log.info(
        "loaded %s: %d train, %d test images of shape %s",
        dataset.name,
        len(dataset.train),
        len(dataset.test),
        dataset.shape,
    )
    return dataset


def make_splits(
    dataset: Dataset,
    *,
    val_fraction: float,
    seed: int,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Splits:
    """Seeded train/validation split of the training set (validation builds the filter network).

    ``limit_train`` keeps a seeded random subset of the training set *before* splitting;
    ``limit_test`` keeps the *first* test images (so "the first 1000" stay the same images).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"validation fraction {val_fraction} not in (0, 1)",
            source="--val-fraction",
            fix="use e.g. 0.1",
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset.train)).astype(np.int64)
    if limit_train is not None:
        order = order[:limit_train]
    n_val = max(1, round(len(order) * val_fraction))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    if len(train_idx) == 0:
        raise ConfigError(
            "no training images left after the validation split",
            source="--limit-train",
            fix="use more images or a smaller fraction",
        )
    test = dataset.test if limit_test is None else dataset.test.take(slice(0, limit_test))
    return Splits(
        dataset.name,
        dataset.classes,
        dataset.train.take(train_idx),
        dataset.train.take(val_idx),
        test,
    )


def channel_stats(images: U8Array) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``images / 255`` (for the bundle's input normalisation)."""
    sample = images[: min(len(images), 20000)].astype(np.float64) / 255.0
    mean = sample.mean(axis=(0, 2, 3))
    std = sample.std(axis=(0, 2, 3))
    return [float(m) for m in mean], [float(max(s, 1e-3)) for s in std]


# --------------------------------------------------------------------------- Fashion-MNIST


def _missing(name: str, where: Path, how: str) -> ConfigError:
    return ConfigError(f"{name} not found in {where}", source="--data-dir", fix=how)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(data_dir: Path | None) -> Dataset:
    root = data_dir or DEFAULT_DIRS["fashion-mnist"]
    stems = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    paths = [_find_idx(root, stem) for stem in stems]
    if any(path is None for path in paths):
        raise _missing(
            "Fashion-MNIST (train-images-idx3-ubyte.gz, ...)",
            root,
            "install the Debian package with 'sudo apt install dataset-fashion-mnist', or "
            "download the four IDX .gz files from https://github.com/zalandoresearch/fashion-mnist "
            "into a folder and pass --data-dir FOLDER",
        )
    arrays = [read_idx(path) for path in paths if path is not None]
    train = ImageSet(arrays[0][:, None].copy(), arrays[1].astype(np.int64))
    test = ImageSet(arrays[2][:, None].copy(), arrays[3].astype(np.int64))
    return Dataset("fashion-mnist", FASHION_MNIST_CLASSES, train, test)


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_HOW = (
    "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it and pass "
    "--data-dir path/to/cifar-10-batches-py (or an image folder with train/<class>/*.jpg and "
    "test/<class>/*.jpg)"
)


def _load_cifar10(data_dir: Path | None) -> Dataset:
    root = data_dir or DEFAULT_DIRS["cifar10"]
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return _load_cifar_pickles(candidate)
    if (root / "train").is_dir() and (root / "test").is_dir():
        data = _load_imagefolder(root)
        return Dataset("cifar10", data.classes, data.train, data.test)
    raise _missing("CIFAR-10", root, _CIFAR_HOW)


def _unpickle(path: Path) -> dict[bytes, Any]:
    with path.open("rb") as handle:
        # The CIFAR-10 distribution format is a pickle; only load folders you trust.
        data: dict[bytes, Any] = pickle.load(handle, encoding="bytes")
    return data


def _cifar_batch(path: Path) -> ImageSet:
    if not path.is_file():
        raise _missing(path.name, path.parent, _CIFAR_HOW)
    batch = _unpickle(path)
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return ImageSet(images, np.asarray(batch[b"labels"], dtype=np.int64))


def _load_cifar_pickles(root: Path) -> Dataset:
    parts = [_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    train = ImageSet(
        np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])
    )
    test = _cifar_batch(root / "test_batch")
    classes: tuple[str, ...] = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        names = _unpickle(meta).get(b"label_names")
        if names:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return Dataset("cifar10", classes, train, test)


# --------------------------------------------------------------------------- digits


def _load_digits(data_dir: Path | None) -> Dataset:
    del data_dir
    try:
        sk_datasets = importlib.import_module("sklearn.datasets")
    except ImportError as exc:
        raise DependencyError(
            "the 'digits' dataset comes from scikit-learn, which is not installed; "
            "install it with: pip install scikit-learn"
        ) from exc
    bunch = sk_datasets.load_digits()
    images = np.clip(np.asarray(bunch.images) * 16.0, 0, 255).astype(np.uint8)[:, None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    n_test = len(labels) // 5
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    full = ImageSet(images, labels)
    return Dataset(
        "digits", tuple(str(d) for d in range(10)), full.take(train_idx), full.take(test_idx)
    )


# --------------------------------------------------------------------------- image folders


def _pil_image() -> Any:
    try:
        return importlib.import_module("PIL.Image")
    except ImportError as exc:
        raise DependencyError(
            "reading image folders needs Pillow, which is not installed; "
            "install it with: pip install pillow"
        ) from exc


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    return {
        c.name: sorted(f for f in c.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES)
        for c in classes
    }


def _read_images(files: list[Path], mode: str, size: tuple[int, int]) -> U8Array:
    image_mod = _pil_image()
    out = np.empty((len(files), 3 if mode == "RGB" else 1, size[1], size[0]), dtype=np.uint8)
    for i, path in enumerate(files):
        with image_mod.open(path) as opened:
            img = opened.convert(mode)
        if img.size != size:
            img = img.resize(size, image_mod.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        out[i] = arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None]
    return out


def _probe(files: list[Path]) -> tuple[str, tuple[int, int]]:
    image_mod = _pil_image()
    modes: set[str] = set()
    sizes: set[tuple[int, int]] = set()
    for path in files[:: max(1, len(files) // 64)]:
        with image_mod.open(path) as img:
            modes.add(img.mode)
            sizes.add(img.size)
    mode = "L" if modes <= {"L", "1", "I", "I;16"} else "RGB"
    size = max(sizes, key=lambda s: s[0] * s[1])
    return mode, size


def _folder_set(
    files: dict[str, list[Path]], classes: list[str], mode: str, size: tuple[int, int]
) -> ImageSet:
    paths = [path for name in classes for path in files.get(name, [])]
    labels = [i for i, name in enumerate(classes) for _ in files.get(name, [])]
    return ImageSet(_read_images(paths, mode, size), np.asarray(labels, dtype=np.int64))


def _load_imagefolder(data_dir: Path | None) -> Dataset:
    if data_dir is None or not data_dir.is_dir():
        raise ConfigError(
            f"image folder {data_dir} not found",
            source="--data-dir",
            fix="pass --data-dir DIR with DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg "
            "(or DIR/<class>/*.jpg, of which 20% becomes the test set)",
        )
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        train_files, test_files = _class_files(data_dir / "train"), _class_files(data_dir / "test")
    else:
        train_files, test_files = _split_folder(_class_files(data_dir))
    classes = sorted(train_files)
    every = [p for name in classes for p in train_files[name]]
    if not every:
        raise ConfigError(
            f"no images found under {data_dir}",
            source="--data-dir",
            fix=f"put images with suffixes {sorted(_IMAGE_SUFFIXES)} in class folders",
        )
    mode, size = _probe(every)
    train = _folder_set(train_files, classes, mode, size)
    test = _folder_set(test_files, classes, mode, size)
    return Dataset(data_dir.name or "imagefolder", tuple(classes), train, test)


def _split_folder(
    files: dict[str, list[Path]],
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    rng = np.random.default_rng(0)
    train: dict[str, list[Path]] = {}
    test: dict[str, list[Path]] = {}
    for name, paths in files.items():
        order = rng.permutation(len(paths))
        n_test = len(paths) // 5
        test[name] = [paths[i] for i in sorted(order[:n_test])]
        train[name] = [paths[i] for i in sorted(order[n_test:])]
    return train, test
