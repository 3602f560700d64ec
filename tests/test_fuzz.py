"""Malformed payloads on the frame and partial topics never crash a node and are all counted.

In process: at least 100,000 hypothesis-generated payloads (mutated valid envelopes, byte-level
corruptions, random msgpack structures, raw bytes) go through the real aggregator's and the real
device's message handlers. An independent oracle (the protocol decoders plus the partition
widths) says which payloads are invalid; each handler must count exactly those as rejected.
Then a smaller batch travels through a real Mosquitto to running nodes, which must still answer
a good frame afterwards.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqttinfer.errors import ProtocolError
from mqttinfer.protocol import Frame, Partial, Result
from mqttinfer.runtime.aggregator import Aggregator, AggregatorSettings, HeadWeights
from mqttinfer.runtime.bus import Message
from mqttinfer.runtime.device import Device, DeviceSettings
from mqttinfer.runtime.local_broker import LocalBroker
from mqttinfer.runtime.roles import StaticRoleProvider, role_from_bundle
from mqttinfer.topics import Topics
from tests.busutil import make_bus, wait_until
from tests.support.synthetic import SyntheticBundle, random_frames

TOTAL_IN_PROCESS = 100_000
BATCH = 250
BROKER_PAYLOADS = 1500
PARTITION = 0


# Payload strategies --------------------------------------------------------------------------
@functools.cache
def valid_envelopes(width: int) -> list[bytes]:
    """Valid frames (three shapes, one the device cannot take) and a valid partial."""
    frames = [
        Frame("f-1", "cam", 1.0, np.arange(n, dtype=np.uint8).reshape(shape), 100, 1).encode()
        for n, shape in ((64, (1, 8, 8)), (4, (1, 2, 2)), (3, (3,)))
    ]
    partial = Partial("f-1", PARTITION, "d", np.ones(width, np.float32), 1.0, 0.5, 3).encode()
    return [*frames, partial]


# Keys the decoders read, so that random maps reach past the first check now and then.
KEYS = ["v", "type", "id", "src", "ts", "deadline_ms", "tensor", "label", "f", "c", "q", "x"]
KEYS += ["p", "dtype", "shape", "data", "enc", "scale", "zz"]
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.sampled_from(["", "frame", "partial", "u8", "f16", "i8", "lz4", "cam", "f-1", "é"])
    | st.binary(max_size=24)
)
structures = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
    ),
    max_leaves=4,
)


@st.composite
def mutated_envelope(draw: st.DrawFn, width: int) -> bytes:
    """A valid frame or partial with one field (or one tensor field) replaced or deleted."""
    envelope = msgpack.unpackb(draw(st.sampled_from(valid_envelopes(width))))
    tensor_key = "tensor" if "tensor" in envelope else "x"
    target = envelope[tensor_key] if draw(st.booleans()) else envelope
    key = draw(st.sampled_from([*sorted(target), "zz"]))
    if draw(st.booleans()):
        target.pop(key, None)
    else:
        target[key] = draw(structures)
    packed: bytes = msgpack.packb(envelope, use_bin_type=True)
    return packed


@st.composite
def corrupted_bytes(draw: st.DrawFn, width: int) -> bytes:
    """A valid encoded frame or partial, truncated, with bytes flipped, or with bytes inserted."""
    raw: bytes = draw(st.sampled_from(valid_envelopes(width)))
    where = draw(st.integers(0, len(raw)))
    how = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if how == "truncate":
        return raw[:where]
    if how == "flip":
        index = min(where, len(raw) - 1)
        return raw[:index] + bytes([raw[index] ^ draw(st.integers(1, 255))]) + raw[index + 1 :]
    return raw[:where] + draw(st.binary(min_size=1, max_size=8)) + raw[where:]


def payloads(width: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        mutated_envelope(width),
        corrupted_bytes(width),
        structures.map(lambda v: msgpack.packb(v, use_bin_type=True)),
        st.binary(max_size=64),
    )


# Oracles --------------------------------------------------------------------------------------
def frame_is_valid(payload: bytes) -> bool:
    try:
        Frame.decode(payload)
    except ProtocolError:
        return False
    return True


def partial_is_valid(payload: bytes, width: int) -> bool:
    try:
        partial = Partial.decode(payload, partition=PARTITION, device="fuzz")
    except ProtocolError:
        return False
    return partial.features.shape == (width,) and bool(np.isfinite(partial.features).all())


# Nodes ---------------------------------------------------------------------------------------
def make_aggregator(bundle: SyntheticBundle, bus: Any, deployment: str) -> Aggregator:
    widths = {k: int(kernel.shape[0]) for k, kernel in enumerate(bundle.kernels)}
    return Aggregator(
        bus,
        widths=widths,
        head=HeadWeights(bundle.head_weight, bundle.head_bias),
        settings=AggregatorSettings(deployment=deployment, default_deadline_ms=200),
    )


def make_device(
    bundle: SyntheticBundle, url: str, deployment: str, node: str, partition: int
) -> Device:
    bus = make_bus(url, deployment, node, kind="device")
    loaded = role_from_bundle(
        bundle.path, device=node, deployment=deployment, partition=partition, group=f"g{partition}"
    )
    settings = DeviceSettings(node=node, deployment=deployment, queue_size=10_000)
    return Device(bus, StaticRoleProvider(loaded), settings)


@pytest.fixture
def offline_nodes(
    synthetic_bundle: SyntheticBundle, deployment: str
) -> Iterator[tuple[Aggregator, Device]]:
    """An aggregator and a device whose buses never connect (port 9 on loopback is closed)."""
    url = "mqtt://127.0.0.1:9"
    agg_bus = make_bus(url, deployment, "agg", kind="aggregator")
    aggregator = make_aggregator(synthetic_bundle, agg_bus, deployment)
    device = make_device(synthetic_bundle, url, deployment, "fuzz-dev", PARTITION)
    device.start()
    assert device.wait_ready(30), "the device did not load its student"
    yield aggregator, device
    device.stop()


# In process -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_100k_malformed_payloads_in_process(
    offline_nodes: tuple[Aggregator, Device], synthetic_bundle: SyntheticBundle
) -> None:
    aggregator, device = offline_nodes
    width = int(synthetic_bundle.kernels[PARTITION].shape[0])
    topics = aggregator.topics
    frame_topic = topics.frames("cam")
    partial_topic = topics.partial(PARTITION, "fuzz")
    seen: Counter[str] = Counter()

    @settings(
        max_examples=TOTAL_IN_PROCESS // BATCH,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=st.lists(payloads(width), min_size=BATCH, max_size=BATCH))
    def feed(batch: list[bytes]) -> None:
        for payload in batch:
            now = time.monotonic()
            seen["payloads"] += 1
            seen["bad_frames"] += not frame_is_valid(payload)
            seen["bad_partials"] += not partial_is_valid(payload, width)
            aggregator.handle(Message(frame_topic, payload, False, now))
            aggregator.handle(Message(partial_topic, payload, False, now))
            device._handle(Message(frame_topic, payload, False, now))

    started = time.monotonic()
    feed()
    elapsed = time.monotonic() - started
    counters = aggregator.snapshot()
    assert seen["payloads"] >= TOTAL_IN_PROCESS
    # Most payloads are malformed; the few valid ones must not be counted as rejected.
    assert seen["bad_frames"] > 0.9 * seen["payloads"]
    assert counters["rejected_frame"] == seen["bad_frames"]
    assert counters["rejected_partial"] == seen["bad_partials"]
    assert device.counters["rejected"] == seen["bad_frames"]
    assert device.counters["errors"] == 0
    print(f"{seen['payloads']} payloads in {elapsed:.1f} s: {dict(seen)}")


# Through a real broker ------------------------------------------------------------------------
@pytest.mark.broker
def test_malformed_payloads_through_a_real_broker(
    broker: LocalBroker, synthetic_bundle: SyntheticBundle, deployment: str
) -> None:
    topics = Topics(deployment)
    width = int(synthetic_bundle.kernels[PARTITION].shape[0])
    agg_bus = make_bus(broker.url, deployment, "aggregator", kind="aggregator")
    aggregator = make_aggregator(synthetic_bundle, agg_bus, deployment)
    devices = [
        make_device(synthetic_bundle, broker.url, deployment, f"dev{k}", k)
        for k in range(synthetic_bundle.num_partitions)
    ]
    client = make_bus(broker.url, deployment, "fuzzer", kind="source")
    results: list[Result] = []
    client.subscribe(topics.all_results, lambda m: results.append(Result.decode(m.payload)), qos=1)
    aggregator.start()
    agg_bus.start()
    for device in devices:
        device.start()
    client.start()
    try:
        assert agg_bus.wait_connected(10) and client.wait_connected(10)
        assert all(d.wait_ready(30) for d in devices)
        assert all(d.bus.wait_connected(10) for d in devices)
        time.sleep(0.3)  # let the subscriptions settle

        expected: Counter[str] = Counter()

        @settings(
            max_examples=BROKER_PAYLOADS // BATCH,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=st.lists(payloads(width), min_size=BATCH, max_size=BATCH))
        def publish(batch: list[bytes]) -> None:
            for payload in batch:
                expected["payloads"] += 1
                expected["bad_frames"] += not frame_is_valid(payload)
                expected["bad_partials"] += not partial_is_valid(payload, width)
                # paho refuses a QoS 1 publish while 1000 are unacknowledged: retry then.
                for topic in (topics.frames("cam"), topics.partial(PARTITION, "fuzz")):
                    assert wait_until(lambda t=topic, p=payload: client.publish(t, p, qos=1), 20)
            time.sleep(0.05)  # a modest pace: the nodes, not the broker's queues, are under test

        publish()
        assert expected["payloads"] >= BROKER_PAYLOADS
        bad_frames, bad_partials = expected["bad_frames"], expected["bad_partials"]

        def all_counted() -> bool:
            snap = aggregator.snapshot()
            return (
                snap["rejected_frame"] >= bad_frames
                and snap["rejected_partial"] >= bad_partials
                and all(d.counters["rejected"] >= bad_frames for d in devices)
            )

        assert wait_until(all_counted, 60), (aggregator.snapshot(), bad_frames, bad_partials)
        snap = aggregator.snapshot()
        assert snap["rejected_frame"] == bad_frames
        assert snap["rejected_partial"] == bad_partials
        assert all(d.counters["rejected"] == bad_frames for d in devices)

        # Still alive and correct: a good frame gets a complete result with the right logits.
        pixels = random_frames(1, synthetic_bundle.shape, seed=7)
        good = Frame(id="after-fuzz", source="cam", ts=time.time(), tensor=pixels[0])
        assert client.publish(topics.frames("cam"), good.encode(), qos=1)
        assert wait_until(lambda: any(r.frame == "after-fuzz" for r in results), 20)
        result = next(r for r in results if r.frame == "after-fuzz")
        assert result.reason == "complete" and not result.degraded
        expected = synthetic_bundle.reference_logits(pixels)[0]
        np.testing.assert_allclose(result.logits, expected, atol=2e-2, rtol=1e-2)
    finally:
        client.stop()
        for device in devices:
            device.stop()
        aggregator.stop()
        agg_bus.stop()
