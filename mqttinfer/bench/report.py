"""What every benchmark shares: the machine it ran on, quantiles, and its results folder.

A benchmark writes ``<out>/<name>.json`` (everything, machine included), optional CSV tables
and PNG figures (matplotlib with the Agg backend, imported only when a figure is drawn, so the
benchmarks run without the ``plots`` extra when ``--no-plots`` is given).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import mqttinfer
from mqttinfer.errors import DependencyError

DEFAULT_OUT = Path("bench-results")


@dataclass(frozen=True, slots=True)
class Summary:
    """p50 / p99 / mean / min / max of a sample (milliseconds, bytes, whatever was measured)."""

    p50: float
    p99: float
    mean: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        array = np.fromiter(values, dtype=np.float64)
        if array.size == 0:
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
        p50, p99 = np.percentile(array, [50.0, 99.0])
        return cls(
            float(p50),
            float(p99),
            float(array.mean()),
            float(array.min()),
            float(array.max()),
            int(array.size),
        )

    def as_dict(self, digits: int = 4) -> dict[str, float | int]:
        return {
            "p50": _round(self.p50, digits),
            "p99": _round(self.p99, digits),
            "mean": _round(self.mean, digits),
            "min": _round(self.min, digits),
            "max": _round(self.max, digits),
            "n": self.n,
        }


def _round(value: float, digits: int) -> float:
    return value if math.isnan(value) else round(value, digits)


def machine() -> dict[str, Any]:
    """The facts docs/benchmarks.md names: architecture, cores, CPU model, load, versions."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mqttinfer": mqttinfer.__version__,
        "load_average": load,
    }


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class ResultsDir:
    """The folder one benchmark writes into (created on first write)."""

    def __init__(self, root: Path | str, name: str) -> None:
        self.root = Path(root)
        self.name = name
        self.written: list[Path] = []

    def path(self, suffix: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"{self.name}{suffix}"

    def write_json(self, document: Mapping[str, Any]) -> Path:
        path = self.path(".json")
        path.write_text(json.dumps(_jsonable(document), indent=1, allow_nan=False) + "\n")
        self.written.append(path)
        return path

    def write_csv(
        self, rows: Sequence[Mapping[str, Any]], suffix: str = ".csv", *, columns: Sequence[str]
    ) -> Path:
        path = self.path(suffix)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_value(row.get(k)) for k in columns})
        self.written.append(path)
        return path

    def figure_path(self, suffix: str = ".png") -> Path:
        path = self.path(suffix)
        self.written.append(path)
        return path


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN/inf to None (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or DependencyError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise DependencyError(
            "drawing the benchmark figures needs matplotlib (fix: pip install 'mqttinfer[plots]', "
            "or pass --no-plots)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ms(value: float) -> str:
    """A duration in ms for tables: 3 significant digits."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"
