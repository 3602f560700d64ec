"""Bounded drop-oldest queue, counters, rolling quantiles, periodic task, stats builder."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mqttinfer.protocol import Stats
from mqttinfer.runtime.queues import (
    Counters,
    DropOldestQueue,
    Periodic,
    RollingQuantiles,
    build_stats,
)


def test_queue_is_fifo_and_drops_the_oldest_when_full() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(3)
    assert [queue.put(i) for i in range(3)] == [None, None, None]
    assert queue.put(3) == 0
    assert queue.put(4) == 1
    assert len(queue) == 3
    assert [queue.get(0) for _ in range(3)] == [2, 3, 4]
    assert queue.get(0) is None
    assert queue.counters.snapshot() == {"enqueued": 5, "dropped": 2, "dequeued": 3}


def test_get_waits_for_a_producer_and_times_out_when_empty() -> None:
    queue: DropOldestQueue[str] = DropOldestQueue(2)
    timer = threading.Timer(0.05, queue.put, args=("late",))
    timer.start()
    assert queue.get(timeout_s=5) == "late"
    start = time.monotonic()
    assert queue.get(timeout_s=0.05) is None
    assert time.monotonic() - start >= 0.04


def test_close_wakes_a_blocked_consumer_and_refuses_new_items() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(2)
    results: list[int | None] = []
    consumer = threading.Thread(target=lambda: results.append(queue.get(timeout_s=10)))
    consumer.start()
    time.sleep(0.05)
    queue.close()
    consumer.join(timeout=2)
    assert not consumer.is_alive()
    assert results == [None]
    assert queue.put(7) == 7
    assert len(queue) == 0


def test_close_wakes_every_consumer_after_the_queued_items() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(4)
    results: list[int | None] = []
    consumers = [
        threading.Thread(target=lambda: results.append(queue.get(timeout_s=10))) for _ in range(3)
    ]
    for consumer in consumers:
        consumer.start()
    time.sleep(0.05)
    queue.put(1)
    queue.close()
    for consumer in consumers:
        consumer.join(timeout=2)
    assert not any(consumer.is_alive() for consumer in consumers)
    assert sorted(results, key=lambda r: -1 if r is None else r) == [None, None, 1]
    assert queue.get(timeout_s=None) is None  # closed: never blocks again
    assert queue.counters.snapshot() == {"enqueued": 1, "dropped": 0, "dequeued": 1}


def test_queue_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DropOldestQueue(0)


def test_concurrent_producers_lose_nothing_but_the_counted_drops() -> None:
    queue: DropOldestQueue[int] = DropOldestQueue(50)
    consumed: list[int] = []
    done = threading.Event()

    def consume() -> None:
        while not (done.is_set() and len(queue) == 0):
            item = queue.get(timeout_s=0.01)
            if item is not None:
                consumed.append(item)

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [
        threading.Thread(target=lambda base=b: [queue.put(base + i) for i in range(2000)])
        for b in (0, 10_000, 20_000)
    ]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join()
    done.set()
    consumer.join(timeout=10)
    counts = queue.counters.snapshot()
    assert counts["enqueued"] == 6000
    assert len(consumed) + counts["dropped"] == 6000
    assert len(set(consumed)) == len(consumed)


def test_counters_are_thread_safe_and_read_like_a_mapping() -> None:
    counters = Counters("a")

    def bump() -> None:
        for _ in range(5000):
            counters.inc("a")

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counters.inc("b", 3)
    assert counters["a"] == 20000
    assert dict(counters) == {"a": 20000, "b": 3}
    assert counters["never"] == 0


def test_rolling_quantiles_match_numpy_over_the_window() -> None:
    rolling = RollingQuantiles(window=100)
    assert rolling.quantiles().n == 0
    rng = np.random.default_rng(3)
    values = rng.exponential(10.0, size=250)
    for value in values:
        rolling.add(float(value))
    window = values[-100:]
    q = rolling.quantiles()
    assert q.n == 100
    # Published to microsecond (3-decimal) resolution.
    assert q.p50 == pytest.approx(np.percentile(window, 50), abs=5e-4)
    assert q.p99 == pytest.approx(np.percentile(window, 99), abs=5e-4)
    assert q.mean == pytest.approx(window.mean(), abs=5e-4)


def test_build_stats_round_trips_through_the_wire_format() -> None:
    compute = RollingQuantiles()
    for value in (1.0, 2.0, 3.0):
        compute.add(value)
    stats = build_stats(
        node="dev1",
        kind="device",
        interval_s=2.0,
        counters=Counters("frames"),
        gauges={"queue_depth": 3},
        latencies={"compute": compute, "unused": RollingQuantiles()},
        ts=123.0,
    )
    decoded = Stats.decode(stats.encode())
    assert decoded.counters == {"frames": 0}
    assert decoded.gauges == {"queue_depth": 3.0}
    assert set(decoded.latency_ms) == {"compute"}
    assert decoded.latency_ms["compute"].p50 == 2.0


def test_periodic_runs_repeatedly_survives_errors_and_stops() -> None:
    calls: list[float] = []

    def action() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("first call fails")

    periodic = Periodic(0.02, action, name="test-periodic").start()
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    periodic.stop()
    count = len(calls)
    assert count >= 3
    time.sleep(0.06)
    assert len(calls) == count
