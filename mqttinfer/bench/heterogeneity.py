"""``mqttinfer bench heterogeneity``: the planner's latency predictions against the real runtime.

For each strategy's bundle, the planner plans a small heterogeneous fleet
(``make_plan`` with the bundle's partitions and students fixed), and the plan runs on a
:class:`~mqttinfer.runtime.cluster.LocalCluster` whose devices are slowed down to match the
inventory, on a common time scale ``s`` (this machine is faster than the fleet):

- device d serving partition k is predicted to compute for ``t_d = 2·MACs_k / flops_d`` and
  to send its partial in ``l_d = 8·(2|P_k| + 64) / rate_d`` (``planner.latency``);
- device d computes in ``c_d`` on this machine while the whole plan runs (calibrated: a first
  cluster without slowdown answers ``calibration_frames`` frames and the devices' own stats
  give their compute p50; with every device sharing two cores that is longer than a student
  alone takes, and ``--slowdown`` multiplies what the device measures);
- ``s = margin · max_d c_d / t_d``, so the relatively fastest device runs ``margin`` times
  slower than it does here (the margin keeps the emulated times well above the runtime's own
  overhead); device d gets ``--slowdown s·t_d / c_d`` and ``--link-rate rate_d / s``.

The prediction for a frame with every device up is ``s ×`` the plan's ``all_up_latency_s``
(the slowest group's fastest member). It leaves out, as RoCoIn's problem (1) does, the frame
broadcast, the FC head and the result's trip back; the measured end-to-end latency includes
them, so measured ≈ predicted + a constant (about the floor of ``bench latency``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mqttinfer.bench.latency import sample_frames, student_runner, time_runner
from mqttinfer.bench.report import ResultsDir, Summary, machine, pyplot
from mqttinfer.bundle import Bundle
from mqttinfer.errors import InferTimeoutError, MqttInferError, ProtocolError
from mqttinfer.planner.bundle_source import load_bundle_spec
from mqttinfer.planner.inventory import Device, Fleet
from mqttinfer.planner.latency import FLOPS_PER_MAC, output_bytes
from mqttinfer.planner.plan import Plan
from mqttinfer.planner.strategies import PlanRequest, make_plan
from mqttinfer.protocol import Stats
from mqttinfer.runtime.bus import BrokerConfig, Bus, Message
from mqttinfer.runtime.cluster import DeviceSpec, LocalCluster
from mqttinfer.runtime.source import Source

log = logging.getLogger(__name__)

STRATEGY_ORDER = ("rocoin", "rocoin-g", "hetnonn", "nonn")
_CALIBRATION_STATS_S = 0.5
CSV_COLUMNS = (
    "strategy",
    "groups",
    "devices",
    "time_scale",
    "predicted_ms",
    "measured_p50_ms",
    "measured_p99_ms",
    "aggregator_e2e_p50_ms",
    "slowest_compute_p50_ms",
    "frames",
    "degraded",
)


def ladder_fleet() -> Fleet:
    """Six devices, each half as fast as the previous (the default fleet of this benchmark).

    Distinct capacities, so RoCoIn's groups pair neighbours and answer at the speed of the
    faster one, while NoNN and HetNoNN wait for the slowest device.
    """
    flops = (1.6e9, 0.8e9, 0.4e9, 0.2e9, 0.1e9, 0.05e9)
    rates = (20e6, 10e6, 5e6, 2e6, 1e6, 0.5e6)
    devices = tuple(
        Device(id=f"dev{i}", flops=f, memory=256 * 2**20, rate=r, outage=round(0.1 + 0.02 * i, 2))
        for i, (f, r) in enumerate(zip(flops, rates, strict=True))
    )
    return Fleet(devices, source="<ladder fleet>", description="halving FLOP/s and link rates")


@dataclass(frozen=True, slots=True)
class HeterogeneitySettings:
    frames: int = 60
    warmup: int = 5
    margin: float = 10.0
    time_scale: float | None = None  # overrides the computed one
    compute_runs: int = 100
    calibration_frames: int = 40
    deadline_ms: int = 10_000
    timeout_s: float = 30.0
    epsilon: float = 0.05


@dataclass(frozen=True, slots=True)
class Emulated:
    device: str
    partition: int
    group: str
    compute_s: float  # predicted on the real device
    link_s: float
    slowdown: float
    link_rate: float


def plan_for(strategy: str, bundle_dir: Path, fleet: Fleet, epsilon: float) -> Plan:
    return make_plan(
        PlanRequest(
            fleet=fleet,
            strategy=strategy,
            epsilon=epsilon,
            bundle_spec=load_bundle_spec(bundle_dir),
            name=f"het-{strategy}",
        )
    )


@dataclass(frozen=True)
class _Case:
    strategy: str
    bundle: Bundle
    plan: Plan
    native_ms: dict[int, float]  # student k alone on one core, p50
    in_cluster_ms: dict[str, float]  # each device's compute p50 with the whole plan running

    def predicted_device_times(self, fleet: Fleet) -> list[tuple[str, int, str, float, float]]:
        """(device, partition, group, compute s, link s) as the planner's model predicts."""
        return predicted_device_times(self.plan, fleet)

    def min_scale(self, fleet: Fleet) -> float:
        """The time scale at which the relatively fastest device runs without slowdown."""
        return max(
            self.in_cluster_ms[device] / 1000.0 / compute
            for device, _, _, compute, _ in self.predicted_device_times(fleet)
        )


def predicted_device_times(plan: Plan, fleet: Fleet) -> list[tuple[str, int, str, float, float]]:
    out = []
    for group in plan.groups:
        for member in group.members:
            device = fleet.by_id(member.device)
            compute = FLOPS_PER_MAC * group.student.macs / device.flops
            link = 8.0 * output_bytes(len(group.filters)) / device.rate
            out.append((member.device, group.partition, group.id, compute, link))
    return out


def calibrate(
    bundle: Bundle, plan: Plan, fleet: Fleet, settings: HeterogeneitySettings
) -> dict[str, float]:
    """Each device's compute p50 (ms) with the plan running undisturbed on this machine.

    The emulated slowdown multiplies the compute time a device measures, and with every
    device of the plan sharing this machine's cores that is longer than a student alone
    takes; calibrating on it keeps the emulated times at the planned ones.
    """
    specs = [
        DeviceSpec(device, partition, group=group)
        for device, partition, group, _, _ in predicted_device_times(plan, fleet)
    ]
    frames = sample_frames(bundle, 32)
    stats: dict[str, Stats] = {}

    def on_stats(message: Message) -> None:
        with contextlib.suppress(ProtocolError):
            decoded = Stats.decode(message.payload)
            if decoded.kind == "device" and "compute" in decoded.latency_ms:
                stats[decoded.node] = decoded

    with LocalCluster(bundle.root, specs, stats_interval_s=_CALIBRATION_STATS_S) as cluster:
        monitor = Bus(
            BrokerConfig.from_url(cluster.url),
            node="het-calibration",
            kind="monitor",
            topics=cluster.topics,
        )
        monitor.subscribe(cluster.topics.all_stats, on_stats)
        with (
            monitor,
            Source(cluster.url, source_id="het-cal", deployment=cluster.deployment) as source,
        ):
            for index in range(settings.calibration_frames):
                source.infer(frames[index % len(frames)], settings.timeout_s)
            stats.clear()  # only stats published after every frame was answered
            deadline = time.monotonic() + 10 * _CALIBRATION_STATS_S
            while len(stats) < len(specs) and time.monotonic() < deadline:
                time.sleep(0.05)
    missing = sorted({spec.id for spec in specs} - set(stats))
    if missing:
        raise MqttInferError(f"no compute stats from {missing} during calibration")
    return {node: s.latency_ms["compute"].p50 for node, s in stats.items()}


def prepare(
    strategy: str, bundle_dir: Path, fleet: Fleet, settings: HeterogeneitySettings
) -> _Case:
    bundle = Bundle.load(bundle_dir)
    plan = plan_for(strategy, bundle_dir, fleet, settings.epsilon)
    frames = sample_frames(bundle, 32)
    native = {
        s.partition: time_runner(
            student_runner(bundle, s.file, s.sha256), frames, settings.compute_runs
        ).p50
        for s in bundle.students
    }
    log.info("%s: calibrating the devices' compute with the plan running", strategy)
    return _Case(strategy, bundle, plan, native, calibrate(bundle, plan, fleet, settings))


def emulation(case: _Case, fleet: Fleet, scale: float) -> list[Emulated]:
    """Every device's slowdown and link rate at time scale ``scale``."""
    return [
        Emulated(
            device=device,
            partition=partition,
            group=group,
            compute_s=compute,
            link_s=link,
            slowdown=max(1.0, scale * compute * 1000.0 / case.in_cluster_ms[device]),
            link_rate=fleet.by_id(device).rate / scale,
        )
        for device, partition, group, compute, link in case.predicted_device_times(fleet)
    ]


def run_case(
    case: _Case, fleet: Fleet, scale: float, settings: HeterogeneitySettings
) -> dict[str, Any]:
    emulated = emulation(case, fleet, scale)
    specs = [
        DeviceSpec(e.device, e.partition, group=e.group, slowdown=e.slowdown, link_rate=e.link_rate)
        for e in emulated
    ]
    predicted_ms = scale * case.plan.predicted.all_up_latency_s * 1000.0
    log.info("%s: %d devices, predicted %.1f ms", case.strategy, len(specs), predicted_ms)
    frames = sample_frames(case.bundle, 32)
    e2e: list[float] = []
    slowest: list[float] = []
    compute: list[float] = []
    degraded = 0
    with (
        LocalCluster(case.bundle.root, specs, stats_interval_s=30.0) as cluster,
        Source(
            cluster.url,
            source_id="het",
            deployment=cluster.deployment,
            deadline_ms=settings.deadline_ms,
        ) as source,
    ):
        for index in range(settings.warmup + settings.frames):
            try:
                result = source.infer(frames[index % len(frames)], settings.timeout_s)
            except InferTimeoutError:
                degraded += 1
                continue
            if index < settings.warmup:
                continue
            if result.degraded:
                degraded += 1
                continue
            e2e.append(result.latency_ms)
            slowest.append(result.breakdown.get("e2e_ms", float("nan")))
            compute.append(result.breakdown.get("compute_ms", float("nan")))
    measured = Summary.of(e2e)
    return {
        "strategy": case.strategy,
        "bundle": str(case.bundle.root),
        "groups": len(case.plan.groups),
        "devices": len(specs),
        "time_scale": scale,
        "predicted_ms": predicted_ms,
        "predicted_unscaled_s": case.plan.predicted.all_up_latency_s,
        "measured_p50_ms": measured.p50,
        "measured_p99_ms": measured.p99,
        "aggregator_e2e_p50_ms": Summary.of(slowest).p50,
        "slowest_compute_p50_ms": Summary.of(compute).p50,
        "frames": measured.n,
        "degraded": degraded,
        "native_student_ms": {str(k): round(v, 4) for k, v in case.native_ms.items()},
        "in_cluster_compute_ms": {k: round(v, 4) for k, v in case.in_cluster_ms.items()},
        "emulated": [asdict(e) for e in emulated],
        "plan_groups": {
            g.id: {
                "partition": g.partition,
                "student": g.student.arch,
                "members": [m.device for m in g.members],
                "latency_s": g.latency_s,
            }
            for g in case.plan.groups
        },
    }


def run_heterogeneity(
    cases: Sequence[tuple[str, Path]],
    fleet: Fleet,
    settings: HeterogeneitySettings,
    out: ResultsDir,
    *,
    plots: bool = True,
) -> dict[str, Any]:
    prepared = [prepare(strategy, bundle, fleet, settings) for strategy, bundle in cases]
    # One time scale for every strategy, so their predictions stay comparable.
    scale = settings.time_scale or settings.margin * max(c.min_scale(fleet) for c in prepared)
    rows = [run_case(case, fleet, scale, settings) for case in prepared]
    report = {
        "benchmark": "heterogeneity",
        "machine": machine(),
        "settings": asdict(settings),
        "time_scale": scale,
        "fleet": {
            "source": fleet.source,
            "devices": [
                {"id": d.id, "flops": d.flops, "rate": d.rate, "outage": d.outage}
                for d in fleet.devices
            ],
        },
        "rows": rows,
        "note": "EMULATION: devices slowed down (--slowdown, --link-rate) on one machine; "
        "predicted = time scale x the plan's all-up latency",
    }
    out.write_json(report)
    out.write_csv(rows, columns=CSV_COLUMNS)
    if plots:
        plot_heterogeneity(rows, out.figure_path())
    return report


def plot_heterogeneity(rows: Sequence[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    figure, (bars, scatter) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["strategy"] for r in rows]
    x = np.arange(len(rows))
    predicted = [r["predicted_ms"] for r in rows]
    measured = [r["measured_p50_ms"] for r in rows]
    compute = [r["slowest_compute_p50_ms"] for r in rows]
    bars.bar(x - 0.27, predicted, 0.27, label="predicted (planner, scaled)")
    bars.bar(x, compute, 0.27, label="measured: emulated compute of the deciding partial, p50")
    bars.bar(x + 0.27, measured, 0.27, label="measured: end to end p50")
    bars.set_xticks(x, names)
    bars.set_ylabel("ms (emulated time scale)")
    bars.set_title("predicted vs measured latency per strategy")
    bars.set_ylim(0, max([*predicted, *measured, *compute, 1.0]) * 1.45)
    bars.legend(fontsize=7, loc="upper left")
    scatter.scatter(predicted, measured)
    for name, p, m in zip(names, predicted, measured, strict=True):
        scatter.annotate(name, (p, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
    top = max([*predicted, *measured, 1.0]) * 1.1
    scatter.plot([0, top], [0, top], ":", color="grey", label="measured = predicted")
    scatter.set_xlim(0, top)
    scatter.set_ylim(0, top)
    scatter.set_xlabel("predicted ms")
    scatter.set_ylabel("measured e2e p50 ms")
    scatter.legend(fontsize=8)
    for ax in (bars, scatter):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(report: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    table = Table(title=f"planner vs runtime on {report['fleet']['source']} (EMULATED devices)")
    for column in ("strategy", "groups", "scale", "predicted ms", "measured p50", "p99", "n"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for row in report["rows"]:
        table.add_row(
            row["strategy"],
            str(row["groups"]),
            f"{row['time_scale']:.3g}",
            f"{row['predicted_ms']:.1f}",
            f"{row['measured_p50_ms']:.1f}",
            f"{row['measured_p99_ms']:.1f}",
            str(row["frames"]),
        )
    return [table]
