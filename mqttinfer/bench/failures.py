"""``mqttinfer bench failures``: accuracy against the number of failed devices (RoCoIn Fig. 5/6).

For every strategy's bundle and plan (which device serves which partition), and for
f = 0 … N−1 failed devices, ``trials`` random sets of f devices (seeded; the same sets for every
strategy, so the comparison is paired) are removed, and the test images go through the real
aggregation logic, :class:`~mqttinfer.aggregation.Aggregation`:

- every device announces itself (``node_status``): the removed ones offline, as their
  last-will would say, so a partition without a live replica fires at once as ``dead``;
- every surviving device sends its partial: the student's pooled features (computed by
  :class:`~mqttinfer.runtime.runner.StudentRunner`, as a device does, then cast to fp16, as
  the wire carries them); a partition served by several replicas gets several partials, the
  first one wins;
- the fired slot goes through ``concat_features`` (missing partitions zero-filled) and
  ``apply_head``, once with the head trained with partition dropout (``head.file``) and once
  with the plain head (``head.plain``), when the bundle has both.

A trial's accuracy depends only on the set of surviving devices, so each distinct set is run
once and its accuracy reused by the trials that draw it again. Student features are cached
per bundle under ``<out>/features/``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mqttinfer.aggregation import Aggregation, AggregationConfig, apply_head, concat_features
from mqttinfer.bench.report import ResultsDir, machine, pyplot
from mqttinfer.bundle import Bundle, Head
from mqttinfer.errors import BundleError, ConfigError
from mqttinfer.runtime.runner import StudentRunner, read_model

log = logging.getLogger(__name__)

STRATEGY_ORDER = ("rocoin", "rocoin-g", "hetnonn", "nonn")
DEFAULT_BUNDLES = Path("bench-results/failure-bundles")
DEFAULT_FLEET = Path("devices/example-fleet.yaml")
F16 = npt.NDArray[np.float16]
CSV_COLUMNS = ("strategy", "head", "failed", "trials", "mean", "min", "max", "std", "distinct_sets")


@dataclass(frozen=True, slots=True)
class FailureCase:
    """One strategy: its bundle and which partition each device serves."""

    strategy: str
    bundle: Path
    devices: Mapping[str, int]  # device id -> partition
    plan: str | None = None

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.devices))


@dataclass(frozen=True, slots=True)
class FailureSettings:
    images: int = 2000
    trials: int = 30
    seed: int = 0
    deadline_ms: int = 100


# --------------------------------------------------------------------------- cases
def case_from_plan(strategy: str, plan_path: Path, bundle_dir: Path) -> FailureCase:
    from mqttinfer.planner.plan import load_plan

    plan = load_plan(plan_path)
    devices = {m.device: g.partition for g in plan.groups for m in g.members}
    bundle = Bundle.load(bundle_dir)
    if max(devices.values()) >= bundle.num_partitions:
        raise ConfigError(
            f"plan {plan_path} uses partition {max(devices.values())}, the bundle has "
            f"{bundle.num_partitions}",
            source=str(plan_path),
            fix="use the plan written next to this bundle",
        )
    return FailureCase(plan.strategy or strategy, bundle_dir, devices, str(plan_path))


def cases_from_dir(root: Path) -> list[FailureCase]:
    """``root/<strategy>/plan.yaml`` + ``root/<strategy>/bundle`` (train_failure_bundles.py)."""
    cases = []
    for strategy in STRATEGY_ORDER:
        plan = root / strategy / "plan.yaml"
        bundle = root / strategy / "bundle"
        if plan.is_file() and (bundle / "bundle.json").is_file():
            cases.append(case_from_plan(strategy, plan, bundle))
    return cases


def demo_case(fleet: Path) -> FailureCase:
    """RoCoIn on the shipped demo bundle, planned for ``fleet`` (the fallback)."""
    from mqttinfer.bundle import demo_bundle_path
    from mqttinfer.planner.bundle_source import load_bundle_spec
    from mqttinfer.planner.inventory import load_inventory
    from mqttinfer.planner.strategies import PlanRequest, make_plan

    bundle = demo_bundle_path()
    if not (bundle / "bundle.json").is_file():
        raise BundleError(
            "no failure bundles and no demo bundle",
            source=str(bundle),
            fix="run 'python benchmarks/train_failure_bundles.py' first",
        )
    plan = make_plan(
        PlanRequest(
            fleet=load_inventory(fleet), strategy="rocoin", bundle_spec=load_bundle_spec(bundle)
        )
    )
    devices = {m.device: g.partition for g in plan.groups for m in g.members}
    return FailureCase("rocoin", bundle, devices, None)


# --------------------------------------------------------------------------- features
def student_features(
    bundle: Bundle, frames: npt.NDArray[np.uint8], cache: Path | None
) -> list[F16]:
    """Per partition, the fp16 pooled features ``[N, |P_k|]`` a device would send."""
    key = _cache_key(bundle, frames)
    path = cache / f"{bundle.name}-{key}.npz" if cache is not None else None
    if path is not None and path.is_file():
        with np.load(path) as data:
            return [
                np.asarray(data[f"p{k}"], dtype=np.float16) for k in range(bundle.num_partitions)
            ]
    out = []
    for student in bundle.students:
        runner = StudentRunner(
            read_model(student.file, student.sha256), bundle.input, name=student.file.name
        )
        out.append(np.stack([runner.features(frame) for frame in frames]).astype(np.float16))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {f"p{k}": feats for k, feats in enumerate(out)}
        np.savez(path, **arrays)
    return out


def _cache_key(bundle: Bundle, frames: npt.NDArray[np.uint8]) -> str:
    digest = hashlib.sha256()
    for student in bundle.students:
        digest.update(student.sha256.encode())
    digest.update(hashlib.sha256(np.ascontiguousarray(frames).tobytes()).digest())
    return digest.hexdigest()[:16]


def heads_of(bundle: Bundle) -> dict[str, Head]:
    """``dropout`` (head.file) and ``plain`` (head.plain) when the bundle has both."""
    head_meta = bundle.meta.get("head", {})
    dropout = float(head_meta.get("partition_dropout", 0.0)) if isinstance(head_meta, dict) else 0.0
    heads = {"dropout" if dropout > 0 else "default": bundle.head}
    if isinstance(head_meta, dict) and isinstance(head_meta.get("plain"), str):
        heads["plain"] = bundle.load_head("plain")
    return heads


# --------------------------------------------------------------------------- trials
def accuracy_with(
    *,
    widths: Mapping[int, int],
    devices: Mapping[str, int],
    survivors: frozenset[str],
    features: Sequence[F16],
    labels: npt.NDArray[np.int64],
    heads: Mapping[str, Head],
    deadline_ms: int = 100,
) -> dict[str, float]:
    """Accuracy per head with only ``survivors`` answering, through the state machine."""
    machine_ = Aggregation(AggregationConfig(widths=dict(widths), default_deadline_ms=deadline_ms))
    for device, partition in sorted(devices.items()):
        machine_.node_status(device, partition, online=device in survivors, bdseq=1, now=0.0)
    answering = [(d, devices[d]) for d in sorted(survivors)]
    correct = dict.fromkeys(heads, 0)
    for index, truth in enumerate(labels):
        now = float(index)
        frame_id = f"f{index}"
        fired = list(machine_.open_frame(frame_id, "bench", now, deadline_ms=deadline_ms))
        for device, partition in answering:
            fired.extend(
                machine_.add_partial(
                    frame_id, partition, device, features[partition][index], now
                ).fired
            )
        if not fired:  # nobody left for some partition whose replicas never announced
            fired.extend(machine_.tick(now + 2 * deadline_ms / 1000.0))
        if len(fired) != 1 or fired[0].frame_id != frame_id:
            raise RuntimeError(f"frame {frame_id}: expected one firing, got {len(fired)}")
        x = concat_features(widths, fired[0].features)
        for name, head in heads.items():
            _, label, _ = apply_head(head.weight, head.bias, x)
            correct[name] += int(label == truth)
    total = max(1, len(labels))
    return {name: count / total for name, count in correct.items()}


def draw_failures(
    device_ids: Sequence[str], failed: int, trials: int, seed: int
) -> list[frozenset[str]]:
    """``trials`` surviving-device sets with ``failed`` devices removed (seeded per f)."""
    rng = np.random.default_rng([seed, failed])
    ids = sorted(device_ids)
    out = []
    for _ in range(trials):
        removed = set(rng.choice(len(ids), size=failed, replace=False).tolist())
        out.append(frozenset(d for i, d in enumerate(ids) if i not in removed))
    return out


def run_case(
    case: FailureCase,
    frames: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    settings: FailureSettings,
    cache: Path | None,
) -> list[dict[str, Any]]:
    bundle = Bundle.load(case.bundle)
    features = student_features(bundle, frames, cache)
    heads = heads_of(bundle)
    widths = dict(enumerate(bundle.partition_sizes()))
    memo: dict[frozenset[str], dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    for failed in range(len(case.devices)):
        sets = draw_failures(case.device_ids, failed, settings.trials, settings.seed)
        results = []
        for survivors in sets:
            if survivors not in memo:
                memo[survivors] = accuracy_with(
                    widths=widths,
                    devices=case.devices,
                    survivors=survivors,
                    features=features,
                    labels=labels,
                    heads=heads,
                    deadline_ms=settings.deadline_ms,
                )
            results.append(memo[survivors])
        for head in heads:
            values = np.array([r[head] for r in results])
            rows.append(
                {
                    "strategy": case.strategy,
                    "head": head,
                    "failed": failed,
                    "trials": len(values),
                    # Rounded so the mean of identical trials prints as their value.
                    "mean": round(float(values.mean()), 9),
                    "min": float(values.min()),
                    "max": float(values.max()),
                    "std": float(values.std()),
                    "distinct_sets": len(set(sets)),
                }
            )
        log.info(
            "%s, %d failed: %s",
            case.strategy,
            failed,
            {r["head"]: round(r["mean"], 4) for r in rows if r["failed"] == failed},
        )
    return rows


def load_test_set(
    images: int, shape: Sequence[int]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    from mqttinfer.datasets import load_fashion_mnist

    data = load_fashion_mnist()
    if tuple(data.x.shape[1:]) != tuple(shape) or data.y is None:
        raise BundleError(
            f"the bundles take {list(shape)} inputs, Fashion-MNIST is {list(data.x.shape[1:])}",
            fix="train the failure bundles on Fashion-MNIST (benchmarks/train_failure_bundles.py)",
        )
    return np.ascontiguousarray(data.x[:images]), data.y[:images]


def run_failures(
    cases: Sequence[FailureCase],
    frames: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    settings: FailureSettings,
    out: ResultsDir,
    *,
    plots: bool = True,
    note: str | None = None,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows.extend(run_case(case, frames, labels, settings, out.root / "features"))
    report = {
        "benchmark": "failures",
        "machine": machine(),
        "settings": asdict(settings),
        "images": len(labels),
        "note": note,
        "cases": [
            {
                "strategy": c.strategy,
                "bundle": str(c.bundle),
                "plan": c.plan,
                "devices": dict(c.devices),
                "partition_sizes": Bundle.load(c.bundle).partition_sizes(),
            }
            for c in cases
        ],
        "rows": rows,
    }
    out.write_json(report)
    out.write_csv(rows, columns=CSV_COLUMNS)
    if plots:
        plot_failures(rows, out.figure_path(), len(labels))
    return report


def plot_failures(rows: Sequence[Mapping[str, Any]], path: Path, images: int) -> None:
    plt = pyplot()
    strategies = [s for s in STRATEGY_ORDER if any(r["strategy"] == s for r in rows)]
    heads = sorted({r["head"] for r in rows}, key=lambda h: (h == "plain", h))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = {
        "rocoin": "tab:blue",
        "rocoin-g": "tab:purple",
        "hetnonn": "tab:orange",
        "nonn": "tab:green",
    }
    main_head = heads[0]
    for index, strategy in enumerate(strategies):
        # A small sideways shift per strategy keeps the error bars apart.
        shift = 0.06 * (index - (len(strategies) - 1) / 2)
        mine = sorted(
            (r for r in rows if r["strategy"] == strategy and r["head"] == main_head),
            key=lambda r: r["failed"],
        )
        x = [r["failed"] + shift for r in mine]
        mean = np.array([r["mean"] for r in mine])
        # Clipped: float rounding can put the mean a hair outside [min, max].
        low = np.maximum(0.0, mean - np.array([r["min"] for r in mine]))
        high = np.maximum(0.0, np.array([r["max"] for r in mine]) - mean)
        axes[0].errorbar(
            x,
            mean,
            yerr=[low, high],
            marker="o",
            capsize=3,
            label=strategy,
            color=colours.get(strategy),
        )
        for head, style in zip(heads, ("-", "--", ":"), strict=False):
            series = sorted(
                (r for r in rows if r["strategy"] == strategy and r["head"] == head),
                key=lambda r: r["failed"],
            )
            axes[1].plot(
                [r["failed"] for r in series],
                [r["mean"] for r in series],
                style,
                marker="o",
                color=colours.get(strategy),
                label=f"{strategy}, {head} head",
            )
    axes[0].set_title(f"{main_head} head: mean, min–max over trials")
    axes[1].set_title("head trained with partition dropout vs plain head (mean)")
    for ax in axes:
        ax.set_xlabel("failed devices")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"accuracy ({images} Fashion-MNIST test images)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(report: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    rows = report["rows"]
    heads = sorted({r["head"] for r in rows}, key=lambda h: (h == "plain", h))
    failed = sorted({r["failed"] for r in rows})
    table = Table(
        title=f"accuracy vs failed devices ({report['images']} images; mean, and min over trials)"
    )
    table.add_column("strategy")
    table.add_column("head")
    for f in failed:
        table.add_column(str(f), justify="right")
    for case in report["cases"]:
        for head in heads:
            mine = {
                r["failed"]: r
                for r in rows
                if r["strategy"] == case["strategy"] and r["head"] == head
            }
            label = f"{case['strategy']} K={len(case['partition_sizes'])}"
            table.add_row(
                label, head, *(f"{mine[f]['mean']:.3f}" if f in mine else "" for f in failed)
            )
            table.add_row(
                "",
                "  min",
                *(f"{mine[f]['min']:.3f}" if f in mine else "" for f in failed),
                style="dim",
            )
    return [table]
