"""The aggregation state machine: one slot per frame, fired once one partial per partition is in.

Pure: no MQTT, no clock reads, no sleeping. Every input carries ``now`` (seconds on any
monotonic clock the caller chooses) and every input returns the slots it fired, so the runtime
role (``mqttinfer.runtime.aggregator``) only moves bytes and the rules live here, testable alone.

A slot fires exactly once, for one of four reasons (``Fired.reason``):

- ``complete``: one partial per partition has arrived (the first replica to answer wins).
- ``dead``: every partition still missing has replicas, all of them offline (their wills said
  so), so waiting would be pointless; frames already open fire at once too.
- ``deadline``: the frame's deadline passed; missing partitions are zero-filled and listed.
- ``evicted``: more than ``max_open`` slots were open; the oldest one made room.

A partial may arrive before its frame (the broker orders messages per topic, not across topics):
it opens the slot with the default deadline, and the frame's deadline and source are adopted when
the frame arrives. A slot never fires ``complete`` or ``dead`` before its frame header is known,
because the result is addressed to the frame's source; if the header never comes, the slot fires
on the deadline with ``source=None`` (counted as ``orphaned``).

Liveness comes from retained status messages with a birth/death sequence number (``bdseq``) that
grows on each connect of a node: a status older than the newest one known for that node is stale
and ignored, and at equal ``bdseq`` the will (offline) supersedes the birth (online).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from mqttinfer.errors import ConfigError

REASON_COMPLETE = "complete"
REASON_DEADLINE = "deadline"
REASON_DEAD = "dead"
REASON_EVICTED = "evicted"

COUNTER_NAMES = (
    "frames",  # frame headers that opened or completed a slot
    "partials",  # partials accepted into an open slot
    "complete",  # slots fired with every partition present
    "degraded",  # slots fired with at least one partition missing (sum of the next four)
    "timed_out",  # fired on the deadline
    "dead_fired",  # fired because every missing partition had no live replica
    "evicted",  # fired because the open-slot bound was reached
    "orphaned",  # fired on the deadline without ever seeing the frame header
    "duplicate",  # a partial for a partition already filled, before or after firing (a
    #               redundant replica: normal), or a repeated frame header
    "late",  # a partial that would have filled a missing partition but came after firing
    #          (it cost accuracy), or a frame header for a slot that already fired
    "rejected",  # a partial for an unknown partition or with the wrong number of features
    "stale_status",  # a status message older than the newest known for that node
)

Features = npt.NDArray[np.float32]


class PartialOutcome(str, Enum):
    """What became of one partial."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    LATE = "late"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class AggregationConfig:
    """The shape of the model and the bounds of the state machine.

    ``widths`` maps each partition id to its number of pooled features; the head input is the
    concatenation of the partitions in ascending id order.
    """

    widths: Mapping[int, int]
    default_deadline_ms: int = 1000
    max_open: int = 256
    remember_fired: int = 4096

    def __post_init__(self) -> None:
        if not self.widths:
            raise ConfigError("at least one partition is needed", field="widths")
        if any(w <= 0 for w in self.widths.values()) or any(p < 0 for p in self.widths):
            raise ConfigError(
                "partition ids must be >= 0 and widths > 0",
                field="widths",
                fix="check the bundle's partitions",
            )
        for name in ("default_deadline_ms", "max_open", "remember_fired"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1", field=name)

    @property
    def partitions(self) -> tuple[int, ...]:
        return tuple(sorted(self.widths))


@dataclass(frozen=True, slots=True)
class Timing:
    """Latency breakdown of one fired slot, in milliseconds.

    ``transport_ms`` estimates the time on the wire for the slowest partial (the last one to
    arrive): its arrival minus the slot's opening, less its queueing and compute time.
    """

    e2e_ms: float
    compute_ms: float
    queue_ms: float
    transport_ms: float

    def as_latency(self, fc_ms: float) -> dict[str, float]:
        """The ``latency`` map of a Result (keys as in ``protocol.messages.LATENCY_KEYS``)."""
        return {
            "e2e_ms": self.e2e_ms,
            "queue_ms": self.queue_ms,
            "compute_ms": self.compute_ms,
            "fc_ms": fc_ms,
            "transport_ms": self.transport_ms,
        }


@dataclass(frozen=True, slots=True)
class Fired:
    """A slot that fired: everything needed to apply the head and build a Result."""

    frame_id: str
    source: str | None
    reason: str
    features: dict[int, Features]
    missing: tuple[int, ...]
    contributors: dict[int, str]
    truth: int | None
    opened_at: float
    fired_at: float
    timing: Timing

    @property
    def degraded(self) -> bool:
        return bool(self.missing)


@dataclass(frozen=True, slots=True)
class PartialResult:
    """The outcome of one partial, and any slots that fired because of it."""

    outcome: PartialOutcome
    fired: tuple[Fired, ...] = ()


@dataclass(slots=True)
class _Arrival:
    device: str
    features: Features
    compute_ms: float
    queue_ms: float
    at: float


@dataclass(slots=True)
class _Slot:
    frame_id: str
    opened_at: float
    deadline: float
    source: str | None = None
    truth: int | None = None
    arrivals: dict[int, _Arrival] = field(default_factory=dict)

    @property
    def has_header(self) -> bool:
        return self.source is not None


@dataclass(slots=True)
class _NodeState:
    partition: int | None
    online: bool
    bdseq: int


class Aggregation:
    """The state machine. Not thread-safe: the caller serialises calls (one worker thread)."""

    def __init__(self, config: AggregationConfig) -> None:
        self.config = config
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # in order of opening
        self._deadlines: list[tuple[float, int, str]] = []  # heap; stale entries skipped
        self._seq = 0
        # Bounded LRU of fired frame ids -> the partitions they fired with, so a partial after
        # firing can be told apart: a redundant replica (duplicate) or one that came too late.
        self._fired_ids: OrderedDict[str, frozenset[int]] = OrderedDict()
        self._nodes: dict[str, _NodeState] = {}
        self._dead: frozenset[int] = frozenset()  # derived from _nodes on every status

    # Inputs ----------------------------------------------------------------------------------
    def open_frame(
        self,
        frame_id: str,
        source: str,
        now: float,
        *,
        deadline_ms: int | None = None,
        truth: int | None = None,
    ) -> tuple[Fired, ...]:
        """A frame header arrived: open its slot (or complete one a partial opened early)."""
        if frame_id in self._fired_ids:
            self._count("late")
            return ()
        slot = self._slots.get(frame_id)
        if slot is not None and slot.has_header:
            self._count("duplicate")
            return ()
        self._count("frames")
        fired: list[Fired] = []
        if slot is None:
            slot, fired = self._open(frame_id, now)
        slot.source = source
        slot.truth = truth
        budget_ms = self.config.default_deadline_ms if deadline_ms is None else deadline_ms
        self._set_deadline(slot, slot.opened_at + budget_ms / 1000.0)
        fired.extend(self._fire_if_ready(slot, now))
        return tuple(fired)

    def add_partial(
        self,
        frame_id: str,
        partition: int,
        device: str,
        features: npt.ArrayLike,
        now: float,
        *,
        compute_ms: float = 0.0,
        queue_ms: float = 0.0,
    ) -> PartialResult:
        """A device's partial arrived (possibly before its frame, possibly a replica's twin)."""
        vector = np.asarray(features, dtype=np.float32).reshape(-1)
        width = self.config.widths.get(partition)
        if width is None or vector.shape[0] != width or not np.isfinite(vector).all():
            self._count("rejected")
            return PartialResult(PartialOutcome.REJECTED)
        fired_with = self._fired_ids.get(frame_id)
        if fired_with is not None:
            if partition in fired_with:
                self._count("duplicate")
                return PartialResult(PartialOutcome.DUPLICATE)
            self._count("late")
            return PartialResult(PartialOutcome.LATE)
        slot = self._slots.get(frame_id)
        fired: list[Fired] = []
        if slot is None:
            slot, fired = self._open(frame_id, now)
        if partition in slot.arrivals:
            self._count("duplicate")
            return PartialResult(PartialOutcome.DUPLICATE, tuple(fired))
        self._count("partials")
        slot.arrivals[partition] = _Arrival(device, vector, compute_ms, queue_ms, now)
        fired.extend(self._fire_if_ready(slot, now))
        return PartialResult(PartialOutcome.ACCEPTED, tuple(fired))

    def node_status(
        self, node: str, partition: int | None, *, online: bool, bdseq: int, now: float
    ) -> tuple[Fired, ...]:
        """A node's retained status (birth or will). Returns slots that no longer need to wait."""
        known = self._nodes.get(node)
        if known is not None and _status_rank(bdseq, online) < _status_rank(
            known.bdseq, known.online
        ):
            self._count("stale_status")
            return ()
        # A will is registered at connect time, often before the role was loaded, so it may
        # lack the role; it ends the session that served the last known partition. An online
        # status without a role is an idle device: it serves nothing.
        served = partition
        if partition is None and not online and known is not None:
            served = known.partition
        self._nodes[node] = _NodeState(served, online, bdseq)
        self._dead = self._derive_dead()
        if not self._dead:
            return ()
        candidates = [s for s in self._slots.values() if self._missing(s) & self._dead]
        return tuple(f for s in candidates for f in self._fire_if_ready(s, now))

    def tick(self, now: float) -> tuple[Fired, ...]:
        """Fire every slot whose deadline has passed."""
        fired: list[Fired] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, frame_id = heapq.heappop(self._deadlines)
            slot = self._slots.get(frame_id)
            if slot is not None and slot.deadline == deadline:
                fired.append(self._fire(slot, REASON_DEADLINE, now))
        return tuple(fired)

    # Queries ---------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest pending deadline (for the caller's timer), or None when idle."""
        while self._deadlines:
            deadline, _, frame_id = self._deadlines[0]
            slot = self._slots.get(frame_id)
            if slot is not None and slot.deadline == deadline:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    @property
    def open_count(self) -> int:
        return len(self._slots)

    def is_open(self, frame_id: str) -> bool:
        return frame_id in self._slots

    def has_fired(self, frame_id: str) -> bool:
        """True while ``frame_id`` is still in the bounded memory of fired ids."""
        return frame_id in self._fired_ids

    def dead_partitions(self) -> frozenset[int]:
        """Partitions whose known replicas are all offline (never-seen partitions are not dead)."""
        return self._dead

    def _derive_dead(self) -> frozenset[int]:
        alive: set[int] = set()
        seen: set[int] = set()
        for state in self._nodes.values():
            if state.partition is None:
                continue
            seen.add(state.partition)
            if state.online:
                alive.add(state.partition)
        return frozenset(seen - alive)

    def replicas(self) -> dict[int, dict[str, bool]]:
        """Known replicas per partition: node id -> online."""
        out: dict[int, dict[str, bool]] = {}
        for node, state in self._nodes.items():
            if state.partition is not None:
                out.setdefault(state.partition, {})[node] = state.online
        return out

    # Internals -------------------------------------------------------------------------------
    def _open(self, frame_id: str, now: float) -> tuple[_Slot, list[Fired]]:
        fired: list[Fired] = []
        while len(self._slots) >= self.config.max_open:
            oldest = next(iter(self._slots.values()))
            fired.append(self._fire(oldest, REASON_EVICTED, now))
        slot = _Slot(frame_id, now, math.inf)
        self._slots[frame_id] = slot
        self._set_deadline(slot, now + self.config.default_deadline_ms / 1000.0)
        return slot, fired

    def _set_deadline(self, slot: _Slot, deadline: float) -> None:
        slot.deadline = deadline
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, slot.frame_id))

    def _missing(self, slot: _Slot) -> set[int]:
        return set(self.config.widths) - set(slot.arrivals)

    def _fire_if_ready(self, slot: _Slot, now: float) -> tuple[Fired, ...]:
        if not slot.has_header:
            return ()
        missing = self._missing(slot)
        if not missing:
            return (self._fire(slot, REASON_COMPLETE, now),)
        if missing <= self._dead:
            return (self._fire(slot, REASON_DEAD, now),)
        return ()

    def _fire(self, slot: _Slot, reason: str, now: float) -> Fired:
        del self._slots[slot.frame_id]
        self._remember_fired(slot.frame_id, frozenset(slot.arrivals))
        missing = tuple(sorted(self._missing(slot)))
        self._count_fire(reason, missing, slot)
        return Fired(
            frame_id=slot.frame_id,
            source=slot.source,
            reason=reason,
            features={p: a.features for p, a in sorted(slot.arrivals.items())},
            missing=missing,
            contributors={p: a.device for p, a in sorted(slot.arrivals.items())},
            truth=slot.truth,
            opened_at=slot.opened_at,
            fired_at=now,
            timing=_timing(slot, now),
        )

    def _count_fire(self, reason: str, missing: tuple[int, ...], slot: _Slot) -> None:
        if not slot.has_header:
            self._count("orphaned")
        if not missing:
            self._count("complete")
            return
        self._count("degraded")
        by_reason = {
            REASON_DEADLINE: "timed_out",
            REASON_DEAD: "dead_fired",
            REASON_EVICTED: "evicted",
        }
        self._count(by_reason[reason])

    def _remember_fired(self, frame_id: str, present: frozenset[int]) -> None:
        self._fired_ids[frame_id] = present
        while len(self._fired_ids) > self.config.remember_fired:
            self._fired_ids.popitem(last=False)

    def _count(self, name: str) -> None:
        self.counters[name] += 1


def _status_rank(bdseq: int, online: bool) -> tuple[int, int]:
    """Order of status messages of one node: later session first, then will after birth."""
    return (bdseq, 0 if online else 1)


def _timing(slot: _Slot, now: float) -> Timing:
    arrivals = list(slot.arrivals.values())
    e2e_ms = max(0.0, (now - slot.opened_at) * 1000.0)
    if not arrivals:
        return Timing(e2e_ms=e2e_ms, compute_ms=0.0, queue_ms=0.0, transport_ms=0.0)
    slowest = max(arrivals, key=lambda a: a.at)
    wire_ms = (slowest.at - slot.opened_at) * 1000.0 - slowest.queue_ms - slowest.compute_ms
    return Timing(
        e2e_ms=e2e_ms,
        compute_ms=max(a.compute_ms for a in arrivals),
        queue_ms=max(a.queue_ms for a in arrivals),
        transport_ms=max(0.0, wire_ms),
    )


# The head ------------------------------------------------------------------------------------
def concat_features(
    widths: Mapping[int, int], features: Mapping[int, npt.ArrayLike]
) -> npt.NDArray[np.float32]:
    """The head input: partitions in ascending id order, missing ones zero-filled."""
    parts = []
    for partition in sorted(widths):
        present = features.get(partition)
        if present is None:
            parts.append(np.zeros(widths[partition], dtype=np.float32))
        else:
            parts.append(np.asarray(present, dtype=np.float32).reshape(widths[partition]))
    return np.concatenate(parts)


def apply_head(
    weight: npt.NDArray[Any], bias: npt.NDArray[Any], x: npt.NDArray[Any]
) -> tuple[npt.NDArray[np.float32], int, float]:
    """``logits = W·x + b``; returns (logits, argmax label, its softmax probability)."""
    logits = (np.asarray(weight, np.float32) @ np.asarray(x, np.float32)) + np.asarray(
        bias, np.float32
    )
    label = int(np.argmax(logits))
    shifted = logits - logits[label]  # max is 0: exp never overflows
    score = float(1.0 / np.exp(shifted, dtype=np.float64).sum())
    return logits.astype(np.float32), label, score
