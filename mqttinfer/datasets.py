"""Frames for camera sources, from files: pure numpy, no torch, no Pillow needed.

- :func:`read_idx`: the IDX format of (Fashion-)MNIST, gzipped or not;
- :func:`load_fashion_mnist`: the test (or train) split from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
- :func:`load_npz`: an ``.npz`` with ``x`` (uint8 ``[N, C, H, W]`` or ``[N, H, W]``) and an
  optional ``y`` (integer labels ``[N]``);
- :func:`iter_folder`: image files of a folder, sorted by name: ``.npy``, binary and ASCII
  ``.pgm``/``.ppm`` natively, other formats through Pillow when it is installed. Files in
  sub-folders named by an integer (``3/img.pgm``) get that integer as their label.

Every loader returns or yields ``(frame, label)`` pairs with ``frame`` uint8 and ``label`` an
int or None; bad files raise ConfigError (or DependencyError) naming the file and the fix.
"""

from __future__ import annotations

import gzip
import importlib
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mqttinfer.errors import ConfigError, DependencyError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_UBYTE = 0x08
_NETPBM_MAGIC = {b"P2": (1, False), b"P3": (3, False), b"P5": (1, True), b"P6": (3, True)}
_NATIVE_SUFFIXES = {".npy", ".pgm", ".ppm", ".pnm"}
_PILLOW_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGE_SUFFIXES = frozenset(_NATIVE_SUFFIXES | _PILLOW_SUFFIXES)

U8 = npt.NDArray[np.uint8]
Labelled = tuple[U8, int | None]


@dataclass(frozen=True, slots=True)
class FrameSet:
    """Frames ``x`` (uint8, first axis = frame) with optional labels ``y`` and class names."""

    x: U8
    y: npt.NDArray[np.int64] | None
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __iter__(self) -> Iterator[Labelled]:
        for index in range(len(self)):
            yield self.x[index], None if self.y is None else int(self.y[index])


def read_idx(path: Path) -> U8:
    """An unsigned-byte IDX file (``.gz`` or plain) as an array of its declared shape."""
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConfigError(f"cannot read the IDX file ({exc})", source=str(path)) from exc
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _IDX_UBYTE:
        raise ConfigError(
            "not an unsigned-byte IDX file (bad magic number)",
            source=str(path),
            fix="use the t10k-images-idx3-ubyte / t10k-labels-idx1-ubyte files",
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ConfigError("IDX header is truncated", source=str(path))
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise ConfigError(
            f"IDX body has {len(data) - header} bytes, shape {list(dims)} needs {expected}",
            source=str(path),
            fix="re-install or re-download the file",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR, *, split: str = "test") -> FrameSet:
    """Fashion-MNIST frames ``[N, 1, 28, 28]`` with labels, from the Debian package's files."""
    prefix = {"test": "t10k", "train": "train"}.get(split)
    if prefix is None:
        raise ConfigError(f"unknown split {split!r}", field="split", fix="use test or train")
    images = _find(root, f"{prefix}-images-idx3-ubyte")
    labels = _find(root, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise DependencyError(
            f"the Fashion-MNIST {split} files ({prefix}-*-idx*-ubyte.gz) are not in {root}; "
            "install them with 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu)"
        )
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"images {list(x.shape)} and labels {list(y.shape)} do not match", source=str(root)
        )
    return FrameSet(x[:, np.newaxis], y.astype(np.int64), FASHION_MNIST_CLASSES)


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def load_npz(path: Path) -> FrameSet:
    """Frames from an ``.npz``: ``x`` uint8 ``[N, C, H, W]`` / ``[N, H, W]``, optional ``y``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the .npz ({exc})", source=str(path)) from exc
    x = arrays.get("x")
    if x is None or x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ConfigError(
            "needs an array 'x' of uint8 frames, [N, C, H, W] or [N, H, W]",
            source=str(path),
            field="x",
            fix="np.savez(path, x=frames.astype(np.uint8), y=labels)",
        )
    y = arrays.get("y")
    if y is not None and (
        y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any()
    ):
        raise ConfigError(
            f"'y' must hold {x.shape[0]} non-negative integer labels", source=str(path), field="y"
        )
    return FrameSet(x, None if y is None else y.astype(np.int64))


def iter_folder(folder: Path) -> Iterator[Labelled]:
    """``(frame, label)`` for every image file under ``folder`` (see the module docstring)."""
    if not folder.is_dir():
        raise ConfigError("not a folder", source=str(folder), fix="pass a folder of images")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ConfigError(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))})", source=str(folder)
        )
    for path in files:
        yield read_image(path), _folder_label(path, folder)


def _folder_label(path: Path, root: Path) -> int | None:
    parent = path.parent
    if parent == root or not parent.name.isdigit():
        return None
    return int(parent.name)


def read_image(path: Path) -> U8:
    """One image as uint8: ``[H, W]`` (grey) or ``[H, W, C]``; ``.npy`` keeps its shape."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path)
    if suffix in {".pgm", ".ppm", ".pnm"}:
        return read_netpbm(path)
    return _read_with_pillow(path)


def _read_npy(path: Path) -> U8:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the .npy ({exc})", source=str(path)) from exc
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise ConfigError("a frame .npy must hold a uint8 array", source=str(path))
    return array


def read_netpbm(path: Path) -> U8:
    """A PGM/PPM file (binary P5/P6 or ASCII P2/P3, maxval up to 65535, scaled to 0..255)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the image ({exc.strerror})", source=str(path)) from exc
    magic = data[:2]
    if magic not in _NETPBM_MAGIC:
        raise ConfigError("not a PGM/PPM file (magic P2, P3, P5 or P6)", source=str(path))
    channels, binary = _NETPBM_MAGIC[magic]
    fields, body_start = _netpbm_header(data, path)
    width, height, maxval = fields
    if not (0 < maxval < 65536 and width > 0 and height > 0):
        raise ConfigError(f"bad PGM/PPM header {fields}", source=str(path))
    count = width * height * channels
    if binary:
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
        body = data[body_start : body_start + count * dtype.itemsize]
        if len(body) != count * dtype.itemsize:
            raise ConfigError("PGM/PPM pixel data is truncated", source=str(path))
        values: npt.NDArray[Any] = np.frombuffer(body, dtype=dtype)
    else:
        tokens = _strip_comments(data[body_start:]).split()
        if len(tokens) < count:
            raise ConfigError("PGM/PPM pixel data is truncated", source=str(path))
        values = np.array([int(t) for t in tokens[:count]], dtype=np.int64)
    if maxval != 255:
        values = np.round(values.astype(np.float64) * (255.0 / maxval))
    pixels: U8 = np.clip(values, 0, 255).astype(np.uint8)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return pixels.reshape(shape)


def _strip_comments(data: bytes) -> bytes:
    return re.sub(rb"#[^\n]*", b" ", data)


def _netpbm_header(data: bytes, path: Path) -> tuple[tuple[int, int, int], int]:
    """(width, height, maxval) and the offset of the pixel data (after one whitespace)."""
    values: list[int] = []
    pos = 2
    while len(values) < 3:
        while pos < len(data) and (data[pos : pos + 1].isspace() or data[pos : pos + 1] == b"#"):
            if data[pos : pos + 1] == b"#":
                end = data.find(b"\n", pos)
                pos = len(data) if end < 0 else end
            pos += 1
        start = pos
        while pos < len(data) and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise ConfigError("PGM/PPM header is malformed", source=str(path))
        values.append(int(data[start:pos]))
    return (values[0], values[1], values[2]), pos + 1


def _read_with_pillow(path: Path) -> U8:
    try:
        image_module = importlib.import_module("PIL.Image")
    except ImportError as exc:
        raise DependencyError(
            f"{path}: reading {path.suffix} images needs Pillow ('pip install pillow'); "
            "without it use .npy, .pgm or .ppm frames"
        ) from exc
    try:
        with image_module.open(path) as image:
            mode = "L" if image.mode in {"1", "L", "I", "I;16", "F"} else "RGB"
            pixels: U8 = np.array(image.convert(mode), dtype=np.uint8)
            return pixels
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the image ({exc})", source=str(path)) from exc
