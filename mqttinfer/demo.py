"""``mqttinfer demo``: a whole deployment on this machine, failures injected, results summarised.

What it runs: a private broker (Mosquitto; amqtt only as a fallback, see ``demo_broker``), one
device process per replica (:func:`demo_layout`: 3 groups of 2 replicas for the shipped K=3
bundle), an aggregator process, and a camera source in this process streaming Fashion-MNIST
test images with a bounded number of frames in flight. Four phases stream the same first N
images:

1. ``intact``: every device up;
2. ``replica_killed``: one replica of one group is killed with SIGKILL (its twin answers, so
   no frame may come back degraded);
3. ``group_killed``: the other replica is killed too, so one partition has no live replica;
   the aggregator learns it from the devices' wills and answers at once, degraded, with the
   partition listed as missing;
4. ``recovered``: both are restarted; the phase starts once they announce ``ready``.

Every process it starts runs in its own process group and is stopped on the way out: at the
end, on errors, on Ctrl-C (SIGINT), SIGTERM and SIGHUP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer
from rich.console import Console
from rich.text import Text

from mqttinfer.bundle import Bundle, demo_bundle_path
from mqttinfer.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_fashion_mnist,
    load_npz,
)
from mqttinfer.demo_broker import BrokerChoice, EmbeddedBroker, choose_broker
from mqttinfer.demo_tally import Answer, PhaseSummary, PhaseTally
from mqttinfer.demo_view import DemoState, DeviceLine, live_view, phase_table
from mqttinfer.errors import BrokerError, BundleError, ConfigError, DependencyError, MqttInferError
from mqttinfer.runtime.cluster import DeviceSpec, LocalCluster
from mqttinfer.runtime.source import Result, Source

log = logging.getLogger(__name__)

SAMPLE_NAME = "fmnist-test-1000.npz"
SOURCE_ID = "demo-cam"
DEPLOYMENT = "demo"
REPLICAS = ("a", "b")
PHASES = (
    ("intact", "intact"),
    ("replica_killed", "replica killed"),
    ("group_killed", "group killed"),
    ("recovered", "recovered"),
)
# A frame still unanswered this long after its deadline is lost (a result after that is late).
_LOST_GRACE_S = 3.0
# Far above the p99 latency of a loaded 2-core machine (~150 ms with 16 frames in flight), so
# no frame comes back degraded while a replica of every partition lives; the pure-Python
# amqtt broker is about three times slower, and its first frames took up to a second.
DEADLINE_MS = 2000
# Paced, so that latencies show the system rather than the queue of a flood, and the four
# phases take about 40 s; a machine that cannot keep up is held back by the window instead.
RATE = 100.0
AMQTT_DEADLINE_MS = 5000
_OFFLINE_WAIT_S = 15.0
_POLL_S = 0.05
_ACCURACY_TOLERANCE = 0.01
_RECORDED_KEY = "first_1000"
_RECORDED_FRAMES = 1000
_PIPE_WIDTH = 110
# How long stopping may wait for the source's network thread before going on without it.
_SOURCE_CLOSE_S = 5.0


# --------------------------------------------------------------------------- the fleet
@dataclass(frozen=True, slots=True)
class DemoGroup:
    """Replicas serving one partition."""

    id: str
    partition: int
    devices: tuple[str, ...]


def demo_layout(partitions: int) -> tuple[DemoGroup, ...]:
    """One group of two replicas per partition: ``g<k>`` = devices ``g<k>-a`` and ``g<k>-b``.

    The layout lives here, not in ``plans/demo.yaml``: a plan (``mqttinfer/planner/plan.py``)
    pins each group's filter ids and student to one bundle, while the demo serves whichever
    bundle ``--bundle`` names, starts each device on its partition directly (no ``plan apply``),
    and must work from an installed package, which does not carry ``plans/``.
    """
    return tuple(
        DemoGroup(f"g{k}", k, tuple(f"g{k}-{replica}" for replica in REPLICAS))
        for k in range(partitions)
    )


def victim_group(groups: tuple[DemoGroup, ...]) -> DemoGroup:
    """The group whose replicas the demo kills: the middle one (g1 of three)."""
    return groups[len(groups) // 2]


# --------------------------------------------------------------------------- frames
@dataclass(frozen=True, slots=True)
class DemoFrames:
    x: npt.NDArray[np.uint8]
    y: npt.NDArray[np.int64]
    kind: str  # "debian" or "sample"
    description: str


def sample_path() -> Path:
    """The 1000 test images shipped in the package (``scripts/make_demo_sample.py``)."""
    return Path(str(resources.files("mqttinfer"))) / "data" / SAMPLE_NAME


def load_demo_frames(
    count: int, *, root: Path = FASHION_MNIST_DIR, sample: Path | None = None
) -> DemoFrames:
    """The first ``count`` Fashion-MNIST test images: from the Debian package when installed,
    else from the sample shipped in the package (ConfigError when it has too few)."""
    try:
        full = load_fashion_mnist(root)
        kind, description = (
            "debian",
            f"Fashion-MNIST test set, Debian dataset-fashion-mnist ({root})",
        )
    except DependencyError:
        path = sample or sample_path()
        full = load_npz(path)
        kind = "sample"
        description = (
            f"the first {len(full)} Fashion-MNIST test images shipped with mqttinfer ({path.name});"
            " install dataset-fashion-mnist for all 10000"
        )
    if full.y is None:  # the shipped sample and the Debian files both have labels
        raise ConfigError("the demo images have no labels", source=description)
    if not 0 < count <= len(full):
        raise ConfigError(
            f"--frames {count} is not in 1..{len(full)} (the images available)",
            field="--frames",
            fix=f"pass --frames {min(len(full), 1000)}",
        )
    return DemoFrames(full.x[:count], full.y[:count], kind, description)


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True, slots=True)
class DemoSettings:
    """The demo's options (see ``demo`` for their meaning)."""

    bundle: Path
    frames: int = 1000
    rate: float = RATE
    window: int = 16
    deadline_ms: int | None = None  # None: DEADLINE_MS, or AMQTT_DEADLINE_MS on amqtt
    broker: str | None = None
    ready_timeout_s: float = 120.0
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ConfigError("--window must be at least 1", field="--window")
        if self.rate < 0:
            raise ConfigError(
                "--rate must be >= 0 (0: as fast as the window allows)", field="--rate"
            )
        if self.deadline_ms is not None and not 1 <= self.deadline_ms <= 600_000:
            raise ConfigError("--deadline-ms must be in 1..600000", field="--deadline-ms")


# --------------------------------------------------------------------------- signals
@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt like Ctrl-C, so cleanup runs for all three.

    A signal the demo was started with ignored stays ignored: ``nohup`` ignores SIGHUP, and a
    non-interactive shell starts background jobs (``cmd &``) with SIGINT ignored, which Python
    honours; the demo says so, since Ctrl-C (or ``kill -INT``) will then not stop it.
    """

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        log.warning(
            "SIGINT is ignored in this process (started in the background by a "
            "non-interactive shell?): Ctrl-C will not stop the demo; use kill -TERM %d",
            os.getpid(),
        )
    previous = {
        sig: signal.signal(sig, interrupt)
        for sig in (signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _close_within(close: Callable[[], None], timeout_s: float, what: str) -> None:
    """Run ``close`` on a daemon thread and wait at most ``timeout_s`` for it.

    Ctrl-C raises KeyboardInterrupt wherever the main thread is, possibly inside the result
    condition that the source's network thread also takes; a wedged network thread must not
    keep the demo from stopping the processes it started.
    """
    thread = threading.Thread(target=close, name=f"close {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("%s did not close within %.0f s; stopping the rest anyway", what, timeout_s)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """While stopping the processes, a second Ctrl-C must not cut the cleanup short."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the run
class DemoRun:
    """One demo: start the deployment, run the phases, stop everything (``run``)."""

    def __init__(self, settings: DemoSettings, console: Console) -> None:
        self.settings = settings
        self.console = console
        self.bundle = Bundle.load(settings.bundle)
        self.frames = load_demo_frames(settings.frames)
        self._check_shapes()
        self.groups = demo_layout(self.bundle.num_partitions)
        self.victims = victim_group(self.groups)
        self.broker: BrokerChoice = (
            BrokerChoice("external", f"the broker at {settings.broker}")
            if settings.broker
            else choose_broker()
        )
        self.deployment = DEPLOYMENT if not settings.broker else f"demo-{uuid.uuid4().hex[:6]}"
        self.deadline_ms = settings.deadline_ms or (
            AMQTT_DEADLINE_MS if self.broker.kind == "amqtt" else DEADLINE_MS
        )
        self.lost_after_s = self.deadline_ms / 1000.0 + _LOST_GRACE_S
        self.state = DemoState(self._title(), [], PHASES, settings.frames)
        self.summaries: dict[str, PhaseSummary] = {}
        self._embedded: EmbeddedBroker | None = None
        self._temp_dir: Path | None = None
        self._cluster: LocalCluster | None = None
        self._source: Source | None = None
        self._killed: set[str] = set()
        self._answered = threading.Condition()

    @property
    def recorded_accuracy(self) -> float | None:
        value = self.bundle.accuracy.get(_RECORDED_KEY)
        return float(value) if isinstance(value, (int, float)) else None

    def _check_shapes(self) -> None:
        expected = tuple(self.bundle.input.shape)
        got = tuple(self.frames.x.shape[1:])
        if expected != got:
            raise BundleError(
                f"the bundle takes {list(expected)} inputs, the demo streams Fashion-MNIST "
                f"{list(got)} images",
                source=str(self.settings.bundle),
                field="input.shape",
                fix="pass --bundle with a Fashion-MNIST bundle (or omit it for the shipped one)",
            )

    def _title(self) -> str:
        devices = sum(len(g.devices) for g in self.groups)
        return (
            f"mqttinfer demo: {self.bundle.name} (K={self.bundle.num_partitions}) on {devices} "
            f"devices in {len(self.groups)} groups of {len(REPLICAS)} replicas"
        )

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> dict[str, Any]:
        """Start, run the phases, stop; returns the JSON report."""
        started = time.monotonic()
        try:
            self._start()
            with live_view(self.state, self.console, self.recorded_accuracy):
                self.state.event(f"{len(self.state.devices())} devices and the aggregator ready")
                for key, _title in PHASES:
                    self._phase(key)
        finally:
            with signals_ignored():
                self._stop()
        return self.report(time.monotonic() - started)

    def _start(self) -> None:
        url = self.settings.broker
        if self.broker.kind == "amqtt":
            self._embedded = EmbeddedBroker(self._broker_log_dir() / "amqtt.log").start()
            url = self._embedded.url
        specs = [
            DeviceSpec(device, group.partition, group=group.id)
            for group in self.groups
            for device in group.devices
        ]
        self._cluster = LocalCluster(
            self.settings.bundle,
            specs,
            broker_url=url,
            deployment=self.deployment,
            aggregator_args=["--deadline-ms", str(self.deadline_ms)],
            device_args=["--queue-size", str(max(16, 2 * self.settings.window))],
            log_dir=self.settings.log_dir,
        )
        self.console.print(
            Text(f"starting the broker, {len(specs)} devices and the aggregator …", style="dim")
        )
        self._cluster.start(timeout_s=self.settings.ready_timeout_s)
        self.state.devices = self._device_lines
        self.state.details = self._details(self._cluster)
        self._source = Source(
            self._cluster.url,
            source_id=SOURCE_ID,
            deployment=self.deployment,
            deadline_ms=self.deadline_ms,
            on_result=self._on_result,
            classes=list(self.bundle.classes) or FASHION_MNIST_CLASSES,
            result_timeout_s=self.lost_after_s + 1.0,
        ).start()

    def _details(self, cluster: LocalCluster) -> list[str]:
        rate = f"{self.settings.rate:g}/s" if self.settings.rate else "as fast as the window allows"
        return [
            f"broker: {self.broker.note}, {cluster.url}, deployment {self.deployment}",
            f"frames: {self.frames.description}",
            f"{self.settings.frames} frames per phase, {self.settings.window} in flight at most, "
            f"{rate}; deadline {self.deadline_ms} ms",
            f"watch it: mqttinfer monitor --broker '{cluster.url}' --deployment {self.deployment}",
        ]

    def _broker_log_dir(self) -> Path:
        if self.settings.log_dir is not None:
            self.settings.log_dir.mkdir(parents=True, exist_ok=True)
            return self.settings.log_dir
        self._temp_dir = Path(tempfile.mkdtemp(prefix="mqttinfer-demo-"))
        return self._temp_dir

    def _stop(self) -> None:
        source, self._source = self._source, None
        cluster, self._cluster = self._cluster, None
        embedded, self._embedded = self._embedded, None
        if source is not None:
            _close_within(source.close, _SOURCE_CLOSE_S, "the source")
        if cluster is not None:
            cluster.close()
        if embedded is not None:
            embedded.close()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    # ------------------------------------------------------------------ phases
    def _phase(self, key: str) -> None:
        group = self.victims
        first, second = group.devices[0], group.devices[-1]
        if key == "intact":
            self.state.caption = "intact: every device up"
        elif key == "replica_killed":
            self._kill(first)
            self.state.caption = (
                f"replica killed: {first} is gone; {second} still serves partition "
                f"{group.partition}, so no frame may come back degraded"
            )
        elif key == "group_killed":
            self._kill(second)
            self.state.caption = (
                f"group killed: {group.id} has no live replica; results keep coming, degraded, "
                f"partition {group.partition} zero-filled and listed"
            )
        elif key == "recovered":
            self._restart(group.devices)
            self.state.caption = f"recovered: {', '.join(group.devices)} restarted and ready"
        tally = PhaseTally(key, self.lost_after_s)
        self.state.tallies[key] = tally
        self.state.current = key
        self.state.event(f"phase {key}: streaming {self.settings.frames} frames", "bold")
        self._stream(tally)
        self.state.current = None
        summary = tally.summary()
        self.summaries[key] = summary
        self.state.event(_summary_line(summary))

    def _kill(self, device: str) -> None:
        cluster = self._require_cluster()
        cluster.kill(device)
        self._killed.add(device)
        self.state.event(f"kill -9 {device}", "bold red")
        try:
            cluster.wait_offline([device], _OFFLINE_WAIT_S)
            self.state.event(f"{device} offline (its will, published by the broker)", "red")
        except MqttInferError:
            self.state.event(
                f"{device}: no offline status within {_OFFLINE_WAIT_S:.0f} s; "
                "frames will wait for their deadline",
                "yellow",
            )

    def _restart(self, devices: tuple[str, ...]) -> None:
        cluster = self._require_cluster()
        for device in devices:
            cluster.restart(device, wait_s=None)
            self._killed.discard(device)
            self.state.event(f"restarted {device}", "yellow")
        cluster.wait_ready(devices, self.settings.ready_timeout_s)
        self.state.event(f"{', '.join(devices)} ready", "green")

    def _require_cluster(self) -> LocalCluster:
        if self._cluster is None:
            raise MqttInferError("the demo cluster is not running")
        return self._cluster

    # ------------------------------------------------------------------ streaming
    def _stream(self, tally: PhaseTally) -> None:
        source = self._source
        if source is None:
            raise MqttInferError("the demo source is not running")
        rate = self.settings.rate
        start = time.monotonic()
        for index in range(self.settings.frames):
            if rate > 0:
                _sleep_until(start + index / rate)
            self._wait_until(tally, lambda: tally.in_flight < self.settings.window)
            frame_id = source.next_frame_id()
            tally.sent(frame_id, time.monotonic())
            try:
                source.publish(self.frames.x[index], int(self.frames.y[index]), frame_id=frame_id)
            except BrokerError as exc:
                tally.unsent(frame_id)
                log.warning("frame not sent: %s", exc)
        self._wait_until(tally, lambda: tally.in_flight == 0)

    def _wait_until(self, tally: PhaseTally, done: Callable[[], bool]) -> None:
        """Wait for results until ``done``; frames past their lost time are expired meanwhile."""
        while True:
            tally.expire(time.monotonic())
            with self._answered:
                if done() or (self._answered.wait(_POLL_S) and done()):
                    return

    def _on_result(self, result: Result) -> None:
        """Network thread: credit the result to the phase that sent its frame."""
        answer = Answer(
            frame_id=result.frame_id,
            correct=result.correct,
            degraded=result.degraded,
            missing=result.missing,
            reason=result.reason,
            latency_ms=result.latency_ms,
        )
        now = time.monotonic()
        for tally in reversed(list(self.state.tallies.values())):
            if tally.answered(answer, now):
                break
        with self._answered:
            self._answered.notify_all()

    # ------------------------------------------------------------------ view
    def _device_lines(self) -> list[DeviceLine]:
        cluster = self._cluster
        if cluster is None:
            return []
        lines = []
        for group in self.groups:
            for device in group.devices:
                status = cluster.status(device)
                if device in self._killed:
                    state = "killed"
                elif status is None:
                    state = "starting"
                elif status.state == "offline":
                    state = "offline"
                else:
                    state = "ready" if status.serving == "ready" else status.serving
                lines.append(DeviceLine(device, group.id, group.partition, state))
        return lines

    # ------------------------------------------------------------------ report
    def report(self, duration_s: float) -> dict[str, Any]:
        """The machine-readable summary (``--json``)."""
        checks = self.checks()
        return {
            "bundle": {
                "path": str(self.settings.bundle),
                "name": self.bundle.name,
                "partitions": self.bundle.num_partitions,
                "recorded_accuracy": self.recorded_accuracy,
                "recorded_accuracy_key": _RECORDED_KEY,
            },
            "data": {"kind": self.frames.kind, "description": self.frames.description},
            "broker": {"kind": self.broker.kind, "note": self.broker.note},
            "deployment": self.deployment,
            "settings": {
                "frames_per_phase": self.settings.frames,
                "window": self.settings.window,
                "rate": self.settings.rate,
                "deadline_ms": self.deadline_ms,
            },
            "groups": [
                {"id": g.id, "partition": g.partition, "devices": list(g.devices)}
                for g in self.groups
            ],
            "killed_group": {"id": self.victims.id, "partition": self.victims.partition},
            "phases": {key: s.as_json() for key, s in self.summaries.items()},
            "checks": checks,
            "ok": all(value is not False for value in checks.values()),
            "duration_s": round(duration_s, 1),
        }

    def checks(self) -> dict[str, bool | None]:
        """The demo's promises; None where one does not apply (e.g. N != 1000 for accuracy)."""
        phases = self.summaries
        if len(phases) != len(PHASES):
            return {"completed": False}
        steady = (phases["intact"], phases["replica_killed"])
        lost_group = phases["group_killed"]
        recorded = self.recorded_accuracy
        comparable = recorded is not None and self.settings.frames == _RECORDED_FRAMES
        return {
            "no_frame_lost": all(s.lost == 0 and s.results == s.frames for s in phases.values()),
            "not_degraded_while_a_replica_lives": all(s.degraded == 0 for s in steady),
            "degraded_without_the_group": lost_group.degraded == lost_group.results
            and self.victims.partition in lost_group.missing_partitions,
            "accuracy_matches_bundle": (
                all(
                    s.accuracy is not None
                    and abs(s.accuracy - (recorded or 0.0)) <= _ACCURACY_TOLERANCE
                    for s in steady
                )
                if comparable
                else None
            ),
        }


def _summary_line(summary: PhaseSummary) -> str:
    accuracy = "–" if summary.accuracy is None else f"{100 * summary.accuracy:.1f} %"
    p50 = "–" if summary.p50_ms is None else f"{summary.p50_ms:.1f}"
    p99 = "–" if summary.p99_ms is None else f"{summary.p99_ms:.1f}"
    missing = ",".join(str(p) for p in summary.missing_partitions) or "none"
    return (
        f"{summary.phase}: {summary.results}/{summary.frames} results, accuracy {accuracy}, "
        f"p50 {p50} ms, p99 {p99} ms, degraded {summary.degraded} (missing {missing}), "
        f"lost {summary.lost}"
    )


def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def print_summary(run: DemoRun, report: dict[str, Any], console: Console) -> None:
    """The final table and the checks, for people."""
    console.print(Text(run.state.title, style="bold"))
    for line in run.state.details[:3]:
        console.print(Text(line, style="dim"))
    console.print(phase_table(run.state, run.summaries, run.recorded_accuracy))
    for name, value in report["checks"].items():
        mark, style = {True: ("ok", "green"), False: ("FAILED", "bold red")}.get(
            value, ("n/a", "dim")
        )
        console.print(Text(f"  {mark:6} {name.replace('_', ' ')}", style=style))
    console.print(Text(f"finished in {report['duration_s']:.0f} s", style="dim"))


# --------------------------------------------------------------------------- CLI
def demo(
    *,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Model bundle directory (default: the shipped fmnist-demo bundle)."),
    ] = None,
    frames: Annotated[
        int, typer.Option("--frames", "-n", help="Test images streamed in each of the 4 phases.")
    ] = 1000,
    rate: Annotated[
        float, typer.Option(help="Frames per second at most; 0: as fast as --window allows.")
    ] = RATE,
    window: Annotated[int, typer.Option(help="Frames in flight (sent, unanswered) at most.")] = 16,
    deadline_ms: Annotated[
        int | None,
        typer.Option(
            help=f"Each frame's deadline at the aggregator, in ms (default {DEADLINE_MS}; "
            f"{AMQTT_DEADLINE_MS} on the amqtt fallback)."
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(help="Use this running broker (mqtt://host:port) instead of a private one."),
    ] = None,
    logs: Annotated[
        Path | None, typer.Option(help="Keep every process's log in this folder.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    """Run a local cluster, kill a replica, then its group, restart them; results keep coming.

    Starts a private broker, 6 device processes (3 groups of 2 replicas) and an aggregator,
    and streams the same Fashion-MNIST test images through four phases. Exit code 1 when a
    promise of the demo was broken (a frame lost, or degraded while a replica lived).
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    console = Console(stderr=as_json, highlight=False)
    if not console.is_terminal:  # logs and pipes: wide enough for the summary table
        console = Console(stderr=as_json, highlight=False, width=_PIPE_WIDTH)
    try:
        settings = DemoSettings(
            bundle=bundle or _default_bundle(),
            frames=frames,
            rate=rate,
            window=window,
            deadline_ms=deadline_ms,
            broker=broker,
            log_dir=logs,
        )
        with interrupt_on_signals():
            run = DemoRun(settings, console)
            report = run.run()
    except KeyboardInterrupt:
        console.print("interrupted: every process the demo started is stopped", style="yellow")
        raise typer.Exit(130) from None
    except MqttInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        print_summary(run, report, console)
    if not report["ok"]:
        raise typer.Exit(1)


def _default_bundle() -> Path:
    path = demo_bundle_path()
    if not (path / "bundle.json").is_file():
        raise BundleError(
            "the demo bundle is not installed",
            source=str(path),
            fix="pass --bundle DIR, or build it with 'make bundle'",
        )
    return path
