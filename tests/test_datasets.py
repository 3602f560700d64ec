"""Frame loaders: IDX (Fashion-MNIST), .npz, and image folders (.npy/.pgm/.ppm, Pillow)."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from mqttinfer.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    iter_folder,
    load_fashion_mnist,
    load_npz,
    read_idx,
    read_image,
    read_netpbm,
)
from mqttinfer.errors import ConfigError, DependencyError


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion_mnist(root: Path, count: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))  # plain works too
    return images, labels


def test_idx_round_trip_gzipped_and_plain(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(array))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), array)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "magic"),  # float IDX
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "truncated"),
        (idx_bytes(np.zeros((2, 2), np.uint8))[:-1], "needs 4"),
        (b"\x1f\x8b not really gzip", "cannot read"),
    ],
)
def test_bad_idx_files_name_the_file(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(payload)
    with pytest.raises(ConfigError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_fashion_mnist_loader_on_a_fake_install(tmp_path: Path) -> None:
    images, labels = write_fake_fashion_mnist(tmp_path / "fm")
    frames = load_fashion_mnist(tmp_path / "fm")
    assert frames.x.shape == (5, 1, 28, 28) and frames.x.dtype == np.uint8
    np.testing.assert_array_equal(frames.x[:, 0], images)
    assert [label for _, label in frames] == labels.tolist()
    assert frames.classes == FASHION_MNIST_CLASSES


def test_missing_fashion_mnist_says_which_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(DependencyError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="the Debian package dataset-fashion-mnist is not installed",
)
def test_the_real_fashion_mnist_test_set() -> None:
    frames = load_fashion_mnist()
    assert frames.x.shape == (10_000, 1, 28, 28)
    assert frames.y is not None and np.bincount(frames.y).tolist() == [1000] * 10


def test_npz_with_and_without_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(1).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "l.npz", x=x, y=np.array([0, 1, 2, 3]))
    np.savez(tmp_path / "u.npz", x=x[:, 0])
    labelled = load_npz(tmp_path / "l.npz")
    assert [label for _, label in labelled] == [0, 1, 2, 3]
    unlabelled = load_npz(tmp_path / "u.npz")
    assert unlabelled.y is None and unlabelled.x.shape == (4, 8, 8)


@pytest.mark.parametrize(
    ("arrays", "field"),
    [
        ({"x": np.zeros((2, 8, 8), np.float32)}, "x"),
        ({"frames": np.zeros((2, 8, 8), np.uint8)}, "x"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([1])}, "y"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0.5, 1.5])}, "y"),
    ],
)
def test_bad_npz_names_the_field(tmp_path: Path, arrays: dict[str, np.ndarray], field: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        load_npz(tmp_path / "bad.npz")
    assert err.value.field == field


def test_netpbm_binary_ascii_comments_and_16_bit(tmp_path: Path) -> None:
    grey = np.array([[0, 128, 255], [10, 20, 30]], np.uint8)
    (tmp_path / "g.pgm").write_bytes(b"P5\n# a comment\n3 2\n255\n" + grey.tobytes())
    np.testing.assert_array_equal(read_netpbm(tmp_path / "g.pgm"), grey)

    colour = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    (tmp_path / "c.ppm").write_bytes(b"P6 2 2 255\n" + colour.tobytes())
    np.testing.assert_array_equal(read_netpbm(tmp_path / "c.ppm"), colour)

    (tmp_path / "a.pgm").write_text("P2\n3 2\n# max\n15\n0 15 5\n15 0 10\n")
    np.testing.assert_array_equal(
        read_netpbm(tmp_path / "a.pgm"), np.array([[0, 255, 85], [255, 0, 170]], np.uint8)
    )

    wide = np.array([[0, 65535]], dtype=">u2")
    (tmp_path / "w.pgm").write_bytes(b"P5 2 1 65535\n" + wide.tobytes())
    np.testing.assert_array_equal(read_netpbm(tmp_path / "w.pgm"), [[0, 255]])


@pytest.mark.parametrize(
    "payload", [b"P7 1 1 255\n\x00", b"P5 4 4 255\n\x00\x01", b"P5 x 4 255\n", b"P5 0 4 255\n"]
)
def test_bad_netpbm_is_a_config_error(tmp_path: Path, payload: bytes) -> None:
    (tmp_path / "bad.pgm").write_bytes(payload)
    with pytest.raises(ConfigError):
        read_netpbm(tmp_path / "bad.pgm")


def test_folder_reads_sorted_files_with_labels_from_integer_subfolders(tmp_path: Path) -> None:
    grey = np.full((2, 2), 7, np.uint8)
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "b.pgm").write_bytes(b"P5 2 2 255\n" + grey.tobytes())
    np.save(tmp_path / "a.npy", np.ones((1, 2, 2), np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    frames = list(iter_folder(tmp_path))
    assert [label for _, label in frames] == [3, None]  # "3/b.pgm" sorts before "a.npy"
    np.testing.assert_array_equal(frames[0][0], grey)
    assert frames[1][0].shape == (1, 2, 2)


def test_empty_folder_and_non_uint8_npy_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no image files"):
        list(iter_folder(tmp_path))
    np.save(tmp_path / "f.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(ConfigError, match="uint8"):
        read_image(tmp_path / "f.npy")


def test_png_through_pillow_when_installed(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    image.fromarray(rgb).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), rgb)


def test_png_without_pillow_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG not decoded")
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # makes the import fail
    with pytest.raises(DependencyError, match=r"Pillow.*\.npy, \.pgm or \.ppm"):
        read_image(tmp_path / "x.png")
