"""Model bundles: what the training pipeline exports and devices / the aggregator load.

A bundle is a directory holding ``bundle.json`` (the description), one single-file ONNX
student per partition, and the FC head as ``head.npz`` (``weight`` [classes, D], ``bias``
[classes]); the head input is the concatenation of the pooled student features in
partition-id order. docs/training.md describes how bundles are made.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mqttinfer.errors import BundleError
from mqttinfer.protocol.control import InputSpec, ModelRef, Role

BUNDLE_FORMAT = "mqttinfer-bundle"
BUNDLE_VERSION = 1
DEMO_BUNDLE_NAME = "fmnist-demo"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def demo_bundle_path() -> Path:
    """The Fashion-MNIST bundle shipped inside the package."""
    return Path(str(resources.files("mqttinfer"))) / "data" / "bundles" / DEMO_BUNDLE_NAME


@dataclass(frozen=True, slots=True)
class Student:
    partition: int
    arch: str
    file: Path
    sha256: str
    params: int
    macs: int
    output_channels: int


@dataclass(frozen=True, slots=True)
class Head:
    weight: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


class Bundle:
    """A validated bundle directory. ``Bundle.load(path)`` raises BundleError naming the fix."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta
        self._source = str(root / "bundle.json")
        self.name: str = str(meta.get("name", root.name))
        self.input = self._input_spec()
        self.partitions: list[list[int]] = self._partitions()
        self.students: list[Student] = self._students()

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        root = Path(path)
        meta_path = root / "bundle.json"
        if not meta_path.is_file():
            raise BundleError(
                "no bundle.json here",
                source=str(root),
                fix="point --bundle at a directory made by 'mqttinfer train all' (or omit it for "
                "the shipped demo bundle)",
            )
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise BundleError(f"not valid JSON ({exc})", source=str(meta_path)) from exc
        if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(
                f"'format' must be {BUNDLE_FORMAT!r}", source=str(meta_path), field="format"
            )
        if meta.get("version") != BUNDLE_VERSION:
            raise BundleError(
                f"bundle version {meta.get('version')!r} is not supported",
                source=str(meta_path),
                field="version",
                fix=f"re-export with this mqttinfer (bundle version {BUNDLE_VERSION})",
            )
        return cls(root, meta)

    # -- parsing -----------------------------------------------------------------------
    def _field(self, name: str, kind: type) -> Any:
        value = self.meta.get(name)
        if not isinstance(value, kind):
            raise BundleError(f"missing or not a {kind.__name__}", source=self._source, field=name)
        return value

    def _input_spec(self) -> InputSpec:
        spec = self._field("input", dict)
        shape = spec.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(d, int) and d > 0 for d in shape)
        ):
            raise BundleError("must be [C, H, W]", source=self._source, field="input.shape")
        channels = shape[0]
        mean = [float(v) for v in spec.get("mean", [0.0] * channels)]
        std = [float(v) for v in spec.get("std", [1.0] * channels)]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise BundleError(
                "mean/std need one value per channel, std > 0",
                source=self._source,
                field="input.mean",
            )
        return InputSpec(
            shape=tuple(shape),
            dtype=str(spec.get("dtype", "uint8")),
            scale=float(spec.get("scale", 1.0 / 255.0)),
            mean=tuple(mean),
            std=tuple(std),
        )

    def _partitions(self) -> list[list[int]]:
        parts = self._field("partitions", list)
        out: list[list[int]] = []
        for index, part in enumerate(parts):
            if not isinstance(part, dict) or part.get("id") != index:
                raise BundleError(
                    f"partition {index} must be a map with id {index}",
                    source=self._source,
                    field=f"partitions[{index}]",
                )
            filters = part.get("filters")
            if not isinstance(filters, list) or not filters:
                raise BundleError(
                    "needs a non-empty list of filter ids",
                    source=self._source,
                    field=f"partitions[{index}].filters",
                )
            out.append([int(x) for x in filters])
        seen = [f for part in out for f in part]
        if len(seen) != len(set(seen)):
            raise BundleError(
                "partitions overlap (a filter is in two partitions)",
                source=self._source,
                field="partitions",
            )
        if not out:
            raise BundleError(
                "a bundle needs at least one partition", source=self._source, field="partitions"
            )
        return out

    def _students(self) -> list[Student]:
        entries = self._field("students", list)
        students: dict[int, Student] = {}
        for index, entry in enumerate(entries):
            where = f"students[{index}]"
            if not isinstance(entry, dict):
                raise BundleError("must be a map", source=self._source, field=where)
            partition = entry.get("partition")
            if not isinstance(partition, int) or not 0 <= partition < len(self.partitions):
                raise BundleError(
                    "partition must name an existing partition id",
                    source=self._source,
                    field=f"{where}.partition",
                )
            file = entry.get("file")
            sha = entry.get("sha256")
            if not isinstance(file, str) or not isinstance(sha, str) or len(sha) != 64:
                raise BundleError(
                    "needs 'file' and a 64-hex 'sha256'", source=self._source, field=where
                )
            channels = int(entry.get("output_channels", len(self.partitions[partition])))
            if channels != len(self.partitions[partition]):
                raise BundleError(
                    f"output_channels {channels} differs from the partition's "
                    f"{len(self.partitions[partition])} filters",
                    source=self._source,
                    field=f"{where}.output_channels",
                )
            students[partition] = Student(
                partition=partition,
                arch=str(entry.get("arch", "")),
                file=self.root / file,
                sha256=sha,
                params=int(entry.get("params", 0)),
                macs=int(entry.get("macs", 0)),
                output_channels=channels,
            )
        missing = [p for p in range(len(self.partitions)) if p not in students]
        if missing:
            raise BundleError(
                f"no student for partitions {missing}", source=self._source, field="students"
            )
        return [students[p] for p in range(len(self.partitions))]

    # -- accessors ---------------------------------------------------------------------
    @property
    def num_partitions(self) -> int:
        return len(self.partitions)

    @property
    def classes(self) -> list[str]:
        dataset = self.meta.get("dataset", {})
        classes = dataset.get("classes") if isinstance(dataset, dict) else None
        if isinstance(classes, list):
            return [str(c) for c in classes]
        return [str(i) for i in range(self.head.num_classes)]

    @property
    def accuracy(self) -> dict[str, Any]:
        acc = self.meta.get("accuracy", {})
        return acc if isinstance(acc, dict) else {}

    def partition_sizes(self) -> list[int]:
        return [len(p) for p in self.partitions]

    @cached_property
    def head(self) -> Head:
        return self.load_head("file")

    def load_head(self, key: str = "file") -> Head:
        """Load the FC head named by ``head.<key>`` (``file`` = default, ``plain`` = no dropout)."""
        head_meta = self._field("head", dict)
        name = head_meta.get(key)
        if not isinstance(name, str):
            raise BundleError(
                f"no head file under head.{key}", source=self._source, field=f"head.{key}"
            )
        path = self.root / name
        try:
            with np.load(path) as data:
                weight = np.asarray(data["weight"], dtype=np.float32)
                bias = np.asarray(data["bias"], dtype=np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(
                f"cannot read head ({exc})",
                source=str(path),
                fix="the .npz needs arrays 'weight' [classes, D] and 'bias'",
            ) from exc
        expected = sum(self.partition_sizes())
        if weight.ndim != 2 or weight.shape[1] != expected or bias.shape != (weight.shape[0],):
            raise BundleError(
                f"head weight {weight.shape} / bias {bias.shape} do not fit {expected} features",
                source=str(path),
            )
        return Head(weight=weight, bias=bias)

    def verify(self) -> None:
        """Check every student file exists and matches its sha256."""
        for student in self.students:
            if not student.file.is_file():
                raise BundleError("student file is missing", source=str(student.file))
            actual = sha256_file(student.file)
            if actual != student.sha256:
                raise BundleError(
                    f"sha256 is {actual[:12]}…, bundle.json says {student.sha256[:12]}…",
                    source=str(student.file),
                    fix="re-export the bundle or restore the file",
                )

    def role(
        self,
        device: str,
        partition: int,
        group: str,
        *,
        deployment: str = "default",
        plan: str = "",
        plan_version: int = 0,
    ) -> Role:
        """The device role that serves ``partition`` of this bundle from its local file."""
        if not 0 <= partition < self.num_partitions:
            raise BundleError(
                f"partition {partition} does not exist (0..{self.num_partitions - 1})",
                source=self._source,
                field="partitions",
            )
        student = self.students[partition]
        size = student.file.stat().st_size if student.file.is_file() else 0
        return Role(
            device=device,
            group=group,
            partition=partition,
            model=ModelRef(
                sha256=student.sha256, size=size, arch=student.arch, file=str(student.file)
            ),
            input=self.input,
            plan=plan or self.name,
            plan_version=plan_version,
            deployment=deployment,
            pool=True,
        )
