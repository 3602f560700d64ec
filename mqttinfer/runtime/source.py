"""The camera side: publish frames, get results. The API a camera app uses::

    from mqttinfer import Source

    with Source("mqtt://127.0.0.1:1883", source_id="cam1") as cam:
        result = cam.infer(frame)                  # blocking, raises InferTimeoutError
        print(result.label, result.score, result.degraded, result.latency_ms)

        frame_id = cam.publish(frame)              # fire and forget; results arrive in
        for result in cam.results(timeout_s=1.0):  # order of completion (or via on_result=)
            ...

Frame ids are ``<8 random hex>-<counter in base 36>`` (at most 15 characters, so the partial
envelope stays compact): unique across restarts without any stored state. A frame whose
result has not arrived ``result_timeout_s`` after publishing (default: its deadline plus two
seconds) is counted ``lost``; a result arriving after that is counted ``late``.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mqttinfer.errors import BrokerError, InferTimeoutError, ProtocolError
from mqttinfer.protocol import DEFAULT_LIMITS, Frame, Limits
from mqttinfer.protocol import Result as ResultEnvelope
from mqttinfer.protocol.messages import DEFAULT_DEADLINE_MS
from mqttinfer.runtime.bus import BrokerConfig, Bus, Message
from mqttinfer.runtime.queues import Counters, DropOldestQueue, RollingQuantiles
from mqttinfer.topics import DEFAULT_DEPLOYMENT, Topics, check_id

log = logging.getLogger(__name__)

FRAME_QOS = 0
RESULT_QOS = 1
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_RESULT_GRACE_S = 2.0
COUNTER_NAMES = (
    "published",
    "results",
    "complete",
    "degraded",
    "lost",
    "late",
    "duplicates",
    "unknown",
    "rejected",
    "labelled",
    "correct",
    "dropped_results",
)


@dataclass(frozen=True, slots=True)
class Result:
    """One frame's answer as the camera app sees it.

    ``latency_ms`` is measured here, publish to result, on this process's monotonic clock;
    ``breakdown`` is the aggregator's split (``e2e_ms``, ``queue_ms``, ``compute_ms``,
    ``fc_ms``, ``transport_ms``). ``truth`` is the label given to ``publish``/``infer``.
    """

    frame_id: str
    label: int
    score: float
    logits: npt.NDArray[np.float32]
    degraded: bool
    missing: tuple[int, ...]
    reason: str
    latency_ms: float
    breakdown: dict[str, float] = field(default_factory=dict)
    contributors: dict[str, str] = field(default_factory=dict)
    truth: int | None = None
    class_name: str | None = None

    @property
    def correct(self) -> bool | None:
        """Whether ``label`` matches ``truth`` (None when no truth was given)."""
        return None if self.truth is None else self.label == self.truth


@dataclass(slots=True)
class _Pending:
    sent: float
    truth: int | None


class _Waiter:
    """One ``infer`` call waiting for its result: a lock held until the result is in.

    A bare lock is the cheapest wake-up CPython has (a Condition allocates a lock per wait and
    wakes every waiter), and ``infer`` waits once per frame.
    """

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Result | None = None

    def deliver(self, result: Result) -> None:
        self.result = result
        self.done.release()


def frame_id_prefix() -> str:
    return secrets.token_hex(4)


def base36(number: int) -> str:
    digits = ""
    while True:
        number, rest = divmod(number, 36)
        digits = _BASE36[rest] + digits
        if number == 0:
            return digits


class Source:
    """A camera source: a ``Bus`` of kind ``source`` plus frame ids, pending frames and results.

    ``on_result`` (optional) is called on the network thread for every result: keep it quick.
    ``classes`` names the labels (``Result.class_name``).
    """

    def __init__(
        self,
        broker: str | BrokerConfig = "mqtt://127.0.0.1:1883",
        source_id: str = "cam1",
        deployment: str = DEFAULT_DEPLOYMENT,
        deadline_ms: int = DEFAULT_DEADLINE_MS,
        *,
        on_result: Callable[[Result], None] | None = None,
        classes: Sequence[str] = (),
        result_timeout_s: float | None = None,
        connect_timeout_s: float = 10.0,
        max_pending: int = 4096,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        check_id(source_id, "source_id")
        if not 0 < deadline_ms <= limits.max_deadline_ms:
            raise ValueError(f"deadline_ms must be in 1..{limits.max_deadline_ms}")
        config = broker if isinstance(broker, BrokerConfig) else BrokerConfig.from_url(broker)
        self.source_id = source_id
        self.deadline_ms = deadline_ms
        self.topics = Topics(deployment)
        self.classes = tuple(classes)
        self.limits = limits
        self.result_timeout_s = (
            deadline_ms / 1000.0 + _RESULT_GRACE_S if result_timeout_s is None else result_timeout_s
        )
        self.connect_timeout_s = connect_timeout_s
        self.counters = Counters(*COUNTER_NAMES)
        self.latency_ms = RollingQuantiles(window=100_000)
        self.bus = Bus(config, node=source_id, kind="source", topics=self.topics)
        self._on_result = on_result
        self._prefix = frame_id_prefix()
        self._next = 0
        self._max_pending = max_pending
        self._lock = threading.Condition()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        # Frames no longer pending, to tell late results and duplicates from results that were
        # never ours: the _Pending of a frame that timed out, or None once it was answered.
        self._recent: OrderedDict[str, _Pending | None] = OrderedDict()
        self._waiting: dict[str, _Waiter] = {}
        self._results: DropOldestQueue[Result] = DropOldestQueue(max_pending)
        self.bus.subscribe(self.topics.result(source_id), self._on_message, qos=RESULT_QOS)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Source:
        """Connect (BrokerError if the broker is not reachable within connect_timeout_s)."""
        self.bus.start()
        if not self.bus.wait_connected(self.connect_timeout_s):
            self.bus.stop()
            raise BrokerError(
                f"source {self.source_id}: cannot connect to {self.bus.config.url} within "
                f"{self.connect_timeout_s:.0f} s"
            )
        return self

    def close(self) -> None:
        self.expire()
        self.bus.stop()
        self._results.close()

    def __enter__(self) -> Source:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sending
    def next_frame_id(self) -> str:
        with self._lock:
            self._next += 1
            return f"{self._prefix}-{base36(self._next)}"

    def publish(
        self,
        frame: npt.ArrayLike,
        label: int | None = None,
        *,
        deadline_ms: int | None = None,
        frame_id: str | None = None,
    ) -> str:
        """Send one frame (uint8 preferred; floats travel as fp16); returns its frame id.

        Raises BrokerError when the frame could not be handed to the broker (not connected,
        or larger than the broker accepts).
        """
        pixels = np.asarray(frame)
        frame_id = frame_id or self.next_frame_id()
        envelope = Frame(
            id=frame_id,
            source=self.source_id,
            ts=time.time(),
            tensor=pixels,
            deadline_ms=deadline_ms or self.deadline_ms,
            label=label,
        )
        payload = envelope.encode()
        topic = self.topics.frames(self.source_id)
        self.bus.check_size(topic, len(payload), FRAME_QOS)
        with self._lock:
            self._pending[frame_id] = _Pending(time.monotonic(), label)
            while len(self._pending) > self._max_pending:
                self._expire_one()
        if not self.bus.publish(topic, payload, qos=FRAME_QOS):
            with self._lock:
                self._pending.pop(frame_id, None)
            raise BrokerError(f"source {self.source_id}: not connected; frame {frame_id} not sent")
        self.counters.inc("published")
        return frame_id

    def infer(
        self, frame: npt.ArrayLike, timeout_s: float = 5.0, *, label: int | None = None
    ) -> Result:
        """Publish ``frame`` and wait for its result (InferTimeoutError after ``timeout_s``)."""
        frame_id = self.next_frame_id()
        waiter = _Waiter()
        with self._lock:
            self._waiting[frame_id] = waiter
        try:
            self.publish(frame, label, frame_id=frame_id)
            if not waiter.done.acquire(timeout=max(0.0, timeout_s)):
                raise InferTimeoutError(frame_id, timeout_s)
        finally:
            with self._lock:
                self._waiting.pop(frame_id, None)
        if waiter.result is None:  # unreachable: deliver() sets it before releasing
            raise InferTimeoutError(frame_id, timeout_s)
        return waiter.result

    # ------------------------------------------------------------------ receiving
    def results(self, timeout_s: float | None = None) -> Iterator[Result]:
        """Results of ``publish``-ed frames as they arrive; stops after ``timeout_s`` without one
        (never, when None) or once the source is closed."""
        while True:
            result = self._results.get(timeout_s)
            if result is None:
                return
            yield result

    @property
    def pending(self) -> int:
        """Frames published whose result has neither arrived nor timed out."""
        self.expire()
        with self._lock:
            return len(self._pending)

    def wait_all(self, timeout_s: float | None = None) -> int:
        """Wait until no frame is pending (each answered or lost); returns how many are left."""
        deadline = time.monotonic() + (self.result_timeout_s if timeout_s is None else timeout_s)
        while self.pending and time.monotonic() < deadline:
            with self._lock:
                self._lock.wait(0.05)
        return self.pending

    def expire(self, now: float | None = None) -> None:
        """Count as lost every pending frame older than ``result_timeout_s``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._pending:
                oldest = next(iter(self._pending.values()))
                if now - oldest.sent < self.result_timeout_s:
                    break
                self._expire_one()

    def _expire_one(self) -> None:
        frame_id, pending = self._pending.popitem(last=False)
        self.counters.inc("lost")
        self._remember(frame_id, pending)

    def _remember(self, frame_id: str, lost: _Pending | None) -> None:
        self._recent[frame_id] = lost
        self._recent.move_to_end(frame_id)
        while len(self._recent) > 2 * self._max_pending:
            self._recent.popitem(last=False)

    def _on_message(self, message: Message) -> None:
        received = message.received  # arrival, stamped by the bus before any decoding
        try:
            envelope = ResultEnvelope.decode(message.payload, self.limits)
        except ProtocolError as exc:
            self.counters.inc("rejected")
            log.warning("rejected result on %s: %s", message.topic, exc)
            return
        self.expire(received)  # first: a result past its frame's timeout is late
        result = self._accept(envelope, received)
        if result is None:
            return
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                log.exception("on_result callback failed for frame %s", result.frame_id)

    def _accept(self, envelope: ResultEnvelope, received: float) -> Result | None:
        with self._lock:
            pending = self._pending.pop(envelope.frame, None)
            late = pending is None and self._recent.get(envelope.frame) is not None
            if late:
                pending = self._recent[envelope.frame]
            elif pending is None:
                known = envelope.frame in self._recent
                self.counters.inc("duplicates" if known else "unknown")
                return None
            self._remember(envelope.frame, None)
            result = self._result(envelope, pending, received)
            # Each frame is accepted once (the pending entry is popped above), so a waiter is
            # delivered to at most once.
            waiter = self._waiting.get(envelope.frame)
            waited = waiter is not None
            if waiter is not None:
                waiter.deliver(result)
        self._count(result, late)
        if not waited and self._results.put(result) is not None:
            self.counters.inc("dropped_results")
        return result

    def _result(
        self, envelope: ResultEnvelope, pending: _Pending | None, received: float
    ) -> Result:
        truth = pending.truth if pending is not None else envelope.truth
        latency = (received - pending.sent) * 1000.0 if pending is not None else 0.0
        name = self.classes[envelope.label] if envelope.label < len(self.classes) else None
        return Result(
            frame_id=envelope.frame,
            label=envelope.label,
            score=envelope.score,
            logits=np.asarray(envelope.logits, dtype=np.float32),
            degraded=envelope.degraded,
            missing=envelope.missing,
            reason=envelope.reason,
            latency_ms=latency,
            breakdown=dict(envelope.latency),
            contributors=dict(envelope.contributors),
            truth=truth,
            class_name=name,
        )

    def _count(self, result: Result, late: bool) -> None:
        self.counters.inc("results")
        self.counters.inc("degraded" if result.degraded else "complete")
        if late:
            self.counters.inc("late")
        else:
            self.latency_ms.add(result.latency_ms)
        if result.truth is not None:
            self.counters.inc("labelled")
            if result.correct:
                self.counters.inc("correct")

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict[str, Any]:
        """Counters, accuracy over labelled results, and latency quantiles (ms)."""
        self.expire()
        counters = self.counters.snapshot()
        quantiles = self.latency_ms.quantiles()
        labelled = counters["labelled"]
        return {
            "source": self.source_id,
            "counters": counters,
            "accuracy": counters["correct"] / labelled if labelled else None,
            "latency_ms": {
                "p50": quantiles.p50,
                "p99": quantiles.p99,
                "mean": quantiles.mean,
                "n": quantiles.n,
            },
        }


def stream(
    source: Source,
    frames: Iterable[tuple[npt.ArrayLike, int | None]],
    *,
    rate: float,
    count: int | None = None,
    wait_s: float | None = None,
) -> dict[str, Any]:
    """Publish ``frames`` at ``rate`` per second (0: one at a time, each waiting for its result),
    then wait for the stragglers; returns ``source.summary()`` plus ``sent_fps``,
    ``duration_s`` and ``unsent`` (frames the broker could not take)."""
    start = time.monotonic()
    sent = unsent = 0
    for index, (frame, label) in enumerate(itertools.islice(frames, count)):
        if rate > 0:
            _sleep_until(start + index / rate)
        try:
            if rate > 0:
                source.publish(frame, label)
            else:
                source.infer(frame, source.result_timeout_s, label=label)
            sent += 1
        except InferTimeoutError:
            sent += 1
        except BrokerError as exc:
            unsent += 1
            if unsent <= 3:
                log.warning("%s", exc)
    send_s = time.monotonic() - start
    source.wait_all(wait_s)
    report = source.summary()
    report.update(
        sent=sent,
        unsent=unsent,
        sent_fps=sent / send_s if send_s > 0 else 0.0,
        duration_s=time.monotonic() - start,
    )
    return report


def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines for ``stream``'s report."""
    counters = report["counters"]
    latency = report["latency_ms"]
    accuracy = report["accuracy"]
    lines = [
        f"frames sent {report['sent']} ({report['sent_fps']:.1f}/s), not sent {report['unsent']}",
        f"results {counters['results']}: complete {counters['complete']}, "
        f"degraded {counters['degraded']}; lost {counters['lost']}, late {counters['late']}",
        "accuracy "
        + ("n/a (no labels)" if accuracy is None else f"{accuracy:.4f} on {counters['labelled']}"),
        f"latency ms: p50 {latency['p50']:.2f}, p99 {latency['p99']:.2f}, "
        f"mean {latency['mean']:.2f} (n={latency['n']})",
    ]
    return "\n".join(lines)
