"""A whole cluster on one machine: broker, device processes and an aggregator process.

Used by the demo, the benchmarks and the fault tests. Every node is a real OS process started
as ``python -m ...`` in its own process group (so a signal reaches the node and nothing else),
with its output in ``<log_dir>/<node>.log``. The cluster watches ``status/+`` to know who is
online and ready, and can crash (SIGKILL), freeze (SIGSTOP), thaw (SIGCONT), stop (SIGTERM) and
restart any node, and crash-restart the broker on the same port. ``close()`` (also run by the
context manager, on exceptions and Ctrl-C, and at interpreter exit) takes everything down.

Example::

    devices = [DeviceSpec("d0", 0), DeviceSpec("d1", 1), DeviceSpec("d2", 1, slowdown=3)]
    with LocalCluster(bundle_dir, devices) as cluster:
        cluster.kill("d1")
        ...  # frames go to cluster.url, deployment cluster.deployment
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import mqttinfer
from mqttinfer.errors import BrokerError, ConfigError, MqttInferError, ProtocolError
from mqttinfer.protocol import Status
from mqttinfer.runtime.bus import MQTT_PROTOCOLS, BrokerConfig, Bus, Message
from mqttinfer.runtime.local_broker import LocalBroker
from mqttinfer.topics import DEFAULT_DEPLOYMENT, Topics, check_id

log = logging.getLogger(__name__)

DEVICE_COMMAND = ("-m", "mqttinfer.runtime.cli", "device", "run")
AGGREGATOR_COMMAND = ("-m", "mqttinfer.runtime.aggregator_cli", "run")
AGGREGATOR_ID = "aggregator"
MQTT_VERSIONS = tuple(MQTT_PROTOCOLS)  # as BrokerConfig.mqtt_version; the URL's ?version=
_STOP_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device process: which partition it serves, in which group, with which extra args.

    ``slowdown`` > 1 adds ``--slowdown`` (emulated heterogeneity: the device sleeps
    ``(slowdown - 1) x`` its compute time after each inference); ``link_rate`` (bit/s) adds
    ``--link-rate`` (an emulated slow uplink: it sleeps 8 x partial bytes / rate before each
    publish).
    """

    id: str
    partition: int
    group: str | None = None
    slowdown: float = 1.0
    link_rate: float | None = None
    extra_args: tuple[str, ...] = ()

    def args(self) -> list[str]:
        out = ["--id", self.id, "--partition", str(self.partition)]
        out += ["--group", self.group or f"g{self.partition}"]
        if self.slowdown != 1.0:
            out += ["--slowdown", str(self.slowdown)]
        if self.link_rate is not None:
            out += ["--link-rate", repr(float(self.link_rate))]
        return out + list(self.extra_args)


@dataclass
class _Node:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    # Statuses with an older bdseq predate the last (re)start of the node or the broker.
    fresh_after_ms: int = 0


class StatusBoard:
    """The latest status of every node, keeping the highest ``bdseq`` (stale wills ignored)."""

    def __init__(self) -> None:
        self._latest: dict[str, Status] = {}
        self._cond = threading.Condition()
        self.rejected = 0

    def handle(self, message: Message) -> None:
        if not message.payload:
            return
        try:
            status = Status.decode(message.payload)
        except ProtocolError:
            self.rejected += 1
            return
        with self._cond:
            current = self._latest.get(status.node)
            if current is None or _supersedes(status, current):
                self._latest[status.node] = status
                self._cond.notify_all()

    def get(self, node: str) -> Status | None:
        with self._cond:
            return self._latest.get(node)

    def snapshot(self) -> dict[str, Status]:
        with self._cond:
            return dict(self._latest)

    def wait(self, predicate: Callable[[dict[str, Status]], bool], timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._latest), timeout=timeout_s)


def _is_ready(status: Status) -> bool:
    return status.state == "online" and status.serving == "ready"


def _supersedes(new: Status, old: Status) -> bool:
    if new.bdseq != old.bdseq:
        return new.bdseq > old.bdseq
    # Same connection: offline ends it; otherwise the later birth (serving changes) wins.
    return old.state == "online"


class LocalCluster:
    """Broker + N device processes + an aggregator process (see the module docstring)."""

    def __init__(
        self,
        bundle: Path | str,
        devices: Sequence[DeviceSpec],
        *,
        broker_url: str | None = None,
        deployment: str = DEFAULT_DEPLOYMENT,
        aggregator: bool = True,
        aggregator_args: Sequence[str] = (),
        device_args: Sequence[str] = (),
        stats_interval_s: float = 1.0,
        log_dir: Path | None = None,
        python: str = sys.executable,
        mqtt_version: str = "auto",
    ) -> None:
        if mqtt_version not in MQTT_VERSIONS:
            raise ConfigError(
                f"unknown MQTT version {mqtt_version!r}",
                field="mqtt_version",
                fix=f"use one of {', '.join(MQTT_VERSIONS)}",
            )
        self.mqtt_version = mqtt_version
        self.bundle = Path(bundle)
        self.deployment = check_id(deployment, "deployment")
        self.topics = Topics(deployment)
        self.python = python
        self.stats_interval_s = stats_interval_s
        self._device_args = list(device_args)
        self._own_logs = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="mqttinfer-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.broker: LocalBroker | None = None if broker_url else LocalBroker()
        self._broker_url = broker_url
        self.board = StatusBoard()
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.RLock()
        self._monitor: Bus | None = None
        self._closed = False
        ids = [spec.id for spec in devices]
        if len(set(ids)) != len(ids) or AGGREGATOR_ID in ids:
            raise ConfigError(
                f"device ids must be unique and not {AGGREGATOR_ID!r}: {ids}", field="devices"
            )
        for spec in devices:
            self._add(spec.id, self._device_argv(spec))
        if aggregator:
            argv = [self.python, *AGGREGATOR_COMMAND, "--id", AGGREGATOR_ID]
            argv += ["--bundle", str(self.bundle), "--stats-interval", str(stats_interval_s)]
            self._add(AGGREGATOR_ID, argv + list(aggregator_args))

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        """The broker URL every node and client of the cluster connects with."""
        if self._broker_url is not None:
            base = self._broker_url
        elif self.broker is None:  # unreachable: __init__ sets one or the other
            raise BrokerError("the cluster has no broker")
        else:
            base = self.broker.url
        if self.mqtt_version == "auto":
            return base
        return f"{base}{'&' if '?' in base else '?'}version={self.mqtt_version}"

    @property
    def nodes(self) -> list[str]:
        return list(self._nodes)

    @property
    def devices(self) -> list[str]:
        return [name for name in self._nodes if name != AGGREGATOR_ID]

    def log_path(self, node: str) -> Path:
        return self.log_dir / f"{node}.log"

    def log_tail(self, node: str, chars: int = 2000) -> str:
        try:
            return self.log_path(node).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self, node: str) -> bool:
        proc = self._node(node).proc
        return proc is not None and proc.poll() is None

    def status(self, node: str) -> Status | None:
        return self.board.get(node)

    def pid(self, node: str) -> int | None:
        """The node's process id while it runs (for ``/proc`` readings), else None."""
        proc = self._node(node).proc
        return proc.pid if proc is not None and self.alive(node) else None

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 60.0) -> LocalCluster:
        """Start the broker (unless a URL was given), the monitor, then every node; wait ready."""
        atexit.register(self.close)
        try:
            if self.broker is not None:
                self.broker.start()
            self._start_monitor()
            for name in self._nodes:
                self._spawn(name)
            self.wait_ready(self.nodes, timeout_s)
        except BaseException:
            self._own_logs = False  # keep the logs: they say why
            self.close()
            raise
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """SIGTERM every node (thawing frozen ones), SIGKILL stragglers, stop the broker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for name in self._nodes:
            self._terminate(name)
        deadline = time.monotonic() + _STOP_GRACE_S
        for name in self._nodes:
            self._reap(name, max(0.1, deadline - time.monotonic()))
        if self._monitor is not None:
            self._monitor.stop()
        if self.broker is not None:
            self.broker.close()
        if self._own_logs and not os.environ.get("MQTTINFER_KEEP_LOGS"):
            shutil.rmtree(self.log_dir, ignore_errors=True)
        atexit.unregister(self.close)

    # ------------------------------------------------------------------ waiting
    def wait_ready(self, nodes: Iterable[str], timeout_s: float = 60.0) -> None:
        """Wait until each node announced ``serving=ready`` since its last (re)start."""
        self._wait(
            nodes, timeout_s, "ready", lambda s: s.state == "online" and s.serving == "ready"
        )

    def wait_offline(self, nodes: Iterable[str], timeout_s: float = 30.0) -> None:
        """Wait until each node is known offline (its will, or its clean stop)."""
        self._wait(nodes, timeout_s, "offline", lambda s: s.state == "offline", fresh=False)

    def _wait(
        self,
        nodes: Iterable[str],
        timeout_s: float,
        what: str,
        check: Callable[[Status], bool],
        *,
        fresh: bool = True,
    ) -> None:
        names = list(nodes)
        deadline = time.monotonic() + timeout_s

        def done(latest: dict[str, Status]) -> bool:
            return all(self._matches(name, latest.get(name), check, fresh) for name in names)

        while not self.board.wait(done, timeout_s=min(0.25, timeout_s)):
            for name in names:
                node = self._node(name)
                if fresh and node.proc is not None and node.proc.poll() is not None:
                    raise MqttInferError(
                        f"{name} exited with code {node.proc.returncode} before it was {what}; "
                        f"its log ({self.log_path(name)}) ends:\n{self.log_tail(name)}"
                    )
            if time.monotonic() >= deadline:
                missing = [n for n in names if not self._matches(n, self.status(n), check, fresh)]
                raise MqttInferError(
                    f"{', '.join(missing)} not {what} within {timeout_s:.0f} s "
                    f"(logs in {self.log_dir})"
                )

    def _matches(
        self, name: str, status: Status | None, check: Callable[[Status], bool], fresh: bool
    ) -> bool:
        if status is None or not check(status):
            return False
        # bdseq is seeded from the wall clock at connect: older ones belong to a former process.
        return not fresh or status.bdseq >= self._node(name).fresh_after_ms

    # ------------------------------------------------------------------ faults
    def kill(self, node: str) -> None:
        """SIGKILL: a crash. The broker publishes the node's will once it notices."""
        self._signal(node, signal.SIGKILL)
        self._reap(node, 10.0)

    def terminate(self, node: str, timeout_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM: a clean stop (the node publishes offline itself)."""
        self._terminate(node)
        self._reap(node, timeout_s)

    def pause(self, node: str) -> None:
        """SIGSTOP: the node freezes; the broker declares it dead after 1.5 x keepalive."""
        self._signal(node, signal.SIGSTOP)

    def resume(self, node: str) -> None:
        """SIGCONT: the node wakes up, notices the lost connection and reconnects."""
        self._signal(node, signal.SIGCONT)

    def restart(self, node: str, *, wait_s: float | None = 60.0) -> None:
        """Kill the node if it runs, start it again, and wait until it is ready."""
        if self.alive(node):
            self.kill(node)
        self._spawn(node)
        if wait_s is not None:
            self.wait_ready([node], wait_s)

    def add_device(self, spec: DeviceSpec, *, wait_s: float | None = 60.0) -> None:
        """Start one more device (e.g. a spare joining a group)."""
        if spec.id in self._nodes:
            raise ConfigError(f"node {spec.id!r} already exists", field="id")
        self._add(spec.id, self._device_argv(spec))
        self.restart(spec.id, wait_s=wait_s)

    def restart_broker(self, *, down_s: float = 0.0, crash: bool = True) -> None:
        """Crash (SIGKILL) or stop the broker, stay down ``down_s``, restart on the same port."""
        if self.broker is None:
            raise BrokerError("the cluster did not start the broker, so it cannot restart it")
        if crash:
            self.broker.kill()
        else:
            self.broker.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.broker.start()
        # Readiness now means a birth from a connection to the restarted broker.
        restarted_ms = int(time.time() * 1000)
        for node in self._nodes.values():
            node.fresh_after_ms = restarted_ms

    # ------------------------------------------------------------------ processes
    def _device_argv(self, spec: DeviceSpec) -> list[str]:
        argv = [self.python, *DEVICE_COMMAND, *spec.args(), "--bundle", str(self.bundle)]
        return [*argv, "--stats-interval", str(self.stats_interval_s), *self._device_args]

    def _add(self, name: str, argv: list[str]) -> None:
        check_id(name, "node")
        self._nodes[name] = _Node(name, argv)

    def _node(self, name: str) -> _Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise ConfigError(f"no node {name!r} in this cluster", field="node") from None

    def _start_monitor(self) -> None:
        monitor = Bus(
            BrokerConfig.from_url(self.url),
            node=f"cluster-{uuid.uuid4().hex[:8]}",
            kind="monitor",
            topics=self.topics,
        )
        monitor.subscribe(self.topics.all_status, self.board.handle, qos=1)
        monitor.start()
        if not monitor.wait_connected(15):
            monitor.stop()
            raise BrokerError(f"cannot connect to the broker at {self.url}")
        self._monitor = monitor

    def _spawn(self, name: str) -> None:
        node = self._node(name)
        with self._lock:
            if self._closed:
                raise MqttInferError("the cluster is closed")
            if node.log_file is not None:
                node.log_file.close()
            node.log_file = self.log_path(name).open("ab")
            argv = [*node.argv, "--broker", self.url, "--deployment", self.deployment]
            node.fresh_after_ms = int(time.time() * 1000)
            node.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=node.log_file,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                start_new_session=True,  # its own process group: signals reach it alone
            )
        log.info("started %s (pid %d)", name, node.proc.pid)

    def _signal(self, name: str, sig: signal.Signals) -> None:
        proc = self._node(name).proc
        if proc is None or proc.poll() is not None:
            raise MqttInferError(f"{name} is not running")
        os.killpg(proc.pid, sig)

    def _terminate(self, name: str) -> None:
        proc = self._node(name).proc
        if proc is None or proc.poll() is not None:
            return
        # A frozen process cannot handle SIGTERM: thaw it first.
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return

    def _reap(self, name: str, timeout_s: float) -> None:
        node = self._node(name)
        if node.proc is not None:
            try:
                node.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM; killing it", name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)
        if node.log_file is not None:
            node.log_file.close()
            node.log_file = None


def _child_env() -> dict[str, str]:
    """Children import this very mqttinfer, installed or not, and log unbuffered."""
    root = str(Path(mqttinfer.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{root}{os.pathsep}{path}" if path else root
    env["PYTHONUNBUFFERED"] = "1"
    env["MQTTINFER_EXIT_WITH_PARENT"] = "1"  # no orphans if this process dies unannounced
    return env
