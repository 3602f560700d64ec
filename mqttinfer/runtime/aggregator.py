"""The aggregator role: partial features in, results out (the rules live in ``aggregation``).

Subscriptions (under ``mqttinfer/<deployment>/``):

- ``frames/+``: each frame opens a slot (the whole frame is decoded, so a malformed one is
  rejected here exactly as a device would reject it);
- ``partials/+/+``: partition and device come from the topic;
- ``status/+``: device births and wills, which tell which partitions have a live replica.

Threads: each message is handled on paho's network thread, in the bus handler: decoding, the
state machine, the head (a matmul of a few dozen features) and the result's publish are tens of
microseconds, bounded per message, and never sleep, so the network thread is never held up, and
a frame costs no hand-off to another thread (measured side by side on a shared 2-core machine:
~0.3 ms of end-to-end latency and ~200 µs of CPU per frame, see docs/benchmarks.md). paho reads
the next message only once the handler returns, so a flood waits at the broker (which bounds
its queues), not in this process. One ticker thread wakes at the next
deadline (at most every ``tick_ms``) to fire expired slots and, every ``stats_interval_s``,
publishes ``stats/<node>``. Both threads take one lock around the state machine; under load the
machine is also ticked after every message, so deadlines are honoured even when the ticker waits.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from mqttinfer.aggregation import (
    Aggregation,
    AggregationConfig,
    Fired,
    PartialOutcome,
    apply_head,
    concat_features,
)
from mqttinfer.errors import ProtocolError
from mqttinfer.protocol import DEFAULT_LIMITS, Frame, Limits, Partial, Result, Status
from mqttinfer.runtime.bus import Handler, Message
from mqttinfer.runtime.queues import (
    Counters,
    RollingQuantiles,
    build_stats,
)
from mqttinfer.topics import DEFAULT_DEPLOYMENT, Topics, is_valid_id

log = logging.getLogger(__name__)

RESULT_QOS = 1
STATS_QOS = 0
_LOG_PAYLOAD_BYTES = 48
_PARTITION_LEVEL = re.compile(r"^[0-9]{1,4}$")
MESSAGE_KINDS = ("frame", "partial", "status")
# Counters of the state machine that stats report as per-second rates too.
RATE_COUNTERS = ("complete", "degraded", "timed_out", "duplicate", "late", "rejected")


class BusLike(Protocol):
    """The part of ``runtime.bus.Bus`` the aggregator uses (tests may pass an unstarted Bus)."""

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0) -> None: ...

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
    ) -> bool: ...


@dataclass(frozen=True, slots=True)
class AggregatorSettings:
    """Tunables of the aggregator role (the CLI's options)."""

    node: str = "aggregator"
    deployment: str = DEFAULT_DEPLOYMENT
    max_open: int = 256
    default_deadline_ms: int = 1000
    remember_fired: int = 8192
    tick_ms: float = 5.0
    stats_interval_s: float = 2.0
    limits: Limits = DEFAULT_LIMITS


@dataclass(frozen=True, slots=True)
class HeadWeights:
    """The FC head: ``weight`` [classes, sum(widths)], ``bias`` [classes]."""

    weight: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]


class Aggregator:
    """Joins partials into results on a bus. ``handle(message)`` is the whole message path."""

    def __init__(
        self,
        bus: BusLike,
        *,
        widths: Mapping[int, int],
        head: HeadWeights,
        settings: AggregatorSettings = AggregatorSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.topics = Topics(settings.deployment)
        self.head = head
        self.machine = Aggregation(
            AggregationConfig(
                widths=dict(widths),
                default_deadline_ms=settings.default_deadline_ms,
                max_open=settings.max_open,
                remember_fired=settings.remember_fired,
            )
        )
        self._clock = clock
        self.counters = Counters(
            "received",
            "results_published",
            "publish_failed",
            "errors",
            *(f"rejected_{kind}" for kind in MESSAGE_KINDS),
        )
        self.latency = {name: RollingQuantiles() for name in ("e2e", "fc", "compute", "transport")}
        # Serialises the state machine between the network thread and the ticker.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # Set by the network thread only when a new deadline is earlier than the ticker's
        # planned wake-up (rare: deadlines are far beyond tick_ms), so no wake-up per frame.
        self._wake = threading.Event()
        self._ticker_wakes_at = math.inf
        self._worker: threading.Thread | None = None
        # time.monotonic() of the ticker's latest pass through its loop (see healthy()).
        self._heartbeat = time.monotonic()
        self._next_stats = clock() + settings.stats_interval_s
        self._last_rates: tuple[float, dict[str, int]] | None = None
        prefix = self.topics.prefix
        self._routes: dict[str, tuple[str, Callable[[Message], None]]] = {
            f"{prefix}/frames/": ("frame", self._on_frame),
            f"{prefix}/partials/": ("partial", self._on_partial),
            f"{prefix}/status/": ("status", self._on_status),
        }

    # Lifecycle -----------------------------------------------------------------------------
    def subscribe(self) -> None:
        """Register the three subscriptions (the bus re-sends them on every reconnect)."""
        self.bus.subscribe(self.topics.all_frames, self.enqueue, qos=1)
        self.bus.subscribe(self.topics.all_partials, self.enqueue, qos=1)
        self.bus.subscribe(self.topics.all_status, self.enqueue, qos=1)

    def start(self) -> None:
        """Subscribe and start the ticker (the caller starts the bus)."""
        self.subscribe()
        self._worker = threading.Thread(target=self._run, name="aggregator-ticker", daemon=True)
        self._worker.start()

    def healthy(self, max_age_s: float) -> bool:
        """True while the ticker runs and went round its loop within ``max_age_s`` (it wakes at
        least every ``tick_ms`` and takes the state machine's lock, so a network thread stuck
        inside the lock shows up too); the systemd watchdog pings on it."""
        worker = self._worker
        alive = worker is not None and worker.is_alive()
        return alive and time.monotonic() - self._heartbeat <= max_age_s

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=5)

    # Network thread ------------------------------------------------------------------------
    def enqueue(self, message: Message) -> None:
        """The bus handler: handle the message at once, on the network thread (bounded work,
        no sleeping), then fire whatever deadlines passed. Never raises."""
        try:
            with self._lock:
                self.handle(message)
                self.tick()
                deadline = self.machine.next_deadline()
        except Exception:  # a bug must cost one message, never the aggregator
            self.counters.inc("errors")
            log.exception("aggregator failed on a message on %s", message.topic[:160])
            return
        if deadline is not None and deadline < self._ticker_wakes_at:
            self._wake.set()

    # Ticker --------------------------------------------------------------------------------
    def _run(self) -> None:
        tick_s = self.settings.tick_ms / 1000.0
        while not self._stopping.is_set():
            self._heartbeat = time.monotonic()
            try:
                due_stats = None
                with self._lock:
                    self.tick()
                    if self._clock() >= self._next_stats:
                        self._next_stats = self._clock() + self.settings.stats_interval_s
                        due_stats = self._stats_gauges()
                    wait_s = self._wait_s(tick_s)
                    self._ticker_wakes_at = self._clock() + wait_s
                if due_stats is not None:
                    # Quantiles and encoding outside the lock: the network thread never waits
                    # for them (RollingQuantiles has its own lock).
                    self._send_stats(*due_stats)
            except Exception:  # a bug must cost one tick, never the aggregator
                self.counters.inc("errors")
                log.exception("aggregator ticker failed")
                wait_s = tick_s
            self._wake.wait(wait_s)
            self._wake.clear()

    def _wait_s(self, tick_s: float) -> float:
        deadline = self.machine.next_deadline()
        wake = min(self._next_stats, math.inf if deadline is None else deadline)
        return min(tick_s, max(0.0, wake - self._clock()))

    def tick(self) -> None:
        """Fire and publish every slot whose deadline has passed."""
        self._publish_all(self.machine.tick(self._clock()))

    def handle(self, message: Message) -> None:
        """Decode one message, feed the state machine, publish what fired. Never raises."""
        self.counters.inc("received")
        for head, (kind, route) in self._routes.items():
            if not message.topic.startswith(head):
                continue
            if message.retain and kind != "status":
                # A retained frame would be replayed on every reconnect: refuse it outright.
                self._reject(kind, message, "retained frames and partials are not accepted")
            else:
                route(message)
            return
        log.debug("ignoring a message on %s", message.topic)

    def _reject(self, kind: str, message: Message, reason: object) -> None:
        name = f"rejected_{kind}"
        self.counters.inc(name)
        count = self.counters[name]
        # A flood of bad messages must not flood the log: the first ten, then every hundredth.
        if count <= 10 or count % 100 == 0:
            log.warning(
                "rejected %s #%d (%d bytes) on %s: %s (%r...)",
                kind,
                count,
                len(message.payload),
                message.topic[:160],
                str(reason)[:200],
                message.payload[:_LOG_PAYLOAD_BYTES],
            )

    def _on_frame(self, message: Message) -> None:
        try:
            frame = Frame.decode(message.payload, self.settings.limits)
        except ProtocolError as exc:
            self._reject("frame", message, exc)
            return
        fired = self.machine.open_frame(
            frame.id,
            frame.source,
            message.received,
            deadline_ms=frame.deadline_ms,
            truth=frame.label,
        )
        self._publish_all(fired)

    def _on_partial(self, message: Message) -> None:
        try:
            partition, device = self.parse_partial_topic(message.topic)
            partial = Partial.decode(
                message.payload, partition=partition, device=device, limits=self.settings.limits
            )
        except ProtocolError as exc:
            self._reject("partial", message, exc)
            return
        result = self.machine.add_partial(
            partial.frame,
            partial.partition,
            partial.device,
            partial.features,
            message.received,
            compute_ms=partial.compute_ms,
            queue_ms=partial.queue_ms,
        )
        if result.outcome is PartialOutcome.REJECTED:
            self._reject("partial", message, f"partition {partition} does not take these features")
        self._publish_all(result.fired)

    def _on_status(self, message: Message) -> None:
        if not message.payload:
            return  # a retained status being cleared: nothing to learn
        try:
            node = self.topics.last_level(message.topic, "status")
            status = Status.decode(message.payload, self.settings.limits)
            if status.node != node:
                raise ProtocolError(f"node {status.node!r} on {node!r}'s topic", kind="status")
        except ProtocolError as exc:
            self._reject("status", message, exc)
            return
        if status.kind != "device":
            return
        fired = self.machine.node_status(
            status.node,
            None if status.role is None else status.role.partition,
            online=status.state == "online",
            bdseq=status.bdseq,
            now=message.received,
        )
        self._publish_all(fired)

    def parse_partial_topic(self, topic: str) -> tuple[int, str]:
        """``(partition, device)`` from ``<prefix>/partials/<partition>/<device>``."""
        head = f"{self.topics.prefix}/partials/"
        levels = topic[len(head) :].split("/") if topic.startswith(head) else []
        if len(levels) != 2 or not _PARTITION_LEVEL.match(levels[0]) or not is_valid_id(levels[1]):
            raise ProtocolError(
                f"topic {topic[:120]!r} is not partials/<n>/<device>", kind="partial"
            )
        return int(levels[0]), levels[1]

    # Results -------------------------------------------------------------------------------
    def _publish_all(self, fired: tuple[Fired, ...]) -> None:
        for slot in fired:
            self.publish_result(slot)

    def build_result(self, fired: Fired) -> Result:
        """Apply the head to a fired slot (missing partitions zero-filled)."""
        started = time.perf_counter()
        x = concat_features(self.machine.config.widths, fired.features)
        logits, label, score = apply_head(self.head.weight, self.head.bias, x)
        fc_ms = (time.perf_counter() - started) * 1000.0
        latency = fired.timing.as_latency(fc_ms)
        # e2e runs to the moment the result leaves, not just to the firing input.
        latency["e2e_ms"] = max(latency["e2e_ms"], (self._clock() - fired.opened_at) * 1000.0)
        return Result(
            frame=fired.frame_id,
            source=fired.source or "",
            logits=logits,
            label=label,
            score=score,
            degraded=fired.degraded,
            missing=fired.missing,
            reason=fired.reason,
            ts=time.time(),
            latency=latency,
            contributors={str(p): device for p, device in fired.contributors.items()},
            truth=fired.truth,
        )

    def publish_result(self, fired: Fired) -> None:
        if fired.source is None:
            log.debug("frame %s fired without its header; no source to answer", fired.frame_id)
            return
        result = self.build_result(fired)
        ok = self.bus.publish(
            self.topics.result(fired.source), result.encode(), qos=RESULT_QOS, retain=False
        )
        self.counters.inc("results_published" if ok else "publish_failed")
        for name, key in (
            ("e2e", "e2e_ms"),
            ("fc", "fc_ms"),
            ("compute", "compute_ms"),
            ("transport", "transport_ms"),
        ):
            self.latency[name].add(result.latency[key])

    # Stats ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        """Every counter: the state machine's and the wire rejects per kind."""
        counters = dict(self.machine.counters)
        own = self.counters.snapshot()
        counters.update(own)
        counters["rejected"] = sum(own[f"rejected_{kind}"] for kind in MESSAGE_KINDS)
        return counters

    def publish_stats(self) -> None:
        """Publish ``stats/<node>`` now (not from a thread that holds the state machine's lock)."""
        with self._lock:
            counters, gauges = self._stats_gauges()
        self._send_stats(counters, gauges)

    def _stats_gauges(self) -> tuple[dict[str, int], dict[str, float]]:
        """Counters and gauges, read under the state machine's lock."""
        counters = self.snapshot()
        gauges = {"open_slots": float(self.machine.open_count)}
        gauges["dead_partitions"] = float(len(self.machine.dead_partitions()))
        gauges.update(self._rates(counters))
        return counters, gauges

    def _send_stats(self, counters: dict[str, int], gauges: dict[str, float]) -> None:
        stats = build_stats(
            node=self.settings.node,
            kind="aggregator",
            interval_s=self.settings.stats_interval_s,
            counters=counters,
            gauges=gauges,
            latencies=self.latency,
        )
        self.bus.publish(self.topics.stats(self.settings.node), stats.encode(), qos=STATS_QOS)

    def _rates(self, counters: dict[str, int]) -> dict[str, float]:
        now = self._clock()
        previous, self._last_rates = self._last_rates, (now, counters)
        if previous is None or now <= previous[0]:
            return {}
        span = now - previous[0]
        return {
            f"{name}_per_s": (counters[name] - previous[1].get(name, 0)) / span
            for name in RATE_COUNTERS
        }
