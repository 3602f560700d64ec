"""Torch-free checks of an exported bundle: the contract, and its accuracy under onnxruntime.

This is independent of the runtime's loader (:mod:`mqttinfer.bundle`): it re-derives what a
device and the aggregator do — ``x = (u8 · scale − mean[c]) / std[c]``, each student's
``features`` map pooled over space, concatenation in partition order, ``weight @ x + bias`` —
with numpy and onnxruntime only, so a bundle that passes here runs without torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from mqttinfer.errors import BundleError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
REQUIRED_KEYS = (
    "format",
    "version",
    "name",
    "created",
    "dataset",
    "input",
    "teacher",
    "partitions",
    "students",
    "head",
    "accuracy",
    "activations",
    "training",
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ort_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class BundleCheck:
    """What :func:`check_bundle` found (raises on anything wrong)."""

    root: Path
    meta: dict[str, Any]
    partition_sizes: list[int]
    total_bytes: int
    files: dict[str, int] = field(default_factory=dict)


def _fail(root: Path, message: str, key: str | None = None) -> BundleError:
    return BundleError(
        message,
        source=str(root / "bundle.json"),
        field=key,
        fix="re-export the bundle with 'mqttinfer train export'",
    )


def check_bundle(path: str | Path) -> BundleCheck:
    """Validate a bundle directory against the format (files, hashes, ONNX I/O, head shape)."""
    root = Path(path)
    meta_path = root / "bundle.json"
    if not meta_path.is_file():
        raise BundleError("no bundle.json", source=str(root), fix="export a bundle first")
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing or meta["format"] != "mqttinfer-bundle" or meta["version"] != 1:
        raise _fail(root, f"missing keys {missing} or wrong format/version")
    sizes = _check_partitions(root, meta)
    channels, height, width = meta["input"]["shape"]
    for index, entry in enumerate(meta["students"]):
        _check_student(root, entry, index, sizes, (channels, height, width))
    _check_head(root, meta, sum(sizes))
    files = {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()}
    return BundleCheck(root, meta, sizes, sum(files.values()), files)


def _check_partitions(root: Path, meta: dict[str, Any]) -> list[int]:
    parts = meta["partitions"]
    if [p.get("id") for p in parts] != list(range(len(parts))):
        raise _fail(root, "partition ids must be 0..K-1 in order", "partitions")
    every = [int(f) for p in parts for f in p["filters"]]
    if len(every) != len(set(every)) or any(not p["filters"] for p in parts):
        raise _fail(root, "partitions must be non-empty and disjoint", "partitions")
    if len(meta["students"]) != len(parts):
        raise _fail(root, "one student per partition", "students")
    return [len(p["filters"]) for p in parts]


def _check_student(
    root: Path, entry: dict[str, Any], index: int, sizes: list[int], shape: tuple[int, int, int]
) -> None:
    key = f"students[{index}]"
    if entry["partition"] != index or entry["output_channels"] != sizes[index]:
        raise _fail(root, "partition / output_channels mismatch", key)
    file = root / entry["file"]
    if not file.is_file() or _sha256(file) != entry["sha256"]:
        raise _fail(root, f"{file.name} is missing or fails its sha256", key)
    session = ort_session(file)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != ["input"] or [o.name for o in outputs] != ["features"]:
        raise _fail(root, f"{file.name} must map 'input' to 'features'", key)
    in_shape, out_shape = inputs[0].shape, outputs[0].shape
    if isinstance(in_shape[0], int) or list(in_shape[1:]) != list(shape):
        raise _fail(root, f"{file.name} input shape {in_shape} is not [N, *{shape}]", key)
    if isinstance(out_shape[0], int) or out_shape[1] != sizes[index]:
        raise _fail(
            root, f"{file.name} output shape {out_shape} is not [N, {sizes[index]}, h, w]", key
        )


def _check_head(root: Path, meta: dict[str, Any], features: int) -> None:
    head = meta["head"]
    if head["in_features"] != features:
        raise _fail(root, f"head.in_features {head['in_features']} != {features}", "head")
    for key in ("file", "plain"):
        with np.load(root / head[key]) as data:
            weight, bias = data["weight"], data["bias"]
        if weight.shape != (head["num_classes"], features) or bias.shape != (head["num_classes"],):
            raise _fail(root, f"{head[key]} has weight {weight.shape}, bias {bias.shape}", "head")
        if weight.dtype != np.float32 or bias.dtype != np.float32:
            raise _fail(root, f"{head[key]} must be float32", "head")


class OnnxEnsemble:
    """The bundle's students under onnxruntime plus a numpy head: what the cluster computes."""

    def __init__(self, path: str | Path, *, head: str = "file", threads: int = 2) -> None:
        self.root = Path(path)
        self.meta: dict[str, Any] = json.loads((self.root / "bundle.json").read_text())
        spec = self.meta["input"]
        self.scale = np.float32(spec["scale"])
        self.mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.sessions = [ort_session(self.root / s["file"], threads) for s in self.meta["students"]]
        with np.load(self.root / self.meta["head"][head]) as data:
            self.weight = np.asarray(data["weight"], dtype=np.float32)
            self.bias = np.asarray(data["bias"], dtype=np.float32)

    def normalize(self, frames: npt.NDArray[np.uint8]) -> F32:
        """The device's input transform: ``(u8 · scale − mean[c]) / std[c]`` as float32."""
        x = frames.astype(np.float32) * self.scale
        out: F32 = ((x - self.mean) / self.std).astype(np.float32)
        return out

    def pooled(self, frames: npt.NDArray[np.uint8], batch: int = 500) -> F32:
        """Concatenated pooled student features ``[N, D]`` in partition order."""
        chunks = []
        for start in range(0, len(frames), batch):
            x = self.normalize(frames[start : start + batch])
            maps = [s.run(["features"], {"input": x})[0] for s in self.sessions]
            chunks.append(np.concatenate([m.mean(axis=(2, 3)) for m in maps], axis=1))
        out: F32 = np.concatenate(chunks).astype(np.float32)
        return out

    def logits(self, pooled: F32, missing: Sequence[int] = ()) -> F32:
        """Head output, with the partitions in ``missing`` zero-filled."""
        x = pooled.copy()
        bounds = np.cumsum([0] + [len(p["filters"]) for p in self.meta["partitions"]])
        for k in missing:
            x[:, bounds[k] : bounds[k + 1]] = 0.0
        out: F32 = x @ self.weight.T + self.bias
        return out

    def accuracy(
        self,
        frames: npt.NDArray[np.uint8],
        labels: npt.NDArray[np.int64],
        missing: Sequence[int] = (),
    ) -> float:
        """Top-1 accuracy of the ensemble on ``frames`` (uint8 [N, C, H, W])."""
        if len(labels) == 0:
            return 0.0
        predicted = self.logits(self.pooled(frames), missing).argmax(axis=1)
        return float((predicted == labels).mean())
