"""The camera-side Source API and the ``source`` CLI, through a real broker."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mqttinfer.errors import BrokerError, InferTimeoutError
from mqttinfer.protocol import Frame
from mqttinfer.protocol import Result as ResultEnvelope
from mqttinfer.runtime.bus import Bus, Message
from mqttinfer.runtime.cluster import DeviceSpec, LocalCluster
from mqttinfer.runtime.local_broker import LocalBroker
from mqttinfer.runtime.source import Result, Source, base36, stream
from mqttinfer.topics import Topics
from tests.busutil import make_bus, subprocess_env, wait_until
from tests.support.synthetic import SyntheticBundle, random_frames

pytestmark = pytest.mark.broker

ANSWER, TWICE, NEVER, SLOW = 0, 1, 2, 3


class Responder:
    """Stands in for the aggregator: answers each frame as its label asks (see the constants)."""

    def __init__(self, url: str, deployment: str, slow_s: float = 0.6) -> None:
        self.topics = Topics(deployment)
        self.slow_s = slow_s
        self.bus: Bus = make_bus(url, deployment, "responder", kind="aggregator")
        self.bus.subscribe(self.topics.all_frames, self._on_frame, qos=0)
        self.timers: list[threading.Timer] = []

    def _on_frame(self, message: Message) -> None:
        frame = Frame.decode(message.payload)
        answer = ResultEnvelope(
            frame=frame.id,
            source=frame.source,
            logits=np.array([0.1, 0.9, 0.0, 0.0], np.float32),
            label=1,
            score=0.9,
            degraded=frame.label == TWICE,
            missing=(1,) if frame.label == TWICE else (),
            reason="deadline" if frame.label == TWICE else "complete",
            ts=time.time(),
            truth=frame.label,
        ).encode()
        topic = self.topics.result(frame.source)
        if frame.label in (ANSWER, TWICE, None):
            self.bus.publish(topic, answer, qos=1)
        if frame.label == TWICE:
            self.bus.publish(topic, answer, qos=1)
        if frame.label == SLOW:
            timer = threading.Timer(self.slow_s, self.bus.publish, (topic, answer), {"qos": 1})
            self.timers.append(timer)
            timer.start()

    def __enter__(self) -> Responder:
        self.bus.start()
        assert self.bus.wait_connected(10)
        return self

    def __exit__(self, *exc: object) -> None:
        for timer in self.timers:
            timer.cancel()
        self.bus.stop()


@pytest.fixture
def responder(broker: LocalBroker, deployment: str) -> Iterator[Responder]:
    with Responder(broker.url, deployment) as running:
        yield running


PIXELS = np.zeros((1, 8, 8), np.uint8)


def test_frame_ids_are_short_unique_and_differ_across_instances(
    broker: LocalBroker, deployment: str
) -> None:
    first = Source(broker.url, "cam", deployment)
    second = Source(broker.url, "cam", deployment)
    ids = [first.next_frame_id() for _ in range(1000)] + [second.next_frame_id()]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-z]{1,6}", i) for i in ids)
    assert base36(36**6 - 1) == "zzzzzz"  # 2 billion frames still fit in 15 characters


def test_infer_returns_the_result_with_local_latency_and_class_name(
    broker: LocalBroker, deployment: str, responder: Responder
) -> None:
    with Source(broker.url, "cam", deployment, classes=["a", "b", "c", "d"]) as cam:
        result = cam.infer(PIXELS, timeout_s=5, label=ANSWER)
        assert isinstance(result, Result)
        assert (result.label, result.class_name, result.truth, result.correct) == (1, "b", 0, False)
        assert 0 < result.latency_ms < 5000
        np.testing.assert_allclose(result.logits, [0.1, 0.9, 0, 0])
        with pytest.raises(InferTimeoutError) as err:
            cam.infer(PIXELS, timeout_s=0.3, label=NEVER)
        assert err.value.timeout_s == 0.3
        assert cam.counters["results"] == 1


def test_lost_late_duplicate_and_unknown_results_are_counted(
    broker: LocalBroker, deployment: str, responder: Responder
) -> None:
    seen: list[Result] = []
    responder.slow_s = 1.6
    with Source(broker.url, "cam", deployment, result_timeout_s=0.8, on_result=seen.append) as cam:
        for label in (ANSWER, TWICE, NEVER, SLOW):
            cam.publish(PIXELS, label)
        results = {r.truth: r for r in itertools.islice(cam.results(timeout_s=5), 3)}
        assert sorted(results) == [ANSWER, TWICE, SLOW]  # the slow one arrives late
        assert results[TWICE].degraded and results[TWICE].missing == (1,)
        # A result for a frame this source never sent (e.g. from before a restart):
        stranger = ResultEnvelope(
            frame="00000000-1", source="cam", logits=np.zeros(4, np.float32), label=0,
            score=0.25, degraded=False, missing=(), reason="complete", ts=time.time(),
        )  # fmt: skip
        responder.bus.publish(Topics(deployment).result("cam"), stranger.encode(), qos=1)
        responder.bus.publish(Topics(deployment).result("cam"), b"garbage", qos=1)
        assert wait_until(lambda: cam.counters["rejected"] == 1)
        summary = cam.summary()
    counters = summary["counters"]
    assert counters["published"] == 4
    assert counters["results"] == 3
    assert (counters["complete"], counters["degraded"]) == (2, 1)
    assert (counters["lost"], counters["late"]) == (2, 1)  # NEVER and SLOW timed out
    assert (counters["duplicates"], counters["unknown"]) == (1, 1)
    assert summary["latency_ms"]["n"] == 2  # late results do not count as latency samples
    assert summary["accuracy"] == pytest.approx(1 / 3)  # only the TWICE frame had truth 1
    assert len(seen) == 3


def test_publish_needs_a_connection_and_a_frame_the_broker_accepts(
    deployment: str,
) -> None:
    with LocalBroker(max_packet_size=4096) as small:
        cam = Source(small.url, "cam", deployment)
        with pytest.raises(BrokerError, match="not connected"):
            cam.publish(PIXELS)
        with cam:
            noise = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
            with pytest.raises(BrokerError, match="maximum packet size"):
                cam.publish(noise)
            assert cam.pending == 0
    with pytest.raises(BrokerError, match="cannot connect"):
        Source(small.url, "cam", deployment, connect_timeout_s=0.5).start()


def test_stream_paces_frames_and_reports(
    broker: LocalBroker, deployment: str, responder: Responder
) -> None:
    with Source(broker.url, "cam", deployment) as cam:
        frames = [(PIXELS, ANSWER)] * 10
        start = time.monotonic()
        report = stream(cam, iter(frames), rate=50.0, count=8)
        elapsed = time.monotonic() - start
    assert report["sent"] == 8 and report["counters"]["results"] == 8
    assert elapsed >= 7 / 50.0
    assert report["accuracy"] == 0.0  # the responder always answers 1, the truth is 0


# -- end to end: real devices and aggregator ---------------------------------------------


@pytest.fixture(scope="module")
def cluster(synthetic_bundle: SyntheticBundle) -> Iterator[LocalCluster]:
    devices = [DeviceSpec("d0", 0), DeviceSpec("d1", 1)]
    with LocalCluster(synthetic_bundle.path, devices, deployment="src") as running:
        yield running


def confident_frames(bundle: SyntheticBundle, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames whose reference top-1 wins by a margin fp16 transport cannot flip."""
    frames = random_frames(count * 4, seed=5)
    logits = bundle.reference_logits(frames)
    top2 = np.sort(logits, axis=1)[:, -2:]
    keep = np.flatnonzero(top2[:, 1] - top2[:, 0] > 0.2)[:count]
    return frames[keep], logits[keep].argmax(axis=1)


def test_source_against_real_devices_and_aggregator(
    cluster: LocalCluster, synthetic_bundle: SyntheticBundle
) -> None:
    frames, labels = confident_frames(synthetic_bundle, 6)
    with Source(cluster.url, "cam", cluster.deployment) as cam:
        for pixels, label in zip(frames[:3], labels[:3], strict=True):
            result = cam.infer(pixels, timeout_s=10, label=int(label))
            assert result.reason == "complete" and result.correct
            assert set(result.contributors) == {"0", "1"}
        ids = [cam.publish(p, int(y)) for p, y in zip(frames[3:], labels[3:], strict=True)]
        arrived = itertools.islice(cam.results(timeout_s=5), len(ids))
        results = {r.frame_id: r for r in arrived}
        assert sorted(results) == sorted(ids)
        expected = synthetic_bundle.reference_logits(frames[3:])
        for frame_id, want in zip(ids, expected, strict=True):
            np.testing.assert_allclose(results[frame_id].logits, want, rtol=1e-2, atol=1e-2)
        assert cam.summary()["accuracy"] == 1.0


def test_source_cli_streams_an_npz(
    cluster: LocalCluster, synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    frames, labels = confident_frames(synthetic_bundle, 8)
    labels[:2] = (labels[:2] + 1) % 4  # two deliberately wrong labels
    np.savez(tmp_path / "frames.npz", x=frames[:, 0], y=labels)  # [N, H, W] works for C = 1
    cmd = [sys.executable, "-m", "mqttinfer.runtime.cli", "source", "--broker", cluster.url]
    cmd += ["--deployment", cluster.deployment, "--npz", str(tmp_path / "frames.npz")]
    cmd += ["--rate", "40", "--json"]
    done = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["sent"] == 8 and report["counters"]["results"] == 8
    assert report["accuracy"] == pytest.approx(6 / 8)
    assert report["latency_ms"]["n"] == 8


def test_source_cli_needs_exactly_one_input(broker: LocalBroker) -> None:
    cmd = [sys.executable, "-m", "mqttinfer.runtime.cli", "source", "--broker", broker.url]
    done = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2 and "--fashion-mnist" in done.stderr
