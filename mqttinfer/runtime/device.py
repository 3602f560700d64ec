"""The device role: frames in, one partial-feature vector per frame out.

Subscriptions: ``frames/+`` (every source of the deployment) while the device has a role; a
role withdrawn by ``plan apply`` unsubscribes it and goes back to ``serving=idle``. Publications:
``partials/<partition>/<device>`` (the compact ``Partial`` envelope, fp16 features),
``stats/<device>`` every few seconds, and the retained ``status/<device>`` (the bus's birth and
will; the birth carries the role summary, and ``serving`` goes ``idle`` → ``loading`` →
``ready`` once the student is warmed up; the role summary changes only once the new student
is ready, so a role that fails to load leaves the previous one announced and served). A new role
with the same model, input and pooling as the current one (a new plan version) swaps in without
reloading the student.

Threads: one worker thread loads roles and handles frames that paho's network thread appends
to a bounded drop-oldest queue (a slow device drops its stalest frames, counted as
``dropped_queue``). Per frame: decode and validate it (a malformed frame is counted as
``rejected`` and logged, truncated), skip it when it already waited longer than its deadline
(``skipped_deadline``), skip a frame id already answered (``duplicates``: frame ids are
idempotent, e.g. a QoS 1 redelivery), run the student and publish the partial.

Fast path: when the device is idle (the worker holds no frame, the queue is empty), the frame
did not arrive right on the heels of the previous fast-path frame, and the student's latest
compute (before the first frame: its last warm-up run) took at most ``inline_max_ms``, the
network thread handles the frame itself (counted as ``inline``). That saves two thread
hand-offs per frame (network thread → worker, and the worker's publish back to the network
thread): ~0.2 ms of end-to-end latency on an idle 2-core machine, 0.3-0.45 ms when its cores
are busy (docs/benchmarks.md). The bound keeps the network thread from being held for long
(keepalives, role messages), and a frame arriving back to back with the previous one probably
waited in the socket while the student ran, so it goes to the queue, whose drop-oldest rule
then sheds stale frames under overload as before. Emulated slowdown and link rate sleep, so
they always use the worker.

``slowdown`` emulates a slower device for experiments on one machine: after each inference
the worker sleeps ``(slowdown - 1) x compute time``, and the reported ``compute_ms`` includes
that sleep. ``link_rate_bps`` emulates a slow uplink the same way: before publishing a partial
the worker sleeps ``8 x payload bytes / rate`` (the time to serialise it onto such a link);
that sleep is not compute, so on the aggregator's side it shows up as transport. Both are
emulation, not measurements of real hardware.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mqttinfer.errors import InferenceError, MqttInferError, ProtocolError
from mqttinfer.protocol import DEFAULT_LIMITS, Frame, Limits, Partial, Role
from mqttinfer.runtime.bus import Bus, Message
from mqttinfer.runtime.queues import (
    Counters,
    DropOldestQueue,
    Periodic,
    RollingQuantiles,
    build_stats,
)
from mqttinfer.runtime.roles import LoadedRole, RoleProvider
from mqttinfer.runtime.runner import StudentRunner
from mqttinfer.topics import DEFAULT_DEPLOYMENT

log = logging.getLogger(__name__)

_LOG_PAYLOAD_BYTES = 48
_POLL_S = 0.1
STATS_QOS = 0
COUNTER_NAMES = (
    "frames",
    "answered",
    "rejected",
    "bad_input",
    "errors",
    "skipped_deadline",
    "dropped_queue",
    "duplicates",
    "no_role",
    "publish_failed",
    "roles_loaded",
    "inline",
)
# A frame received within this time of the previous fast-path frame's end most likely queued
# in the socket while that frame computed: the device is behind, so the queue takes it.
_BACKLOG_GAP_S = 0.0003


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """Tunables of the device role (the CLI's options)."""

    node: str
    deployment: str = DEFAULT_DEPLOYMENT
    threads: int = 1
    queue_size: int = 16
    stats_interval_s: float = 2.0
    slowdown: float = 1.0
    link_rate_bps: float | None = None
    remember_answered: int = 4096
    frame_qos: int = 0
    partial_qos: int = 0
    # Fast path (module docstring): frames of a student that computes within this many ms
    # may be handled on the network thread; 0 turns the fast path off.
    inline_max_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.inline_max_ms < 0:
            raise ValueError(f"inline_max_ms must be >= 0, got {self.inline_max_ms}")
        if self.slowdown < 1.0:
            raise ValueError(f"slowdown must be >= 1, got {self.slowdown}")
        if self.link_rate_bps is not None and not self.link_rate_bps > 0:
            raise ValueError(f"link_rate_bps must be positive, got {self.link_rate_bps}")
        if self.queue_size < 1 or self.remember_answered < 1 or self.stats_interval_s <= 0:
            raise ValueError("queue_size, remember_answered and stats_interval_s must be positive")


@dataclass(frozen=True, slots=True)
class _Loaded:
    role: Role
    runner: StudentRunner
    topic: str  # partials/<partition>/<node>, built once per role rather than per frame


class Device:
    """One device agent on a started-or-not ``Bus``; ``start()`` / ``stop()`` drive it."""

    def __init__(
        self,
        bus: Bus,
        provider: RoleProvider,
        settings: DeviceSettings,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.bus = bus
        self.provider = provider
        self.settings = settings
        self.limits = limits
        self.topics = bus.topics
        self.counters = Counters(*COUNTER_NAMES)
        self.compute_ms = RollingQuantiles()
        self.queue_ms = RollingQuantiles()
        self._queue: DropOldestQueue[Message] = DropOldestQueue(settings.queue_size)
        self._answered: OrderedDict[tuple[str, str], None] = OrderedDict()
        # A one-element box: (None,) is a pending withdrawal, None is nothing pending.
        self._pending: tuple[LoadedRole | None] | None = None
        self._frames_subscribed = False
        self._pending_lock = threading.Lock()
        self._current: _Loaded | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        # time.monotonic() of the worker's latest pass through its loop (see healthy()).
        self._heartbeat = time.monotonic()
        # Held by whichever thread handles a frame, so frames never run concurrently.
        self._handling = threading.Lock()
        self._inline_finished = -float("inf")
        self._inline_since: float | None = None  # start of the fast-path frame in progress
        self._last_compute_ms = 0.0
        self._fast_path = (
            settings.inline_max_ms > 0
            and settings.slowdown == 1.0
            and settings.link_rate_bps is None
        )
        self._worker = threading.Thread(target=self._work, name="device-worker", daemon=True)
        self._stats = Periodic(settings.stats_interval_s, self.publish_stats, name="device-stats")

    # ------------------------------------------------------------------ lifecycle
    @property
    def role(self) -> Role | None:
        current = self._current
        return None if current is None else current.role

    def start(self) -> None:
        self.bus.update_status(serving="idle")
        self.provider.start(self.bus, self._on_role, self._on_role_error)
        self._worker.start()
        self._stats.start()
        self.bus.start()

    def healthy(self, max_age_s: float) -> bool:
        """True while the worker thread runs and went round its loop within ``max_age_s``, and
        no fast-path frame holds the network thread for longer than that.

        The systemd watchdog pings on it: a worker stuck in one frame or one model load for
        longer than ``max_age_s`` counts as hung. Without a frame the loop turns every 0.1 s.
        """
        now = time.monotonic()
        inline_since = self._inline_since
        if inline_since is not None and now - inline_since > max_age_s:
            return False
        return self._worker.is_alive() and now - self._heartbeat <= max_age_s

    def wait_ready(self, timeout_s: float) -> bool:
        """True once a role is loaded and warmed up."""
        return self._ready.wait(timeout_s)

    def stop(self) -> None:
        """Stop the worker and the stats, then announce ``offline`` (clean) and disconnect."""
        self._stopping.set()
        self.provider.stop()
        self._queue.close()
        if self._worker.is_alive():
            self._worker.join(timeout=10)
        self._stats.stop()
        self.bus.update_status(serving="stopped")
        self.bus.stop()

    # ------------------------------------------------------------------ network thread
    def _on_frame(self, message: Message) -> None:
        self.counters.inc("frames")
        if self._try_fast_path(message):
            return
        if self._queue.put(message) is not None:
            self.counters.inc("dropped_queue")

    def _try_fast_path(self, message: Message) -> bool:
        """Handle ``message`` here, on the network thread, if the device is idle (see the module
        docstring); False leaves it to the queue."""
        if (
            not self._fast_path
            or self._last_compute_ms > self.settings.inline_max_ms
            or len(self._queue) > 0
            or message.received - self._inline_finished < _BACKLOG_GAP_S
        ):
            return False
        if not self._handling.acquire(blocking=False):
            return False  # the worker is on a frame
        try:
            self._inline_since = time.monotonic()
            self.counters.inc("inline")
            self._handle_safely(message)
        finally:
            self._inline_since = None
            self._inline_finished = time.monotonic()
            self._handling.release()
        return True

    def _on_role(self, loaded: LoadedRole | None) -> None:
        with self._pending_lock:
            self._pending = (loaded,)

    def _on_role_error(self, error: str) -> None:
        log.error("role unavailable: %s", error)
        self.bus.update_status(serving="error", error=error[:500])

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while not self._stopping.is_set():
            self._heartbeat = time.monotonic()
            self._load_pending_role()
            message = self._queue.get(timeout_s=_POLL_S)
            if message is None:
                continue
            with self._handling:
                self._handle_safely(message)

    def _handle_safely(self, message: Message) -> None:
        try:
            self._handle(message)
        except Exception:  # neither thread may die of anything a frame can cause
            self.counters.inc("errors")
            log.exception("unexpected error on a frame from %s", message.topic)

    def _load_pending_role(self) -> None:
        if self._pending is None:  # the common case, checked without taking the lock
            return
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        loaded = pending[0]
        if loaded is None:
            self._withdraw_role()
            return
        role = loaded.role
        current = self._current
        if current is not None and _same_student(current.role, role):
            self._current = _Loaded(role, current.runner, self._partial_topic(role))
            self.bus.update_status(role=role.summary(), serving="ready", error=None)
            log.info("%s: plan v%d keeps the same student", self.settings.node, role.plan_version)
            return
        self.bus.update_status(serving="loading", error=None)
        try:
            runner = StudentRunner(
                loaded.model,
                role.input,
                name=f"student for partition {role.partition} ({loaded.origin})",
                threads=self.settings.threads,
                pool=role.pool,
            )
        except MqttInferError as exc:
            self._on_role_error(str(exc))
            return
        self._current = _Loaded(role, runner, self._partial_topic(role))
        # A slow student must not get one frame on the network thread before its first compute
        # is measured: start from its warm-up time.
        self._last_compute_ms = runner.warm_run_ms * self.settings.slowdown
        self.counters.inc("roles_loaded")
        self._subscribe_frames(True)
        self.bus.update_status(role=role.summary(), serving="ready", error=None)
        self._ready.set()
        log.info(
            "device %s serves partition %d (group %s, %d features) from %s",
            self.settings.node,
            role.partition,
            role.group,
            runner.output_dim,
            loaded.origin,
        )

    def _partial_topic(self, role: Role) -> str:
        return self.topics.partial(role.partition, self.settings.node)

    def _withdraw_role(self) -> None:
        self._current = None
        self._ready.clear()
        self._subscribe_frames(False)
        self.bus.update_status(role=None, serving="idle", error=None)
        log.info("device %s: role withdrawn, idle", self.settings.node)

    def _subscribe_frames(self, wanted: bool) -> None:
        if wanted and not self._frames_subscribed:
            self.bus.subscribe(self.topics.all_frames, self._on_frame, qos=self.settings.frame_qos)
        elif not wanted and self._frames_subscribed:
            self.bus.unsubscribe(self.topics.all_frames)
        self._frames_subscribed = wanted

    def _handle(self, message: Message) -> None:
        try:
            frame = Frame.decode(message.payload, self.limits)
        except ProtocolError as exc:
            self._reject("rejected", message, exc)
            return
        queue_ms = (time.monotonic() - message.received) * 1000.0
        current = self._current
        if current is None:
            self.counters.inc("no_role")
            return
        if queue_ms > frame.deadline_ms:
            self.counters.inc("skipped_deadline")
            return
        key = (frame.source, frame.id)
        if key in self._answered:
            self.counters.inc("duplicates")
            return
        try:
            x = current.runner.preprocess(frame.tensor)
        except InferenceError as exc:
            self._reject("bad_input", message, exc)
            return
        try:
            features, compute_ms = self._infer(current.runner, x)
        except InferenceError as exc:
            self.counters.inc("errors")
            log.error("inference failed on frame %s: %s", frame.id, exc)
            return
        self.queue_ms.add(queue_ms)
        self.compute_ms.add(compute_ms)
        partial = Partial(
            frame=frame.id,
            partition=current.role.partition,
            device=self.settings.node,
            features=features,
            compute_ms=compute_ms,
            queue_ms=queue_ms,
            plan_version=current.role.plan_version,
        )
        topic = current.topic
        payload = partial.encode()
        if self.settings.link_rate_bps is not None:
            time.sleep(8.0 * len(payload) / self.settings.link_rate_bps)
        if self.bus.publish(topic, payload, qos=self.settings.partial_qos):
            self.counters.inc("answered")
            self._remember(key)
        else:
            self.counters.inc("publish_failed")

    def _infer(
        self, runner: StudentRunner, x: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], float]:
        """Features and the compute time in ms (including the emulated slowdown)."""
        start = time.perf_counter()
        features = runner.run(x)
        elapsed = time.perf_counter() - start
        if self.settings.slowdown > 1.0:
            time.sleep((self.settings.slowdown - 1.0) * elapsed)
        compute_ms = (time.perf_counter() - start) * 1000.0
        self._last_compute_ms = compute_ms
        return features, compute_ms

    def _remember(self, key: tuple[str, str]) -> None:
        self._answered[key] = None
        if len(self._answered) > self.settings.remember_answered:
            self._answered.popitem(last=False)

    def _reject(self, counter: str, message: Message, exc: Exception) -> None:
        self.counters.inc(counter)
        count = self.counters[counter]
        # A flood of bad frames must not flood the log: the first ten, then every hundredth.
        if count <= 10 or count % 100 == 0:
            log.warning(
                "%s frame #%d on %s: %s (payload %d bytes: %r...)",
                counter,
                count,
                message.topic,
                exc,
                len(message.payload),
                message.payload[:_LOG_PAYLOAD_BYTES],
            )

    # ------------------------------------------------------------------ stats
    def stats_counters(self) -> dict[str, int]:
        counters = self.counters.snapshot()
        bus = self.bus.counters
        counters["publish_failed"] += bus["dropped_too_large"]
        counters["reconnects"] = bus["reconnects"]
        return counters

    def publish_stats(self) -> None:
        current = self._current
        stats = build_stats(
            node=self.settings.node,
            kind="device",
            interval_s=self.settings.stats_interval_s,
            counters=self.stats_counters(),
            gauges={
                "queue_depth": len(self._queue),
                "slowdown": self.settings.slowdown,
                "partition": -1 if current is None else current.role.partition,
                "warmup_ms": 0.0 if current is None else current.runner.warmup_ms,
            },
            latencies={"compute": self.compute_ms, "queue": self.queue_ms},
        )
        self.bus.publish(self.topics.stats(self.settings.node), stats.encode(), qos=STATS_QOS)


def _same_student(old: Role, new: Role) -> bool:
    """True when ``new`` runs the very model ``old`` runs (so the runner can be kept)."""
    return (old.model.sha256, old.input, old.pool) == (new.model.sha256, new.input, new.pool)
