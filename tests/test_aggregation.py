"""The pure aggregation state machine: every transition, orderings, liveness, bounds, the head."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from mqttinfer.aggregation import (
    Aggregation,
    AggregationConfig,
    Fired,
    PartialOutcome,
    apply_head,
    concat_features,
)
from mqttinfer.errors import ConfigError

WIDTHS = {0: 3, 1: 2, 2: 4}


def make(**overrides: int) -> Aggregation:
    return Aggregation(AggregationConfig(widths=WIDTHS, **overrides))


def feats(partition: int, value: float = 1.0) -> np.ndarray:
    return np.full(WIDTHS[partition], value, dtype=np.float32)


def only(fired: tuple[Fired, ...]) -> Fired:
    assert len(fired) == 1, fired
    return fired[0]


def feed_all(agg: Aggregation, frame: str, now: float, device: str = "d") -> tuple[Fired, ...]:
    out: list[Fired] = []
    for p in WIDTHS:
        out.extend(agg.add_partial(frame, p, f"{device}{p}", feats(p, p + 1), now).fired)
    return tuple(out)


# Configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"widths": {}},
        {"widths": {0: 0}},
        {"widths": {-1: 3}},
        {"widths": WIDTHS, "max_open": 0},
        {"widths": WIDTHS, "default_deadline_ms": 0},
        {"widths": WIDTHS, "remember_fired": 0},
    ],
)
def test_config_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        AggregationConfig(**kwargs)


def test_config_partitions_sorted() -> None:
    assert AggregationConfig(widths={2: 1, 0: 1, 1: 1}).partitions == (0, 1, 2)


# Complete -----------------------------------------------------------------------------------
def test_frame_then_partials_fires_complete_once_on_last_partial() -> None:
    agg = make()
    assert agg.open_frame("f1", "cam", 10.0, deadline_ms=500, truth=3) == ()
    assert agg.add_partial("f1", 0, "a", feats(0), 10.01).fired == ()
    assert agg.add_partial("f1", 2, "c", feats(2), 10.02).fired == ()
    result = agg.add_partial("f1", 1, "b", feats(1), 10.03)
    assert result.outcome is PartialOutcome.ACCEPTED
    fired = only(result.fired)
    assert fired.reason == "complete"
    assert not fired.degraded and fired.missing == ()
    assert fired.source == "cam" and fired.truth == 3 and fired.frame_id == "f1"
    assert fired.contributors == {0: "a", 1: "b", 2: "c"}
    assert list(fired.features) == [0, 1, 2]
    assert fired.fired_at == 10.03 and fired.opened_at == 10.0
    assert agg.open_count == 0 and agg.has_fired("f1")
    assert agg.tick(100.0) == ()
    assert agg.counters["complete"] == 1 and agg.counters["degraded"] == 0
    assert agg.counters["frames"] == 1 and agg.counters["partials"] == 3


def test_every_ordering_of_frame_and_partials_fires_the_same_result() -> None:
    events = ["frame", 0, 1, 2]
    baseline = None
    for order in itertools.permutations(events):
        agg = make()
        fired: list[Fired] = []
        for step, event in enumerate(order):
            now = 1.0 + step * 0.01
            if event == "frame":
                fired.extend(agg.open_frame("f", "cam", now, deadline_ms=200))
            else:
                fired.extend(
                    agg.add_partial("f", event, f"d{event}", feats(event, event), now).fired
                )
        one = only(tuple(fired))
        assert one.reason == "complete"
        assert one.fired_at == pytest.approx(1.03)
        summary = (one.contributors, {p: v.tolist() for p, v in one.features.items()})
        baseline = baseline or summary
        assert summary == baseline


def test_partial_before_frame_waits_for_header_then_adopts_its_deadline() -> None:
    agg = make(default_deadline_ms=1000)
    # Every partial arrives before the frame: the slot is complete but has nowhere to go yet.
    assert feed_all(agg, "f", 5.0) == ()
    assert agg.is_open("f") and agg.next_deadline() == pytest.approx(6.0)
    fired = only(agg.open_frame("f", "cam", 5.05, deadline_ms=300, truth=1))
    assert fired.reason == "complete" and fired.source == "cam" and fired.truth == 1
    assert fired.opened_at == 5.0  # the slot opened with the first partial


def test_partial_before_frame_short_frame_deadline_is_counted_from_first_sight() -> None:
    agg = make(default_deadline_ms=1000)
    agg.add_partial("f", 0, "a", feats(0), 5.0)
    assert agg.open_frame("f", "cam", 5.1, deadline_ms=200) == ()
    assert agg.next_deadline() == pytest.approx(5.2)
    assert agg.tick(5.19) == ()
    fired = only(agg.tick(5.2))
    assert fired.reason == "deadline" and fired.missing == (1, 2)


def test_orphan_slot_without_header_fires_on_default_deadline() -> None:
    agg = make(default_deadline_ms=100)
    feed_all(agg, "f", 1.0)
    fired = only(agg.tick(1.1))
    assert fired.source is None and fired.reason == "deadline" and not fired.degraded
    assert agg.counters["orphaned"] == 1 and agg.counters["timed_out"] == 0
    assert agg.counters["complete"] == 1


# Duplicates and late ------------------------------------------------------------------------
def test_second_replica_is_a_duplicate_and_first_one_wins() -> None:
    agg = make()
    agg.open_frame("f", "cam", 0.0)
    assert agg.add_partial("f", 0, "a", feats(0, 1), 0.1).outcome is PartialOutcome.ACCEPTED
    dup = agg.add_partial("f", 0, "b", feats(0, 9), 0.2)
    assert dup.outcome is PartialOutcome.DUPLICATE and dup.fired == ()
    agg.add_partial("f", 1, "a1", feats(1), 0.3)
    fired = only(agg.add_partial("f", 2, "a2", feats(2), 0.3).fired)
    assert fired.contributors[0] == "a"
    assert fired.features[0].tolist() == [1.0, 1.0, 1.0]
    assert agg.counters["duplicate"] == 1


def test_replica_after_complete_firing_is_a_duplicate_and_frame_header_late() -> None:
    agg = make()
    agg.open_frame("f", "cam", 0.0)
    feed_all(agg, "f", 0.1)
    twin = agg.add_partial("f", 0, "z", feats(0), 0.2)
    assert twin.outcome is PartialOutcome.DUPLICATE and twin.fired == ()
    assert agg.open_frame("f", "cam", 0.3) == ()
    assert agg.counters["duplicate"] == 1
    assert agg.counters["late"] == 1 and agg.open_count == 0


def test_missing_partition_after_degraded_firing_is_late() -> None:
    agg = make()
    agg.open_frame("f", "cam", 0.0, deadline_ms=100)
    agg.add_partial("f", 0, "a0", feats(0), 0.01)
    only(agg.tick(0.2))
    late = agg.add_partial("f", 1, "a1", feats(1), 0.3)
    assert late.outcome is PartialOutcome.LATE and late.fired == ()
    twin = agg.add_partial("f", 0, "b0", feats(0), 0.3)
    assert twin.outcome is PartialOutcome.DUPLICATE
    assert agg.counters["late"] == 1 and agg.counters["duplicate"] == 1


def test_repeated_frame_header_is_a_duplicate() -> None:
    agg = make()
    agg.open_frame("f", "cam", 0.0, deadline_ms=100)
    assert agg.open_frame("f", "cam", 0.05, deadline_ms=900) == ()
    assert agg.counters["duplicate"] == 1 and agg.counters["frames"] == 1
    assert agg.next_deadline() == pytest.approx(0.1)  # the repeat changed nothing


def test_fired_memory_is_bounded_lru() -> None:
    agg = make(remember_fired=2)
    for name in ("a", "b", "c"):
        agg.open_frame(name, "cam", 0.0)
        feed_all(agg, name, 0.0)
    assert not agg.has_fired("a") and agg.has_fired("b") and agg.has_fired("c")
    # Forgotten ids open a fresh slot (the bound trades memory for rare double answers).
    assert agg.add_partial("a", 0, "x", feats(0), 1.0).outcome is PartialOutcome.ACCEPTED
    assert (
        agg.add_partial("b", 0, "x", feats(0), 1.0).outcome is PartialOutcome.DUPLICATE
    )  # remembered: a redundant replica


# Rejected -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("partition", "vector"),
    [
        (7, np.zeros(3, np.float32)),  # unknown partition
        (0, np.zeros(4, np.float32)),  # wrong width
        (1, np.array([1.0, np.nan], np.float32)),  # not finite
        (1, np.array([1.0, np.inf], np.float32)),
    ],
)
def test_bad_partials_are_rejected_without_opening_a_slot(
    partition: int, vector: np.ndarray
) -> None:
    agg = make()
    outcome = agg.add_partial("f", partition, "d", vector, 0.0)
    assert outcome.outcome is PartialOutcome.REJECTED and outcome.fired == ()
    assert agg.open_count == 0 and agg.counters["rejected"] == 1


# Deadline -----------------------------------------------------------------------------------
def test_deadline_fires_degraded_with_missing_partitions_listed() -> None:
    agg = make()
    agg.open_frame("f", "cam", 1.0, deadline_ms=250)
    agg.add_partial("f", 1, "b", feats(1, 2), 1.1)
    assert agg.tick(1.2499) == ()
    fired = only(agg.tick(1.25))
    assert fired.reason == "deadline" and fired.degraded and fired.missing == (0, 2)
    assert fired.contributors == {1: "b"} and fired.timing.e2e_ms == pytest.approx(250)
    x = concat_features(WIDTHS, fired.features)
    assert x.tolist() == [0, 0, 0, 2, 2, 0, 0, 0, 0]
    assert agg.counters["timed_out"] == 1 and agg.counters["degraded"] == 1
    assert agg.next_deadline() is None


def test_tick_fires_all_expired_slots_in_deadline_order() -> None:
    agg = make()
    agg.open_frame("late", "cam", 0.0, deadline_ms=300)
    agg.open_frame("early", "cam", 0.0, deadline_ms=100)
    agg.open_frame("later", "cam", 0.0, deadline_ms=900)
    assert agg.next_deadline() == pytest.approx(0.1)
    fired = agg.tick(0.5)
    assert [f.frame_id for f in fired] == ["early", "late"]
    assert agg.next_deadline() == pytest.approx(0.9)


def test_frame_with_no_partials_times_out_with_everything_missing() -> None:
    agg = make()
    agg.open_frame("f", "cam", 0.0, deadline_ms=10)
    fired = only(agg.tick(0.02))
    assert fired.missing == (0, 1, 2) and fired.features == {}
    assert fired.timing.compute_ms == 0 and fired.timing.transport_ms == 0


# Liveness -----------------------------------------------------------------------------------
def test_partition_dies_when_its_last_replica_goes_offline() -> None:
    agg = make()
    for node in ("b1", "b2"):
        agg.node_status(node, 1, online=True, bdseq=1, now=0.0)
    agg.open_frame("f", "cam", 0.0, deadline_ms=1000)
    agg.add_partial("f", 0, "a", feats(0), 0.01)
    agg.add_partial("f", 2, "c", feats(2), 0.01)
    assert agg.node_status("b1", 1, online=False, bdseq=1, now=0.1) == ()
    assert agg.dead_partitions() == frozenset()
    fired = only(agg.node_status("b2", None, online=False, bdseq=1, now=0.2))
    assert fired.reason == "dead" and fired.missing == (1,) and fired.fired_at == 0.2
    assert agg.counters["dead_fired"] == 1 and agg.counters["degraded"] == 1
    # New frames no longer wait for the dead partition.
    agg.open_frame("g", "cam", 0.3)
    agg.add_partial("g", 0, "a", feats(0), 0.31)
    fired = only(agg.add_partial("g", 2, "c", feats(2), 0.32).fired)
    assert fired.reason == "dead" and fired.fired_at == 0.32
    # A replica comes back: frames wait for it again.
    agg.node_status("b2", 1, online=True, bdseq=2, now=0.4)
    agg.open_frame("h", "cam", 0.5)
    agg.add_partial("h", 0, "a", feats(0), 0.5)
    assert agg.add_partial("h", 2, "c", feats(2), 0.5).fired == ()


def test_dead_partition_does_not_fire_while_a_live_partition_is_missing() -> None:
    agg = make()
    agg.node_status("b", 1, online=True, bdseq=0, now=0.0)
    agg.node_status("c", 2, online=True, bdseq=0, now=0.0)
    agg.open_frame("f", "cam", 0.0)
    agg.add_partial("f", 0, "a", feats(0), 0.0)
    assert agg.node_status("b", 1, online=False, bdseq=0, now=0.1) == ()  # still waits for 2
    fired = only(agg.add_partial("f", 2, "c", feats(2), 0.2).fired)
    assert fired.reason == "dead" and fired.missing == (1,)


def test_frames_open_when_all_partitions_are_dead_fire_immediately() -> None:
    agg = make()
    for p in WIDTHS:
        agg.node_status(f"n{p}", p, online=False, bdseq=0, now=0.0)
    fired = only(agg.open_frame("f", "cam", 1.0))
    assert fired.reason == "dead" and fired.missing == (0, 1, 2)


def test_partition_never_seen_waits_for_the_deadline() -> None:
    agg = make()
    agg.node_status("b", 1, online=False, bdseq=0, now=0.0)  # 1 dead; 2 never seen
    agg.open_frame("f", "cam", 0.0, deadline_ms=100)
    agg.add_partial("f", 0, "a", feats(0), 0.0)
    assert agg.dead_partitions() == frozenset({1})
    assert agg.tick(0.05) == ()
    fired = only(agg.tick(0.1))
    assert fired.reason == "deadline" and fired.missing == (1, 2)


def test_dead_slot_without_header_waits_for_the_header() -> None:
    agg = make()
    agg.node_status("b", 1, online=False, bdseq=0, now=0.0)
    agg.add_partial("f", 0, "a", feats(0), 0.0)
    agg.add_partial("f", 2, "c", feats(2), 0.0)
    assert agg.is_open("f")
    assert only(agg.open_frame("f", "cam", 0.1)).reason == "dead"


def test_stale_will_is_ignored() -> None:
    agg = make()
    agg.node_status("b", 1, online=True, bdseq=3, now=0.0)
    # The will of an earlier session arrives after the new birth (a restart beat the keepalive).
    assert agg.node_status("b", 1, online=False, bdseq=2, now=0.1) == ()
    assert agg.counters["stale_status"] == 1
    assert agg.replicas() == {1: {"b": True}}
    # The current session's will counts.
    agg.node_status("b", 1, online=False, bdseq=3, now=0.2)
    assert agg.replicas() == {1: {"b": False}} and agg.dead_partitions() == {1}
    # A birth of the session that already died is stale too; a new session's is not.
    agg.node_status("b", 1, online=True, bdseq=3, now=0.3)
    assert agg.replicas() == {1: {"b": False}} and agg.counters["stale_status"] == 2
    agg.node_status("b", 1, online=True, bdseq=4, now=0.4)
    assert agg.replicas() == {1: {"b": True}} and agg.dead_partitions() == frozenset()


def test_role_change_moves_a_replica_between_partitions() -> None:
    agg = make()
    agg.node_status("n", 1, online=True, bdseq=0, now=0.0)
    agg.node_status("n", 2, online=True, bdseq=0, now=0.1)  # plan apply, same session
    assert agg.replicas() == {2: {"n": True}}
    agg.node_status("n", None, online=False, bdseq=0, now=0.2)  # will without role
    assert agg.dead_partitions() == {2}


def test_a_withdrawn_device_stops_counting_as_a_replica() -> None:
    agg = make()
    agg.node_status("n", 1, online=True, bdseq=0, now=0.0)
    agg.node_status("m", 1, online=True, bdseq=0, now=0.0)
    agg.node_status("n", None, online=True, bdseq=0, now=0.1)  # plan apply withdrew its role
    assert agg.replicas() == {1: {"m": True}}
    agg.node_status("m", None, online=False, bdseq=0, now=0.2)
    assert agg.dead_partitions() == {1}


def test_nodes_without_a_partition_do_not_count_as_replicas() -> None:
    agg = make()
    agg.node_status("idle", None, online=True, bdseq=0, now=0.0)
    agg.node_status("idle", None, online=False, bdseq=0, now=0.1)
    assert agg.replicas() == {} and agg.dead_partitions() == frozenset()


# Eviction -----------------------------------------------------------------------------------
def test_oldest_slot_is_evicted_when_the_bound_is_reached() -> None:
    agg = make(max_open=2)
    agg.open_frame("a", "cam", 0.0)
    agg.add_partial("a", 0, "x", feats(0), 0.0)
    agg.open_frame("b", "cam", 0.1)
    fired = only(agg.open_frame("c", "cam", 0.2))
    assert fired.frame_id == "a" and fired.reason == "evicted" and fired.missing == (1, 2)
    assert agg.open_count == 2 and agg.counters["evicted"] == 1
    # A partial that opens a slot evicts too.
    fired_p = agg.add_partial("d", 0, "x", feats(0), 0.3)
    assert fired_p.outcome is PartialOutcome.ACCEPTED
    assert only(fired_p.fired).frame_id == "b"
    assert agg.has_fired("a") and agg.has_fired("b")


# Timing -------------------------------------------------------------------------------------
def test_timing_uses_the_slowest_partial() -> None:
    agg = make()
    agg.open_frame("f", "cam", 10.0)
    agg.add_partial("f", 0, "a", feats(0), 10.020, compute_ms=15, queue_ms=1)
    agg.add_partial("f", 2, "c", feats(2), 10.030, compute_ms=5, queue_ms=7)
    fired = only(agg.add_partial("f", 1, "b", feats(1), 10.050, compute_ms=30, queue_ms=4).fired)
    timing = fired.timing
    assert timing.e2e_ms == pytest.approx(50)
    assert timing.compute_ms == 30 and timing.queue_ms == 7
    assert timing.transport_ms == pytest.approx(50 - 4 - 30)
    latency = timing.as_latency(fc_ms=0.5)
    assert latency == pytest.approx(
        {"e2e_ms": 50, "queue_ms": 7, "compute_ms": 30, "fc_ms": 0.5, "transport_ms": 16}
    )


def test_transport_estimate_never_negative() -> None:
    agg = make()
    feed_all(agg, "f", 1.0)
    fired = only(agg.open_frame("f", "cam", 1.0))
    assert fired.timing.transport_ms == 0.0


# Head ---------------------------------------------------------------------------------------
def test_concat_and_head_match_numpy() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 9)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    parts = {p: rng.normal(size=w).astype(np.float32) for p, w in WIDTHS.items()}
    x = concat_features(WIDTHS, parts)
    np.testing.assert_array_equal(x, np.concatenate([parts[0], parts[1], parts[2]]))
    logits, label, score = apply_head(weight, bias, x)
    expected = weight @ x + bias
    np.testing.assert_allclose(logits, expected, rtol=1e-6)
    probs = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    assert label == int(np.argmax(expected)) and score == pytest.approx(probs.max(), rel=1e-6)


def test_head_softmax_does_not_overflow() -> None:
    logits, label, score = apply_head(
        np.eye(3, dtype=np.float32), np.zeros(3), np.array([1e4, 0, -1e4])
    )
    assert label == 0 and score == pytest.approx(1.0) and np.isfinite(logits).all()


def test_concat_zero_fills_missing_partitions_in_id_order() -> None:
    x = concat_features({5: 1, 2: 2}, {5: [7.0]})
    assert x.tolist() == [0.0, 0.0, 7.0]


# Hypothesis state machine ---------------------------------------------------------------------
FRAMES = ["f0", "f1", "f2", "f3", "f4", "f5"]
NODES = {"a0": 0, "a1": 0, "b0": 1, "c0": 2, "c1": 2}


class AggregationMachine(RuleBasedStateMachine):
    """Random interleavings of every input; invariants checked after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.agg = Aggregation(
            AggregationConfig(widths=WIDTHS, default_deadline_ms=300, max_open=4)
        )
        self.now = 0.0
        self.fired: dict[str, Fired] = {}
        self.first_partial: dict[tuple[str, int], str] = {}
        self.partials_sent = 0
        self.frames_sent = 0
        self.bdseq = dict.fromkeys(NODES, 0)

    def _record(self, fired: tuple[Fired, ...]) -> None:
        dead = self.agg.dead_partitions()
        for f in fired:
            assert f.frame_id not in self.fired, "a frame fired twice"
            assert f.fired_at == self.now
            self.fired[f.frame_id] = f
            if f.reason == "complete":
                assert not f.missing
            elif f.reason == "dead":
                assert f.missing and set(f.missing) <= dead and f.source is not None
            assert set(f.missing) | set(f.features) == set(WIDTHS)
            assert not set(f.missing) & set(f.features)
            for p, device in f.contributors.items():
                assert self.first_partial[(f.frame_id, p)] == device

    @rule(dt=st.floats(min_value=0.0, max_value=0.2))
    def advance(self, dt: float) -> None:
        self.now += dt
        self._record(self.agg.tick(self.now))
        deadline = self.agg.next_deadline()
        assert deadline is None or deadline > self.now

    @rule(frame=st.sampled_from(FRAMES), deadline_ms=st.integers(1, 500))
    def frame(self, frame: str, deadline_ms: int) -> None:
        self.frames_sent += 1
        self._record(self.agg.open_frame(frame, "cam", self.now, deadline_ms=deadline_ms))

    @rule(frame=st.sampled_from(FRAMES), node=st.sampled_from(sorted(NODES)))
    def partial(self, frame: str, node: str) -> None:
        self.partials_sent += 1
        p = NODES[node]
        was_open = self.agg.is_open(frame)
        result = self.agg.add_partial(frame, p, node, feats(p), self.now)
        if result.outcome is PartialOutcome.ACCEPTED:
            assert frame not in self.fired
            self.first_partial[(frame, p)] = node
        elif result.outcome is PartialOutcome.LATE:
            assert frame in self.fired and p in self.fired[frame].missing
        else:
            assert result.outcome is PartialOutcome.DUPLICATE
            # Either a twin while the slot is open, or a replica of a partition it fired with.
            assert was_open or (frame in self.fired and p not in self.fired[frame].missing)
        self._record(result.fired)

    @rule(node=st.sampled_from(sorted(NODES)), online=st.booleans(), bump=st.booleans())
    def status(self, node: str, online: bool, bump: bool) -> None:
        self.bdseq[node] += int(bump)
        self._record(
            self.agg.node_status(
                node, NODES[node], online=online, bdseq=self.bdseq[node], now=self.now
            )
        )

    @precondition(lambda self: self.agg.open_count > 0)
    @rule()
    def expire_everything(self) -> None:
        self.now += 1.0
        self._record(self.agg.tick(self.now))
        assert self.agg.open_count == 0

    @invariant()
    def bounded(self) -> None:
        assert self.agg.open_count <= 4

    @invariant()
    def counters_add_up(self) -> None:
        c = self.agg.counters
        assert c["complete"] + c["degraded"] == len(self.fired)
        assert c["degraded"] == c["timed_out"] + c["dead_fired"] + c["evicted"]
        assert c["partials"] + c["duplicate"] + c["late"] + c["rejected"] >= self.partials_sent
        assert c["rejected"] == 0
        total_inputs = self.partials_sent + self.frames_sent
        assert c["partials"] + c["frames"] + c["duplicate"] + c["late"] == total_inputs

    @invariant()
    def dead_partitions_have_no_live_replica(self) -> None:
        for p in self.agg.dead_partitions():
            assert not any(self.agg.replicas()[p].values())


TestAggregationMachine = AggregationMachine.TestCase
TestAggregationMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
