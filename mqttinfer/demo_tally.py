"""Per-phase accounting of the demo: which frames were sent, answered, degraded, lost, right.

Pure (no MQTT, no clock reads): times are passed in. Thread-safe, because results arrive on the
network thread while the demo's main thread publishes and the live view reads.

A frame is *in flight* from ``sent`` until its result arrives or it expires; a frame still
without a result ``timeout_s`` after it was sent is *lost* (a result arriving after that is
counted *late*, and does not count as a result of the phase).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Answer:
    """What the tally needs of one result (``mqttinfer.runtime.source.Result`` has it all)."""

    frame_id: str
    correct: bool | None
    degraded: bool
    missing: tuple[int, ...]
    reason: str
    latency_ms: float


@dataclass(frozen=True, slots=True)
class PhaseSummary:
    """The numbers of one phase (``accuracy`` over labelled results; latencies in ms)."""

    phase: str
    frames: int
    results: int
    complete: int
    degraded: int
    lost: int
    late: int
    in_flight: int
    correct: int
    labelled: int
    p50_ms: float | None
    p99_ms: float | None
    missing_partitions: tuple[int, ...]
    reasons: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def fps(self) -> float | None:
        return self.results / self.duration_s if self.duration_s > 0 else None

    def as_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "results": self.results,
            "complete": self.complete,
            "degraded": self.degraded,
            "lost": self.lost,
            "late": self.late,
            "accuracy": _round(self.accuracy, 4),
            "p50_ms": _round(self.p50_ms, 2),
            "p99_ms": _round(self.p99_ms, 2),
            "missing_partitions": list(self.missing_partitions),
            "reasons": dict(sorted(self.reasons.items())),
            "duration_s": round(self.duration_s, 2),
            "results_per_s": _round(self.fps, 1),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class PhaseTally:
    """Counts one phase. ``sent`` → ``answered`` / ``expire``; ``summary`` at any time."""

    def __init__(self, phase: str, timeout_s: float) -> None:
        self.phase = phase
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._in_flight: OrderedDict[str, float] = OrderedDict()  # frame id -> sent, oldest first
        self._expired: set[str] = set()
        self._latencies: list[float] = []
        self._missing: Counter[int] = Counter()
        self._reasons: Counter[str] = Counter()
        self._frames = self._results = self._degraded = self._lost = self._late = 0
        self._correct = self._labelled = 0
        self._started: float | None = None
        self._finished: float | None = None

    # ------------------------------------------------------------------ inputs
    def sent(self, frame_id: str, now: float) -> None:
        """A frame is about to be published (register first: its result may beat ``publish``)."""
        with self._lock:
            if self._started is None:
                self._started = now
            self._frames += 1
            self._in_flight[frame_id] = now

    def unsent(self, frame_id: str) -> None:
        """The broker did not take the frame: it will never be answered (counted lost)."""
        with self._lock:
            if self._in_flight.pop(frame_id, None) is not None:
                self._lost += 1
                self._expired.add(frame_id)

    def owns(self, frame_id: str) -> bool:
        with self._lock:
            return frame_id in self._in_flight or frame_id in self._expired

    def answered(self, answer: Answer, now: float) -> bool:
        """A result arrived; False when the frame is not this phase's (or already answered)."""
        with self._lock:
            if self._in_flight.pop(answer.frame_id, None) is None:
                if answer.frame_id in self._expired:
                    self._expired.discard(answer.frame_id)
                    self._late += 1
                    return True
                return False
            self._results += 1
            self._finished = now
            self._latencies.append(answer.latency_ms)
            self._reasons[answer.reason] += 1
            if answer.degraded:
                self._degraded += 1
                self._missing.update(answer.missing)
            if answer.correct is not None:
                self._labelled += 1
                self._correct += int(answer.correct)
            return True

    def expire(self, now: float) -> int:
        """Count as lost every frame in flight for ``timeout_s`` or more; returns how many."""
        expired = 0
        with self._lock:
            while self._in_flight:
                frame_id, sent = next(iter(self._in_flight.items()))
                if now - sent < self.timeout_s:
                    break
                del self._in_flight[frame_id]
                self._expired.add(frame_id)
                expired += 1
            self._lost += expired
        return expired

    # ------------------------------------------------------------------ reading
    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def oldest_sent(self) -> float | None:
        with self._lock:
            return next(iter(self._in_flight.values()), None)

    def summary(self, now: float | None = None) -> PhaseSummary:
        """The phase so far; ``now`` (while running) sets the duration, else the last result."""
        with self._lock:
            latencies = np.asarray(self._latencies, dtype=np.float64)
            p50 = p99 = None
            if latencies.size:
                p50, p99 = (float(v) for v in np.percentile(latencies, [50.0, 99.0]))
            end = now if now is not None else self._finished
            duration = 0.0 if self._started is None or end is None else end - self._started
            return PhaseSummary(
                phase=self.phase,
                frames=self._frames,
                results=self._results,
                complete=self._results - self._degraded,
                degraded=self._degraded,
                lost=self._lost,
                late=self._late,
                in_flight=len(self._in_flight),
                correct=self._correct,
                labelled=self._labelled,
                p50_ms=p50,
                p99_ms=p99,
                missing_partitions=tuple(sorted(self._missing)),
                reasons=dict(self._reasons),
                duration_s=max(0.0, duration),
            )
