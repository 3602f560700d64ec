"""The local cluster: real device and aggregator processes, signals, broker restarts."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mqttinfer.errors import ConfigError, MqttInferError
from mqttinfer.protocol import Frame, Result, Status
from mqttinfer.runtime.bus import Bus, Message
from mqttinfer.runtime.cluster import DeviceSpec, LocalCluster, StatusBoard
from tests.busutil import make_bus, subprocess_env, wait_until
from tests.support.synthetic import SyntheticBundle, random_frames

pytestmark = pytest.mark.broker


class Camera:
    """Publishes frames and collects results (the test's stand-in for a Source)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.topics = cluster.topics
        self.results: dict[str, Result] = {}
        self._arrived = threading.Condition()
        self.bus: Bus = make_bus(cluster.url, cluster.deployment, "cam", kind="source")
        self.bus.subscribe(self.topics.result("cam"), self._on_result, qos=1)
        self.bus.start()
        assert self.bus.wait_connected(10)

    def _on_result(self, message: Message) -> None:
        result = Result.decode(message.payload)
        with self._arrived:
            self.results[result.frame] = result
            self._arrived.notify_all()

    def infer(self, frame_id: str, pixels: np.ndarray, deadline_ms: int = 2000) -> Result:
        frame = Frame(
            id=frame_id, source="cam", ts=time.time(), tensor=pixels, deadline_ms=deadline_ms
        )
        assert self.bus.wait_connected(20)
        assert self.bus.publish(self.topics.frames("cam"), frame.encode(), qos=1)
        with self._arrived:
            assert self._arrived.wait_for(lambda: frame_id in self.results, timeout=10)
            return self.results[frame_id]


@pytest.fixture
def cluster(synthetic_bundle: SyntheticBundle) -> Iterator[LocalCluster]:
    devices = [DeviceSpec("d0", 0), DeviceSpec("d1", 1), DeviceSpec("d2", 1, slowdown=2.0)]
    with LocalCluster(synthetic_bundle.path, devices, deployment="c1") as running:
        yield running


def test_cluster_infers_survives_faults_and_tears_down(
    cluster: LocalCluster, synthetic_bundle: SyntheticBundle
) -> None:
    frames = random_frames(3)
    camera = Camera(cluster)
    try:
        expected = synthetic_bundle.reference_logits(frames)
        result = camera.infer("ok", frames[0])
        assert (result.reason, result.degraded) == ("complete", False)
        np.testing.assert_allclose(result.logits, expected[0], rtol=1e-2, atol=1e-2)

        # A crashed replica: its will arrives, the other replica of partition 1 answers.
        cluster.kill("d1")
        cluster.wait_offline(["d1"], timeout_s=15)
        assert not cluster.alive("d1") and cluster.pid("d1") is None
        result = camera.infer("one-replica", frames[1])
        assert (result.reason, result.contributors["1"]) == ("complete", "d2")

        # A frozen process stays in its process group and comes back when thawed.
        cluster.pause("d2")
        cluster.resume("d2")
        assert cluster.alive("d2")

        cluster.restart("d1")
        assert cluster.status("d1") is not None and cluster.status("d1").serving == "ready"

        # The broker crashes and comes back on the same port: every node reconnects.
        cluster.restart_broker()
        cluster.wait_ready(cluster.nodes, timeout_s=30)
        result = camera.infer("after-broker", frames[2])
        assert result.reason == "complete"
        np.testing.assert_allclose(result.logits, expected[2], rtol=1e-2, atol=1e-2)
        pids = [cluster.pid(name) for name in cluster.nodes]
        assert all(isinstance(pid, int) for pid in pids)
        assert cluster.broker is not None and isinstance(cluster.broker.pid, int)
    finally:
        camera.bus.stop()
    log_dir = cluster.log_dir
    cluster.close()
    assert not any(cluster.alive(name) for name in cluster.nodes)
    assert cluster.broker is None or cluster.broker.pid is None
    for pid in pids:  # each node was its own process group; nothing is left behind
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert not log_dir.exists()


def test_a_node_that_dies_at_start_is_reported_with_its_log(
    synthetic_bundle: SyntheticBundle,
) -> None:
    bad = DeviceSpec("bad", partition=7)  # the bundle has partitions 0 and 1
    cluster = LocalCluster(synthetic_bundle.path, [bad], aggregator=False, deployment="c2")
    with pytest.raises(MqttInferError, match=r"(?s)bad exited with code 2.*partition 7"):
        cluster.start(timeout_s=60)
    assert not cluster.alive("bad")
    assert "partition 7" in cluster.log_tail("bad")  # logs are kept when the start fails
    shutil.rmtree(cluster.log_dir)


def test_device_ids_must_be_unique(synthetic_bundle: SyntheticBundle) -> None:
    with pytest.raises(ConfigError, match="unique"):
        LocalCluster(synthetic_bundle.path, [DeviceSpec("d", 0), DeviceSpec("d", 1)])


def _status(node: str, state: str, bdseq: int, serving: str = "ready") -> Message:
    status = Status(node=node, kind="device", state=state, bdseq=bdseq, ts=0.0, serving=serving)
    return Message("t", status.encode(), False, 0.0)


def test_status_board_ignores_stale_wills() -> None:
    board = StatusBoard()
    board.handle(_status("d", "online", 5))
    board.handle(_status("d", "offline", 4))  # the will of an older connection arrives late
    assert board.get("d").state == "online"  # type: ignore[union-attr]
    board.handle(_status("d", "offline", 5))
    assert board.get("d").state == "offline"  # type: ignore[union-attr]
    board.handle(_status("d", "online", 5))  # a birth cannot follow its own connection's death
    assert board.get("d").state == "offline"  # type: ignore[union-attr]
    board.handle(Message("t", b"garbage", False, 0.0))
    assert board.rejected == 1
    assert wait_until(lambda: board.wait(lambda s: "d" in s, 0.1))


LAUNCHER = """
import sys, time
from mqttinfer.runtime.cluster import DeviceSpec, LocalCluster
cluster = LocalCluster(sys.argv[1], [DeviceSpec("d0", 0)], aggregator=False, deployment="orph")
cluster.start(timeout_s=60)
print(cluster.pid("d0"), cluster.broker.pid, cluster.broker.log_path.parent, flush=True)
time.sleep(120)
"""


def test_devices_and_broker_do_not_outlive_a_killed_launcher(
    synthetic_bundle: SyntheticBundle,
) -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(synthetic_bundle.path)],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    device_pid = broker_pid = 0
    try:
        assert launcher.stdout is not None
        device, broker, folder = launcher.stdout.readline().split()
        device_pid, broker_pid = int(device), int(broker)
        assert Path(folder).is_dir()
        launcher.kill()  # no atexit, no teardown: the device and the broker's guard must notice
        launcher.wait(timeout=10)

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        assert wait_until(lambda: gone(device_pid), timeout_s=15)
        assert wait_until(lambda: gone(broker_pid), timeout_s=15)
        assert wait_until(lambda: not Path(folder).exists(), timeout_s=5)
    finally:
        launcher.kill()
        launcher.wait(timeout=10)
        for pid in (device_pid, broker_pid):  # the orphaned broker (and a device that stayed)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
