"""``mqttinfer monitor``: a live table of a deployment, from ``status/+`` and ``stats/+`` only.

The monitor never talks to a node: it subscribes to the retained statuses (births and wills) and
the periodic stats every node publishes, decodes them (a bad message is counted and logged,
never fatal) and feeds :class:`mqttinfer.monitor_state.MonitorState`, which holds the rules. It
connects like any node, so it announces itself on ``status/<its id>`` too; its id is
``monitor-<host>`` (one retained status per host, however often a script runs ``--once``),
with a unique client id so that two monitors on one host do not push each other off the broker.

``--once --json`` collects for ``--settle`` seconds (long enough for two stats from each node),
prints one JSON document (``MonitorState.snapshot``) and exits: for scripts and tests.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mqttinfer.errors import BrokerError, MqttInferError, ProtocolError
from mqttinfer.monitor_state import AGGREGATOR_RATES, MonitorState, NodeView
from mqttinfer.protocol import Stats, Status
from mqttinfer.runtime.bus import BrokerConfig, Bus, Message
from mqttinfer.runtime.cli import DEFAULT_BROKER, BrokerOption, DeploymentOption
from mqttinfer.topics import DEFAULT_DEPLOYMENT, Topics

log = logging.getLogger(__name__)

STATUS_QOS = 1
STATS_QOS = 0
_LOG_PAYLOAD_BYTES = 48
_FLEET_KINDS = frozenset({"device", "aggregator"})
_STATE_STYLES = {"online": "green", "offline": "red", "unknown": "yellow"}
_PIPE_WIDTH = 200


def default_monitor_id() -> str:
    """``monitor-<host>``, cut to a valid node id."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:48] or "host"
    return f"monitor-{host}"


class Monitor:
    """A subscriber that keeps a :class:`MonitorState` of one deployment up to date."""

    def __init__(
        self,
        broker: str | BrokerConfig,
        deployment: str = DEFAULT_DEPLOYMENT,
        *,
        node: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config = broker if isinstance(broker, BrokerConfig) else BrokerConfig.from_url(broker)
        self.topics = Topics(deployment)
        self.node = node or default_monitor_id()
        self.state = MonitorState(ignore=[self.node])
        self._clock = clock
        self._lock = threading.Lock()
        self.bus = Bus(
            config,
            node=self.node,
            kind="monitor",
            topics=self.topics,
            client_id=f"mqttinfer-monitor-{uuid.uuid4().hex[:12]}",
        )
        self.bus.subscribe(self.topics.all_status, self.on_status, qos=STATUS_QOS)
        self.bus.subscribe(self.topics.all_stats, self.on_stats, qos=STATS_QOS)

    def start(self, timeout_s: float = 10.0) -> Monitor:
        self.bus.start()
        if not self.bus.wait_connected(timeout_s):
            self.bus.stop()
            raise BrokerError(f"monitor: cannot connect to {self.bus.config.url}")
        return self

    def stop(self) -> None:
        self.bus.stop()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ network thread
    def on_status(self, message: Message) -> None:
        try:
            node = self.topics.last_level(message.topic, "status")
            if not message.payload:  # a retained status being deleted
                with self._lock:
                    self.state.on_status_cleared(node)
                return
            status = Status.decode(message.payload)
            if status.node != node:
                raise ProtocolError(f"node {status.node!r} on {node!r}'s topic", kind="status")
        except ProtocolError as exc:
            self._reject("status", message, exc)
            return
        with self._lock:
            self.state.on_status(status, message.received)

    def on_stats(self, message: Message) -> None:
        try:
            node = self.topics.last_level(message.topic, "stats")
            stats = Stats.decode(message.payload)
            if stats.node != node:
                raise ProtocolError(f"node {stats.node!r} on {node!r}'s topic", kind="stats")
        except ProtocolError as exc:
            self._reject("stats", message, exc)
            return
        with self._lock:
            self.state.on_stats(stats, message.received)

    def _reject(self, kind: str, message: Message, exc: Exception) -> None:
        with self._lock:
            self.state.on_rejected(kind)
        log.warning(
            "ignoring a bad %s message on %s: %s (%r...)",
            kind,
            message.topic[:160],
            str(exc)[:200],
            message.payload[:_LOG_PAYLOAD_BYTES],
        )

    # ------------------------------------------------------------------ reading
    def views(self) -> list[NodeView]:
        with self._lock:
            return self.state.views(self._clock())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            document = self.state.snapshot(self._clock())
        document["broker"] = self.bus.config.url
        document["deployment"] = self.topics.deployment
        return document


# --------------------------------------------------------------------------- rendering
def _num(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _role(view: NodeView) -> str:
    if view.group is None and view.partition is None:
        return ""
    return f"{view.group or '?'}/{view.partition if view.partition is not None else '?'}"


def node_table(views: list[NodeView], *, show_all: bool = False) -> Table:
    """One row per node; offline clients (sources, monitors) only with ``show_all``."""
    table = Table(expand=False, pad_edge=False)
    columns = (
        "node",
        "kind",
        "state",
        "bdseq",
        "group/part.",
        "serving",
        "frames",
        "per s",
        "p50 ms",
        "p99 ms",
        "errors/rejected",
        "stats age",
    )
    for name in columns:
        table.add_column(name, justify="left" if name in columns[:6] else "right")
    for view in views:
        if not show_all and view.kind not in _FLEET_KINDS and view.state != "online":
            continue
        state = Text(view.state, style=_STATE_STYLES.get(view.state, ""))
        if view.state == "offline" and view.clean:
            state.append(" (clean)", style="dim")
        serving = Text(view.serving or "", style="red" if view.serving == "error" else "")
        per_s = view.rates.get("answered", view.rates.get("frames"))
        age = _num(view.stats_age_s) + (" stale" if view.stats_stale else "")
        table.add_row(
            Text(view.node, style="bold"),
            view.kind,
            state,
            _num(view.bdseq),
            _role(view),
            serving,
            _num(view.frames),
            _num(per_s),
            _num(view.p50_ms, 2),
            _num(view.p99_ms, 2),
            f"{_num(view.errors)}/{_num(view.rejected)}",
            Text(age, style="yellow" if view.stats_stale else "dim"),
        )
    return table


def aggregator_lines(snapshot: dict[str, Any]) -> list[Text]:
    lines = []
    for aggregator in snapshot["aggregators"]:
        rates = aggregator["per_s"]
        parts = [f"{name.replace('_', '-')} {_num(rates.get(name))}" for name in AGGREGATOR_RATES]
        lines.append(Text(f"aggregator {aggregator['node']} per s: " + ", ".join(parts)))
    dead = [p for p, info in snapshot["partitions"].items() if not info["live"]]
    if dead:
        lines.append(Text(f"partitions with no live replica: {', '.join(dead)}", style="bold red"))
    return lines


def render(monitor: Monitor, show_all: bool) -> RenderableType:
    snapshot = monitor.snapshot()
    header = Text(
        f"mqttinfer monitor · {snapshot['broker']} · deployment {snapshot['deployment']} · "
        f"{snapshot['online']} online, {snapshot['offline']} offline · "
        f"{snapshot['stale_statuses_ignored']} stale wills ignored",
        style="bold",
    )
    return Group(
        header, node_table(monitor.views(), show_all=show_all), *aggregator_lines(snapshot)
    )


# --------------------------------------------------------------------------- CLI
def monitor(
    *,
    broker: BrokerOption = DEFAULT_BROKER,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    once: Annotated[
        bool, typer.Option("--once", help="Collect for --settle seconds, print once, exit.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: print JSON.")] = False,
    settle: Annotated[
        float,
        typer.Option(
            help="Seconds to collect before printing with --once (rates need two stats "
            "messages: two intervals, 2 s each by default)."
        ),
    ] = 4.5,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also show offline sources and monitors.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    """Show every node of a deployment (status and stats topics), live until Ctrl-C."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if as_json and not once:
        typer.echo("error: --json needs --once", err=True)
        raise typer.Exit(2)
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=_PIPE_WIDTH)  # logs and pipes: never truncate
    try:
        with Monitor(broker, deployment) as watcher:
            if once:
                time.sleep(max(0.0, settle))
                if as_json:
                    typer.echo(json.dumps(watcher.snapshot(), indent=2))
                else:
                    console.print(render(watcher, show_all))
                return
            with Live(
                get_renderable=lambda: render(watcher, show_all),
                console=console,
                refresh_per_second=2,
                screen=False,
            ):
                while True:
                    time.sleep(0.5)
    except KeyboardInterrupt:
        return
    except MqttInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
