"""The aggregator role's threading: messages handled on the caller's (network) thread, deadlines
fired by the ticker thread. A recording bus stands in for MQTT (a pure unit test); the cluster,
fault and fuzz tests run the aggregator on a real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from mqttinfer.protocol import Frame, Partial, Result
from mqttinfer.runtime.aggregator import Aggregator, AggregatorSettings, HeadWeights
from mqttinfer.runtime.bus import Handler, Message

WIDTHS = {0: 2, 1: 3}


class RecordingBus:
    """Records subscriptions and publications, and the thread each publication came from."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.published: list[tuple[str, bytes, str]] = []
        self.changed = threading.Condition()

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        del qos
        self.handlers[topic_filter] = handler

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        del qos, retain
        with self.changed:
            self.published.append((topic, payload, threading.current_thread().name))
            self.changed.notify_all()
        return True

    def results(self) -> list[tuple[Result, str]]:
        with self.changed:
            return [
                (Result.decode(payload), thread)
                for topic, payload, thread in self.published
                if "/results/" in topic
            ]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout_s)


@pytest.fixture
def started() -> Iterator[tuple[Aggregator, RecordingBus]]:
    bus = RecordingBus()
    # A long tick: a deadline fires on time only if the ticker is woken for it.
    settings = AggregatorSettings(tick_ms=2000.0, stats_interval_s=3600.0)
    head = HeadWeights(np.ones((4, 5), np.float32), np.zeros(4, np.float32))
    aggregator = Aggregator(bus, widths=WIDTHS, head=head, settings=settings)
    aggregator.start()
    yield aggregator, bus
    aggregator.stop()


def frame_message(aggregator: Aggregator, frame_id: str, deadline_ms: int) -> Message:
    frame = Frame(frame_id, "cam", time.time(), np.zeros((2, 2), np.uint8), deadline_ms)
    return Message(aggregator.topics.frames("cam"), frame.encode(), False, time.monotonic())


def partial_message(aggregator: Aggregator, frame_id: str, partition: int) -> Message:
    features = np.full(WIDTHS[partition], 0.5, np.float32)
    partial = Partial(frame_id, partition, f"d{partition}", features, 0.1, 0.0)
    topic = aggregator.topics.partial(partition, f"d{partition}")
    return Message(topic, partial.encode(), False, time.monotonic())


def test_a_complete_frame_is_answered_on_the_calling_thread(
    started: tuple[Aggregator, RecordingBus],
) -> None:
    aggregator, bus = started
    caller = threading.current_thread().name
    aggregator.enqueue(frame_message(aggregator, "f-1", 1000))
    aggregator.enqueue(partial_message(aggregator, "f-1", 0))
    assert bus.results() == []
    aggregator.enqueue(partial_message(aggregator, "f-1", 1))
    # Published before enqueue returned, from the caller's (the network) thread: no hand-off.
    [(result, thread)] = bus.results()
    assert (result.frame, result.reason, result.degraded, thread) == (
        "f-1",
        "complete",
        False,
        caller,
    )
    assert result.logits.tolist() == pytest.approx([2.5] * 4)


def test_the_ticker_fires_a_deadline_earlier_than_its_tick(
    started: tuple[Aggregator, RecordingBus],
) -> None:
    aggregator, bus = started
    time.sleep(0.05)  # the ticker is now asleep for up to tick_ms (2 s)
    sent = time.monotonic()
    aggregator.enqueue(frame_message(aggregator, "f-2", 100))
    aggregator.enqueue(partial_message(aggregator, "f-2", 0))
    assert bus.wait_for(lambda: bool(bus.results()), 1.5), "the deadline did not fire"
    waited = time.monotonic() - sent
    [(result, thread)] = bus.results()
    assert (result.reason, result.missing, thread) == ("deadline", (1,), "aggregator-ticker")
    assert 0.09 <= waited < 1.5
    assert aggregator.healthy(max_age_s=5.0)


def test_a_failing_message_costs_that_message_only(
    started: tuple[Aggregator, RecordingBus],
) -> None:
    aggregator, bus = started
    broken = Message(aggregator.topics.frames("cam"), b"", False, time.monotonic())
    object.__setattr__(broken, "payload", None)  # not even bytes: decoding code fails oddly
    aggregator.enqueue(broken)  # must not raise into the bus
    aggregator.enqueue(frame_message(aggregator, "f-3", 1000))
    for partition in WIDTHS:
        aggregator.enqueue(partial_message(aggregator, "f-3", partition))
    assert [r.frame for r, _ in bus.results()] == ["f-3"]
    assert aggregator.snapshot()["errors"] == 1


def test_stop_ends_the_ticker(started: tuple[Aggregator, RecordingBus]) -> None:
    aggregator, _bus = started
    aggregator.stop()
    assert not aggregator.healthy(max_age_s=60.0)
