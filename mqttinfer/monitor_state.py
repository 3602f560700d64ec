"""What ``mqttinfer monitor`` knows about a deployment, built only from status and stats messages.

Pure: no MQTT, no clock reads. Feed it decoded messages with the time they arrived (``now``, any
monotonic clock) and read :meth:`MonitorState.views` / :meth:`MonitorState.snapshot`. The runtime
side (``mqttinfer.runtime.monitor``) decodes, locks and draws.

- **Status** (retained, birth and will): per node the status with the highest ``bdseq`` wins, and
  at equal ``bdseq`` an ``offline`` supersedes the ``online`` (the same connection ended). So a
  will that arrives after the node came back (a restart faster than its keepalive) is recognised
  as stale and ignored, and counted.
- **Stats** (every few seconds): the latest message per node, plus per-second rates of the main
  counters between the last two messages (the node's own ``<name>_per_s`` gauges win when it
  publishes them, as the aggregator does). A counter that went down means the node restarted: no
  rate until the next message. Stats older than three of the node's intervals are *stale*.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mqttinfer.protocol import Quantiles, Stats, Status

RATE_COUNTERS = (
    "frames",
    "answered",
    "complete",
    "degraded",
    "timed_out",
    "duplicate",
    "late",
    "rejected",
    "errors",
)
AGGREGATOR_RATES = ("complete", "degraded", "timed_out", "duplicate", "late")
STALE_AFTER_INTERVALS = 3.0
_KIND_ORDER = {"aggregator": 0, "device": 1}
# Counters that say a node could not do its job, and ones that say it refused bad input.
_ERROR_COUNTERS = ("errors", "publish_failed")
_REJECT_COUNTERS = ("rejected", "bad_input")
# The latency a node's row shows: a device's compute time, the aggregator's end to end.
_MAIN_LATENCY = {"device": "compute", "aggregator": "e2e"}


def supersedes(new: Status, old: Status) -> bool:
    """Whether ``new`` replaces ``old`` for the same node (see the module docstring)."""
    if new.bdseq != old.bdseq:
        return new.bdseq > old.bdseq
    # Same connection: its offline ends it, and a later birth (serving changed) replaces it.
    return old.state == "online"


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the monitor shows it (``None``: not known yet)."""

    node: str
    kind: str
    state: str  # online, offline, or unknown (stats seen, no status)
    bdseq: int | None
    group: str | None
    partition: int | None
    serving: str | None
    error: str | None
    clean: bool
    frames: int | None
    latency_name: str | None
    p50_ms: float | None
    p99_ms: float | None
    errors: int | None
    rejected: int | None
    rates: dict[str, float] = field(default_factory=dict)
    stats_age_s: float | None = None
    stats_stale: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, Quantiles] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "kind": self.kind,
            "state": self.state,
            "bdseq": self.bdseq,
            "group": self.group,
            "partition": self.partition,
            "serving": self.serving,
            "error": self.error,
            "clean": self.clean,
            "frames": self.frames,
            "p50_ms": _rounded(self.p50_ms),
            "p99_ms": _rounded(self.p99_ms),
            "latency_name": self.latency_name,
            "errors": self.errors,
            "rejected": self.rejected,
            "rates": {name: round(value, 3) for name, value in sorted(self.rates.items())},
            "stats_age_s": _rounded(self.stats_age_s),
            "stats_stale": self.stats_stale,
            "counters": dict(sorted(self.counters.items())),
            "gauges": {name: _rounded(value) for name, value in sorted(self.gauges.items())},
            "latency_ms": {
                name: {"p50": _rounded(q.p50), "p99": _rounded(q.p99), "n": q.n}
                for name, q in sorted(self.latency_ms.items())
            },
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass(slots=True)
class _Node:
    status: Status | None = None
    stats: Stats | None = None
    stats_at: float | None = None
    rates: dict[str, float] = field(default_factory=dict)


class MonitorState:
    """Every node of a deployment; not thread-safe (the caller serialises)."""

    def __init__(self, *, ignore: Iterable[str] = ()) -> None:
        self._nodes: dict[str, _Node] = {}
        self._ignore = frozenset(ignore)
        self.stale_statuses = 0
        self.rejected: dict[str, int] = {}

    # ------------------------------------------------------------------ inputs
    def on_status(self, status: Status, now: float) -> bool:
        """Apply a status; False (and counted) when it is older than the one held."""
        del now  # statuses carry their own order (bdseq); kept for a uniform interface
        if status.node in self._ignore:
            return False
        node = self._nodes.setdefault(status.node, _Node())
        if node.status is not None and not supersedes(status, node.status):
            self.stale_statuses += 1
            return False
        node.status = status
        return True

    def on_status_cleared(self, node: str) -> None:
        """The retained status was deleted (empty payload): forget the node."""
        self._nodes.pop(node, None)

    def on_stats(self, stats: Stats, now: float) -> None:
        if stats.node in self._ignore:
            return
        node = self._nodes.setdefault(stats.node, _Node())
        node.rates = _rates(node.stats, stats)
        node.stats = stats
        node.stats_at = now

    def on_rejected(self, kind: str) -> None:
        """A message that did not decode (the runtime logs it)."""
        self.rejected[kind] = self.rejected.get(kind, 0) + 1

    # ------------------------------------------------------------------ reading
    def views(self, now: float) -> list[NodeView]:
        """Aggregators first, then devices by partition, then every other node."""
        views = [_view(name, node, now) for name, node in self._nodes.items()]
        return sorted(views, key=_order)

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-ready document: nodes, per-partition live replicas, counts."""
        views = self.views(now)
        devices = [v for v in views if v.kind == "device"]
        partitions: dict[int, list[str]] = {}
        for view in devices:
            if view.partition is not None:
                live = partitions.setdefault(view.partition, [])
                if view.state == "online" and view.serving == "ready":
                    live.append(view.node)
        return {
            "nodes": [view.as_json() for view in views],
            "online": sum(1 for v in views if v.state == "online"),
            "offline": sum(1 for v in views if v.state == "offline"),
            "devices_ready": sum(
                1 for v in devices if v.state == "online" and v.serving == "ready"
            ),
            "partitions": {str(p): {"live": names} for p, names in sorted(partitions.items())},
            "aggregators": [
                {"node": v.node, "state": v.state, "per_s": _aggregator_rates(v.rates)}
                for v in views
                if v.kind == "aggregator"
            ],
            "stale_statuses_ignored": self.stale_statuses,
            "rejected": dict(sorted(self.rejected.items())),
        }


def _aggregator_rates(rates: Mapping[str, float]) -> dict[str, float | None]:
    return {name: _rounded(rates.get(name)) for name in AGGREGATOR_RATES}


def _rates(previous: Stats | None, current: Stats) -> dict[str, float]:
    rates: dict[str, float] = {}
    span = None if previous is None else current.ts - previous.ts
    if previous is not None and span is not None and span > 0:
        for name in RATE_COUNTERS:
            if name in current.counters and name in previous.counters:
                delta = current.counters[name] - previous.counters[name]
                if delta >= 0:
                    rates[name] = delta / span
    for name in RATE_COUNTERS:
        gauge = current.gauges.get(f"{name}_per_s")
        if gauge is not None:
            rates[name] = gauge
    return rates


def _sum(counters: Mapping[str, int], names: Iterable[str]) -> int:
    return sum(counters.get(name, 0) for name in names)


def _view(name: str, node: _Node, now: float) -> NodeView:
    status, stats = node.status, node.stats
    kind = status.kind if status is not None else stats.kind if stats is not None else "unknown"
    counters = dict(stats.counters) if stats is not None else {}
    latency = dict(stats.latency_ms) if stats is not None else {}
    main = _MAIN_LATENCY.get(kind)
    quantiles = latency.get(main) if main is not None else None
    age = None if node.stats_at is None else max(0.0, now - node.stats_at)
    stale = stats is not None and age is not None and age > STALE_AFTER_INTERVALS * stats.interval_s
    role = status.role if status is not None else None
    return NodeView(
        node=name,
        kind=kind,
        state=status.state if status is not None else "unknown",
        bdseq=status.bdseq if status is not None else None,
        group=role.group if role is not None else None,
        partition=role.partition if role is not None else None,
        serving=status.serving if status is not None else None,
        error=status.error if status is not None else None,
        clean=status.clean if status is not None else False,
        frames=counters.get("frames") if stats is not None else None,
        latency_name=main if quantiles is not None else None,
        p50_ms=quantiles.p50 if quantiles is not None else None,
        p99_ms=quantiles.p99 if quantiles is not None else None,
        errors=_sum(counters, _ERROR_COUNTERS) if stats is not None else None,
        rejected=_sum(counters, _REJECT_COUNTERS) if stats is not None else None,
        rates=dict(node.rates),
        stats_age_s=age,
        stats_stale=stale,
        counters=counters,
        gauges=dict(stats.gauges) if stats is not None else {},
        latency_ms=latency,
    )


def _order(view: NodeView) -> tuple[int, int, str, str]:
    partition = view.partition if view.partition is not None else 1 << 20
    return (_KIND_ORDER.get(view.kind, 2), partition, view.kind, view.node)
