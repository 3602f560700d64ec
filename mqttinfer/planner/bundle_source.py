"""Planning for an existing model bundle: its partitions and students are given.

``mqttinfer plan apply`` refuses a plan whose partitions differ from the bundle's, so a plan
made with ``--bundle DIR`` takes the bundle's partitions (filter ids), input shape, teacher
width and per-partition students as fixed; the planner then only groups devices (into exactly
as many groups as the bundle has partitions) and matches groups to partitions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from mqttinfer.bundle import Bundle
from mqttinfer.errors import ConfigError
from mqttinfer.planner.catalog import (
    BYTES_PER_PARAM,
    InputShape,
    StudentCost,
    parse_architecture,
    student_cost,
)

log = logging.getLogger(__name__)

IdArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class BundleSpec:
    """What a plan must respect to be applied with a bundle."""

    path: str
    partitions: tuple[IdArray, ...]
    students: tuple[StudentCost, ...]  # one per partition, in partition order
    input_shape: InputShape
    channels: int

    @property
    def dropped_filters(self) -> tuple[int, ...]:
        covered = {int(f) for part in self.partitions for f in part}
        return tuple(f for f in range(self.channels) if f not in covered)


def load_bundle_spec(path: str | Path) -> BundleSpec:
    """Read a bundle directory (BundleError naming the fix when it is not one)."""
    bundle = Bundle.load(path)
    shape = tuple(int(size) for size in bundle.input.shape)
    input_shape: InputShape = (shape[0], shape[1], shape[2])
    partitions = tuple(np.array(sorted(part), dtype=np.int64) for part in bundle.partitions)
    covered = max(int(part.max()) for part in partitions) + 1
    teacher = bundle.meta.get("teacher")
    declared = teacher.get("final_channels") if isinstance(teacher, dict) else None
    channels = int(declared) if isinstance(declared, int) and declared >= covered else covered
    students = tuple(
        _student(
            student.arch,
            student.params,
            student.macs,
            part.size,
            input_shape=input_shape,
            source=str(path),
        )
        for student, part in zip(bundle.students, partitions, strict=True)
    )
    return BundleSpec(str(path), partitions, students, input_shape, channels)


def _student(
    arch: str, params: int, macs: int, size: int, *, input_shape: InputShape, source: str
) -> StudentCost:
    """The catalog's cost for a known architecture (checked against the bundle's counts),
    else the bundle's own counts with fp32 weights as the memory estimate."""
    try:
        name = parse_architecture(arch, source=source).name
    except ConfigError:
        if params <= 0:
            raise ConfigError(
                f"student {arch!r} is not in the catalog and the bundle gives no parameter count",
                source=source,
                field="students[].params",
                fix="re-export the bundle with this mqttinfer",
            ) from None
        return StudentCost(arch or "unknown", size, params, macs, params * BYTES_PER_PARAM)
    cost = student_cost(name, input_shape, size)
    if params and (params, macs) != (cost.params, cost.macs):
        log.warning(
            "bundle student %s: %d params / %d MACs, the catalog counts %d / %d; using the "
            "bundle's",
            name,
            params,
            macs,
            cost.params,
            cost.macs,
        )
        return StudentCost(name, size, params, macs, cost.memory_bytes)
    return cost
