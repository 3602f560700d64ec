"""Pipeline configuration: one dataclass per stage, presets, and command-line overrides.

Every checkpoint stores the configuration that produced it (``dataclasses.asdict``), so a
later stage — or a resumed run — rebuilds exactly the same data split and models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from mqttinfer.errors import ConfigError
from mqttinfer.train.arch import parse_arch, parse_arch_list

Augment = Literal["crop+flip", "crop", "none"]
Method = Literal["ncut", "louvain"]
Rule = Literal["ah", "ca"]
AtMode = Literal["map", "pooled"]


@dataclass
class DataConfig:
    """Which dataset, where, and how it is split."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    val_fraction: float = 0.1
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0


@dataclass
class TeacherConfig:
    """Teacher architecture and SGD schedule (linear warm-up, then cosine to zero)."""

    arch: str = "wrn-16-2"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    augment: Augment = "crop+flip"
    pad: int = 2
    seed: int = 0


@dataclass
class PartitionConfig:
    """How the filter activation network is built and cut into K partitions."""

    k: int = 4
    method: Method = "ncut"
    rule: Rule = "ah"
    resolution: float = 1.0
    balance: bool = True
    drop_p0: bool = True
    epsilon: float = 0.005
    seed: int = 0


@dataclass
class StudentConfig:
    """Students (one architecture per partition), the joint KD + AT schedule, and the heads."""

    archs: list[str] = field(default_factory=lambda: ["wrn-16-1"])
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    alpha: float = 0.9
    tau: float = 4.0
    beta: float = 5.0
    at_mode: AtMode = "map"
    augment: Augment = "crop+flip"
    pad: int = 2
    head_epochs: int = 8
    head_lr: float = 3e-3
    partition_dropout: float = 0.25
    seed: int = 0


@dataclass
class ExportConfig:
    """Bundle name, optional extras, tolerances and the size budget."""

    name: str = "bundle"
    include_teacher: bool = True
    include_activations: bool = True
    max_bundle_mb: float | None = None
    atol: float = 1e-3


@dataclass
class PipelineConfig:
    """Everything ``mqttinfer train all`` needs."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    students: StudentConfig = field(default_factory=StudentConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on inconsistent values (names the option and the fix)."""
        parse_arch(self.teacher.arch, source="--teacher-arch")
        parse_arch_list(",".join(self.students.archs), self.partition.k)
        checks: list[tuple[bool, str, str, str]] = [
            (self.partition.k >= 1, "--k", "the number of partitions must be >= 1", "use 2..8"),
            (self.teacher.epochs >= 1, "--teacher-epochs", "must be >= 1", "use e.g. 30"),
            (self.students.epochs >= 1, "--student-epochs", "must be >= 1", "use e.g. 30"),
            (0.0 <= self.students.alpha <= 1.0, "--alpha", "must be in [0, 1]", "use 0.9"),
            (self.students.tau > 0, "--tau", "must be > 0", "use 4"),
            (self.students.beta >= 0, "--beta", "must be >= 0", "use 5"),
            (
                0.0 <= self.students.partition_dropout < 1.0,
                "--partition-dropout",
                "must be in [0, 1)",
                "use 0.25",
            ),
        ]
        for ok, option, message, fix in checks:
            if not ok:
                raise ConfigError(message, source=option, fix=fix)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The shipped demo bundle: K=3 tiny students, ~15 min of CPU on 2 cores.
    "demo": {
        "data": {"dataset": "fashion-mnist"},
        "teacher": {"arch": "wrn-16-1", "epochs": 6},
        "partition": {"k": 3, "method": "ncut"},
        "students": {"archs": ["wrn-10-0.5"], "epochs": 6, "beta": 5.0},
        "export": {
            "name": "fmnist-demo",
            "include_teacher": True,
            "include_activations": True,
            "max_bundle_mb": 4.9,
        },
    },
    # CI: a 5,000-image subset, teacher → partition → 4 students → export in well under 3 min.
    "test": {
        "data": {"dataset": "fashion-mnist", "limit_train": 5000, "limit_test": 1000},
        "teacher": {"arch": "wrn-10-1", "epochs": 5},
        "partition": {"k": 4, "method": "ncut"},
        "students": {
            "archs": ["wrn-10-0.25"],
            "epochs": 5,
            "head_epochs": 4,
        },
        "export": {"name": "fmnist-test", "include_teacher": True, "include_activations": True},
    },
    # The documented benchmark (docs/training.md): WRN-16-2 teacher, 4 WRN-16-1 students.
    # 15 teacher and 10 student epochs: about 2 h of wall time on 2 idle cores.
    "full": {
        "data": {"dataset": "fashion-mnist"},
        "teacher": {"arch": "wrn-16-2", "epochs": 15},
        "partition": {"k": 4, "method": "ncut"},
        "students": {"archs": ["wrn-16-1"], "epochs": 10},
        "export": {"name": "fmnist-wrn16", "include_teacher": True, "include_activations": True},
    },
}


def _apply(target: Any, values: dict[str, Any], section: str) -> None:
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"unknown setting {key!r}",
                source=section,
                fix=f"use one of {', '.join(sorted(names))}",
            )
        setattr(target, key, value)


def build_config(preset: str | None, overrides: dict[str, dict[str, Any]]) -> PipelineConfig:
    """Start from ``preset`` (or the defaults), apply non-None overrides, validate."""
    config = PipelineConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(
                f"unknown preset {preset!r}",
                source="--preset",
                fix=f"use one of {', '.join(PRESETS)}",
            )
        for section, values in PRESETS[preset].items():
            _apply(getattr(config, section), dict(values), section)
    for section, values in overrides.items():
        _apply(
            getattr(config, section), {k: v for k, v in values.items() if v is not None}, section
        )
    config.validate()
    return config


def from_dict(cls: type[Any], values: dict[str, Any]) -> Any:
    """Rebuild a stage config dataclass from a checkpoint's stored dict (unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})
