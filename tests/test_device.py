"""The device agent: a real subprocess answering frames through a real Mosquitto."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from mqttinfer.bundle import Bundle
from mqttinfer.errors import RoleError
from mqttinfer.protocol import Frame, Partial
from mqttinfer.runtime.bus import Bus, Message
from mqttinfer.runtime.device import Device, DeviceSettings
from mqttinfer.runtime.local_broker import LocalBroker
from mqttinfer.runtime.roles import StaticRoleProvider, role_from_bundle, role_from_file
from mqttinfer.topics import Topics
from tests.busutil import Inbox, make_bus, subprocess_env, wait_until
from tests.support.synthetic import SyntheticBundle, random_frames

pytestmark = pytest.mark.broker


def frame_bytes(frame_id: str, pixels: np.ndarray, deadline_ms: int = 5000) -> bytes:
    return Frame(
        id=frame_id, source="cam", ts=time.time(), tensor=pixels, deadline_ms=deadline_ms
    ).encode()


def partials(inbox: Inbox) -> list[Partial]:
    out = []
    for message in inbox.on(""):
        if "/partials/" in message.topic:
            partition, device = message.topic.split("/")[-2:]
            out.append(Partial.decode(message.payload, partition=int(partition), device=device))
    return out


@pytest.fixture
def watcher(broker: LocalBroker, deployment: str) -> Iterator[tuple[Bus, Inbox]]:
    """A client that sees partials, stats and statuses of the deployment."""
    topics = Topics(deployment)
    bus = make_bus(broker.url, deployment, "watcher", kind="monitor")
    inbox = Inbox()
    for topic_filter in (topics.all_partials, topics.all_stats, topics.all_status):
        bus.subscribe(topic_filter, inbox, qos=1)
    with bus:
        assert bus.wait_connected(10)
        yield bus, inbox


def start_device(
    broker: LocalBroker, deployment: str, bundle: Path, *extra: str, node: str = "d0"
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "mqttinfer.runtime.cli", "device", "run", "--id", node]
    cmd += ["--broker", broker.url, "--deployment", deployment, "--bundle", str(bundle)]
    cmd += ["--partition", "1", "--stats-interval", "0.3", *extra]
    return subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE)


def test_device_process_answers_rejects_dedups_and_stops_cleanly(
    broker: LocalBroker,
    deployment: str,
    synthetic_bundle: SyntheticBundle,
    watcher: tuple[Bus, Inbox],
) -> None:
    bus, inbox = watcher
    topics = Topics(deployment)
    proc = start_device(broker, deployment, synthetic_bundle.path)
    try:
        assert inbox.wait(
            lambda: any(s.serving == "ready" for s in inbox.statuses("d0")), timeout_s=30
        ), "device never announced serving=ready"
        ready = next(s for s in inbox.statuses("d0") if s.serving == "ready")
        assert ready.role is not None and (ready.role.partition, ready.role.group) == (1, "g1")

        frames = random_frames(4)
        for i, pixels in enumerate(frames):
            assert bus.publish(topics.frames("cam"), frame_bytes(f"f{i}", pixels), qos=1)
        bad_payloads = [
            b"\xc1 not msgpack",
            msgpack.packb({"v": 99, "type": "frame"}),
            frame_bytes("wrong-shape", np.zeros((3, 5, 5), np.uint8)),
        ]
        for payload in bad_payloads:
            bus.publish(topics.frames("cam"), payload, qos=1)
        bus.publish(topics.frames("cam"), frame_bytes("f0", frames[0]), qos=1)  # duplicate
        bus.publish(topics.frames("cam"), frame_bytes("after", frames[1]), qos=1)

        assert inbox.wait(lambda: len(partials(inbox)) >= 5, timeout_s=15)
        got = {p.frame: p for p in partials(inbox)}
        assert sorted(got) == ["after", "f0", "f1", "f2", "f3"]
        expected = synthetic_bundle.student_features(frames, 1)
        for i in range(4):
            partial = got[f"f{i}"]
            assert (partial.partition, partial.device) == (1, "d0")
            assert partial.features.dtype == np.float16
            np.testing.assert_allclose(partial.features, expected[i], rtol=2e-3, atol=2e-3)
            assert partial.compute_ms > 0 and partial.queue_ms >= 0

        def settled() -> bool:
            stats = inbox.stats("d0")
            return bool(stats) and stats[-1].counters["duplicates"] == 1

        assert inbox.wait(settled, timeout_s=10)
        counters = inbox.stats("d0")[-1].counters
        assert counters["frames"] == 9
        assert counters["answered"] == 5
        assert counters["rejected"] == 2
        assert counters["bad_input"] == 1
        assert counters["duplicates"] == 1
        assert inbox.stats("d0")[-1].latency_ms["compute"].n == 5
        assert proc.poll() is None

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert inbox.wait(lambda: any(s.state == "offline" for s in inbox.statuses("d0")))
        offline = next(s for s in inbox.statuses("d0") if s.state == "offline")
        assert offline.clean and offline.serving == "stopped"
        assert offline.bdseq == ready.bdseq
    finally:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        log = proc.stderr.read().decode(errors="replace")
    assert "rejected frame #1" in log and "Traceback" not in log


def test_device_with_a_bad_role_exits_with_a_clear_error(
    broker: LocalBroker, deployment: str, tmp_path: Path
) -> None:
    role_file = tmp_path / "role.yaml"
    role_file.write_text(
        "group: g0\npartition: 0\nmodel: {sha256: abc}\ninput: {shape: [1, 8, 8]}\n"
    )
    cmd = [sys.executable, "-m", "mqttinfer.runtime.cli", "device", "run", "--id", "d9"]
    cmd += ["--broker", broker.url, "--role", str(role_file)]
    done = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert str(role_file) in done.stderr and "sha256" in done.stderr


# -- in-process: deadline skipping, queue overflow and role files ------------------------


@pytest.fixture
def device(
    broker: LocalBroker, deployment: str, synthetic_bundle: SyntheticBundle
) -> Iterator[Device]:
    loaded = role_from_bundle(
        synthetic_bundle.path, device="d1", deployment=deployment, partition=0, group="g0"
    )
    bus = make_bus(broker.url, deployment, "d1")
    dev = Device(bus, StaticRoleProvider(loaded), DeviceSettings(node="d1", queue_size=4))
    dev.start()
    assert dev.wait_ready(30) and bus.wait_connected(10)
    yield dev
    dev.stop()


def test_frames_that_waited_past_their_deadline_are_skipped(
    device: Device, deployment: str, watcher: tuple[Bus, Inbox]
) -> None:
    _, inbox = watcher
    topic = Topics(deployment).frames("cam")
    pixels = random_frames(1)[0]
    now = time.monotonic()
    # What the network thread hands over: one frame that has queued 0.5 s, one fresh.
    device._on_frame(
        Message(topic, frame_bytes("stale", pixels, deadline_ms=200), False, now - 0.5)
    )
    device._on_frame(Message(topic, frame_bytes("fresh", pixels, deadline_ms=200), False, now))
    assert inbox.wait(lambda: partials(inbox))
    assert wait_until(lambda: device.counters["skipped_deadline"] == 1)
    time.sleep(0.2)
    assert [p.frame for p in partials(inbox)] == ["fresh"]


def test_a_full_queue_drops_the_oldest_frames(device: Device, deployment: str) -> None:
    topic = Topics(deployment).frames("cam")
    pixels = random_frames(1)[0]
    payloads = [frame_bytes(f"q{i}", pixels) for i in range(200)]
    for payload in payloads:  # far faster than the worker: the 4-slot queue overflows
        device._on_frame(Message(topic, payload, False, time.monotonic()))
    assert wait_until(
        lambda: device.counters["answered"] + device.counters["dropped_queue"] == 200, 20
    )
    assert device.counters["dropped_queue"] > 0
    assert device.counters["frames"] == 200
    # Only the first frame found the device idle; the rest came back to back: the queue's.
    assert device.counters["inline"] == 1


def send_spaced_frames(device: Device, deployment: str, count: int) -> None:
    """Frames the way a camera sends them: one at a time, each once the last was answered."""
    topic = Topics(deployment).frames("cam")
    pixels = random_frames(1)[0]
    for i in range(count):
        device._on_frame(Message(topic, frame_bytes(f"s{i}", pixels), False, time.monotonic()))
        assert wait_until(lambda i=i: device.counters["answered"] == i + 1, 10)
        time.sleep(0.002)


def test_an_idle_device_answers_on_the_calling_thread(
    device: Device, deployment: str, watcher: tuple[Bus, Inbox]
) -> None:
    _, inbox = watcher
    send_spaced_frames(device, deployment, 5)
    assert device.counters["inline"] == 5
    assert inbox.wait(lambda: len(partials(inbox)) == 5)
    assert [p.frame for p in partials(inbox)] == [f"s{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("settings", "last_compute_ms"),
    [
        ({"inline_max_ms": 0.0}, 0.0),  # turned off
        ({"slowdown": 1.5}, 0.0),  # emulation sleeps: never on the network thread
        ({"link_rate_bps": 1e9}, 0.0),
        ({"inline_max_ms": 5.0}, 6.0),  # the student's latest compute was too slow
        ({"inline_max_ms": 1e-6}, None),  # too slow already in its warm-up: not even once
    ],
)
def test_the_worker_takes_frames_the_fast_path_must_not(
    broker: LocalBroker,
    deployment: str,
    synthetic_bundle: SyntheticBundle,
    settings: dict[str, float],
    last_compute_ms: float | None,
) -> None:
    loaded = role_from_bundle(
        synthetic_bundle.path, device="d1", deployment=deployment, partition=0, group="g0"
    )
    bus = make_bus(broker.url, deployment, "d1")
    dev = Device(bus, StaticRoleProvider(loaded), DeviceSettings(node="d1", **settings))
    dev.start()
    try:
        assert dev.wait_ready(30) and bus.wait_connected(10)
        if last_compute_ms is not None:
            dev._last_compute_ms = last_compute_ms
        topic = Topics(deployment).frames("cam")
        frame = frame_bytes("w0", random_frames(1)[0])
        dev._on_frame(Message(topic, frame, False, time.monotonic()))
        assert wait_until(lambda: dev.counters["answered"] == 1, 10)
        assert dev.counters["inline"] == 0
    finally:
        dev.stop()


def test_role_file_paths_are_relative_to_the_file(
    synthetic_bundle: SyntheticBundle, tmp_path: Path
) -> None:
    bundle = Bundle.load(synthetic_bundle.path)
    student = bundle.students[1]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "s1.onnx").write_bytes(student.file.read_bytes())
    body = {
        "group": "edge",
        "partition": 1,
        "model": {"sha256": student.sha256, "file": "models/s1.onnx"},
        "input": {"shape": [1, 8, 8], "mean": [0.5], "std": [0.25]},
    }
    (tmp_path / "role.json").write_text(json.dumps(body))
    loaded = role_from_file(tmp_path / "role.json", device="d7", deployment="site")
    assert (loaded.role.device, loaded.role.deployment, loaded.role.group) == ("d7", "site", "edge")
    assert loaded.model == student.file.read_bytes()

    body["device"] = "someone-else"
    (tmp_path / "role.json").write_text(json.dumps(body))
    with pytest.raises(RoleError) as err:
        role_from_file(tmp_path / "role.json", device="d7", deployment="site")
    assert err.value.field == "device"
