"""The nodes as the shipped units run them: env file credentials, sd_notify, watchdog, stop.

Each node is a real subprocess started with its unit's ExecStart (only the installed
``mqttinfer`` replaced by ``python -m mqttinfer``, ``%i`` and ``${VAR}`` expanded as systemd
does), the environment of broker init's env file, and NOTIFY_SOCKET / WATCHDOG_USEC pointing
at a datagram socket this test binds, as systemd does. The broker is the production one
(TLS, passwords, ACL: tests/test_security.py's helper), so the credentials must really come
from the environment: the command lines carry none.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mqttinfer.broker_files import parse_env
from mqttinfer.protocol import Status
from mqttinfer.runtime.bus import BrokerConfig, Bus
from mqttinfer.runtime.local_broker import LocalBroker, free_port
from mqttinfer.runtime.source import Source
from mqttinfer.topics import Topics
from tests.busutil import Inbox, make_bus, subprocess_env, wait_until
from tests.support.synthetic import SyntheticBundle, random_frames
from tests.test_security import DEPLOYMENT, SecuredBroker, secured_broker
from tests.test_systemd import parse_unit

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[1]
INSTALLED_CLI = "/opt/mqttinfer/venv/bin/mqttinfer"
# WatchdogSec=2: pings every second, and a worker silent for 2 s counts as hung.
WATCHDOG_USEC = "2000000"
START_TIMEOUT_S = 60.0


class NotifySocket:
    """What systemd listens on: an abstract-namespace datagram socket; keeps what arrived."""

    def __init__(self) -> None:
        self.address = f"@mqttinfer-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.address[1:].encode())
        self.messages: list[tuple[float, str]] = []

    def receive(self, timeout_s: float) -> str | None:
        self.sock.settimeout(timeout_s)
        try:
            text = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.messages.append((time.monotonic(), text))
        return text

    def wait_for(self, field: str, timeout_s: float) -> str:
        """The next message holding the line ``field`` (e.g. ``READY=1``)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            text = self.receive(left)
            if text is not None and field in text.splitlines():
                return text
        raise AssertionError(f"no {field} within {timeout_s} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    listener = NotifySocket()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def secured() -> Iterator[SecuredBroker]:
    with secured_broker() as running:
        yield running


def identity_env(secured: SecuredBroker, identity: str) -> dict[str, str]:
    """broker init's env file of ``identity``, with the CA where this test keeps it."""
    values = parse_env(secured.report.env_file(identity).read_text())
    values["MQTTINFER_CA_FILE"] = str(secured.ca)
    return values


def unit_command(unit: str, instance: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart as systemd would run it, with this checkout's mqttinfer."""
    [exec_start] = parse_unit((REPO / "systemd" / unit).read_text())["Service.ExecStart"]
    words = shlex.split(exec_start.replace("%i", instance))
    assert words[0] == INSTALLED_CLI
    expanded = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in words[1:]]
    return [sys.executable, "-m", "mqttinfer", *expanded]


@contextlib.contextmanager
def node_process(
    command: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def service_env(
    secured: SecuredBroker, identity: str, notify: NotifySocket, **extra: str
) -> dict[str, str]:
    """The environment systemd gives the unit: its EnvironmentFile, Environment= and notify."""
    env = {**subprocess_env(), **identity_env(secured, identity), **extra}
    env.update(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC=WATCHDOG_USEC, PYTHONUNBUFFERED="1")
    for name in ("MQTTINFER_EXIT_WITH_PARENT", "WATCHDOG_PID"):
        env.pop(name, None)
    return env


def watch_status(secured: SecuredBroker, node: str) -> tuple[Bus, Inbox]:
    """The ``monitor`` identity's view of ``status/<node>`` (it logs in from its env file)."""
    env = identity_env(secured, "monitor")
    config = BrokerConfig.from_env_and_url(env["MQTTINFER_BROKER"], env=env)
    bus = Bus(config, node="monitor", kind="monitor", topics=Topics(DEPLOYMENT))
    inbox = Inbox()
    bus.subscribe(bus.topics.status(node), inbox, qos=1)
    bus.start()
    assert bus.wait_connected(10)
    return bus, inbox


def last_status(inbox: Inbox, node: str) -> Status | None:
    statuses = inbox.statuses(node)
    return statuses[-1] if statuses else None


def assert_pings(notify: NotifySocket, count: int) -> None:
    for _ in range(count):
        notify.wait_for("WATCHDOG=1", 5)


def stop_cleanly(proc: subprocess.Popen[bytes], notify: NotifySocket) -> None:
    proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", 10)
    assert proc.wait(timeout=15) == 0


# ------------------------------------------------------------------------------ device
def test_device_unit_logs_in_from_its_env_file_and_talks_to_systemd(
    secured: SecuredBroker, notify: NotifySocket, tmp_path: Path
) -> None:
    env = service_env(secured, "dev-a", notify, STATE_DIRECTORY=str(tmp_path / "state"))
    command = unit_command("mqttinfer-device@.service", "dev-a", env)
    assert not any(env["MQTTINFER_PASSWORD"] in word for word in command)
    monitor, inbox = watch_status(secured, "dev-a")
    log = tmp_path / "device.log"
    try:
        with node_process([*command, "--log-level", "DEBUG"], env, log) as proc:
            ready = notify.wait_for("READY=1", START_TIMEOUT_S)
            assert "STATUS=waiting for a role" in ready.splitlines(), ready  # and connected
            assert inbox.wait(lambda: getattr(last_status(inbox, "dev-a"), "state", "") == "online")
            assert_pings(notify, 2)
            stop_cleanly(proc, notify)
            assert inbox.wait(lambda: getattr(last_status(inbox, "dev-a"), "clean", False))
    finally:
        monitor.stop()
    text = log.read_text()
    assert "connected to mqtts://dev-a@localhost" in text, text[-2000:]
    assert env["MQTTINFER_PASSWORD"] not in text  # not even at DEBUG


@pytest.mark.slow  # the device waits its 10 s for the broker before READY=1
def test_a_device_without_its_broker_is_started_and_keeps_retrying(
    notify: NotifySocket, tmp_path: Path
) -> None:
    """READY=1 after the connect wait even with no broker at all; the watchdog still pings."""
    url = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens there
    env = {**subprocess_env(), "NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC}
    env["MQTTINFER_BROKER"] = url
    env.pop("MQTTINFER_EXIT_WITH_PARENT", None)
    command = [sys.executable, "-m", "mqttinfer", "device", "run", "--id", "lonely"]
    command += ["--state-dir", str(tmp_path / "state")]
    with node_process(command, env, tmp_path / "device.log") as proc:
        ready = notify.wait_for("READY=1", START_TIMEOUT_S)
        assert f"connecting to {url}" in ready, ready
        assert_pings(notify, 1)
        stop_cleanly(proc, notify)
    assert "cannot connect to" in (tmp_path / "device.log").read_text()


def test_sigterm_while_waiting_for_the_broker_stops_the_device_at_once(
    notify: NotifySocket, tmp_path: Path
) -> None:
    env = {**subprocess_env(), "NOTIFY_SOCKET": notify.address}
    env.pop("MQTTINFER_EXIT_WITH_PARENT", None)
    command = [sys.executable, "-m", "mqttinfer", "device", "run", "--id", "lonely"]
    command += ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--state-dir", str(tmp_path)]
    log = tmp_path / "device.log"
    with node_process(command, env, log) as proc:
        # The first failed attempt is logged once the handlers are in place and it waits.
        assert wait_until(lambda: "cannot connect to" in log.read_text(), START_TIMEOUT_S)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 3)  # not after the rest of its 10 s connect wait
        assert proc.wait(timeout=5) == 0


SIGNAL_STRESS_CHILD = """
import sys, threading, time
import mqttinfer.runtime.cli as cli

def busy():  # other threads contend for the GIL, as a node's network and worker threads do
    while True:
        time.sleep(0.0001)

for _ in range(2):
    threading.Thread(target=busy, daemon=True).start()
cli._SERVICE_POLL_S = 0.0003  # wake often: the signal lands inside the wait's own lock dance
while True:
    service = cli.NodeService()
    print("waiting", flush=True)
    print(service.wait(), flush=True)
"""


def test_sigterm_never_wedges_the_node_service() -> None:
    """SIGTERM at any moment of NodeService.wait stops it. The handler once set a
    threading.Event; landing while the main thread held that Event's lock (inside its own
    wait) it deadlocked, about one signal in a few hundred with this polling: such a node
    ignored SIGTERM until systemd killed it."""
    child = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_STRESS_CHILD],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout or ()])
    reader.start()
    try:
        for round_ in range(600):
            assert lines.get(timeout=30) == "waiting\n"  # 30 s: the first round imports
            time.sleep(0.0005 + (round_ % 11) * 0.0003)
            child.send_signal(signal.SIGTERM)
            try:
                answer = lines.get(timeout=5)
            except queue.Empty:
                pytest.fail(f"SIGTERM number {round_ + 1} did not stop NodeService.wait")
            assert answer == "SIGTERM\n"
    finally:
        child.kill()
        child.wait()
        reader.join(timeout=5)


def test_a_wedged_device_worker_stops_the_watchdog_pings(
    broker: LocalBroker,
    deployment: str,
    synthetic_bundle: SyntheticBundle,
    notify: NotifySocket,
    tmp_path: Path,
) -> None:
    """A 1 bit/s emulated uplink parks the worker in one frame for minutes: a hung device.
    The main thread is fine, yet the pings must stop (systemd then kills and restarts it)."""
    env = {**subprocess_env(), "NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC}
    env.pop("MQTTINFER_EXIT_WITH_PARENT", None)
    command = [sys.executable, "-m", "mqttinfer", "device", "run", "--id", "wedge"]
    command += ["--broker", broker.url, "--deployment", deployment, "--link-rate", "1bit/s"]
    command += ["--bundle", str(synthetic_bundle.path), "--partition", "0"]
    watcher = make_bus(broker.url, deployment, "watcher", kind="monitor")
    inbox = Inbox()
    watcher.subscribe(Topics(deployment).status("wedge"), inbox, qos=1)
    log = tmp_path / "device.log"
    with watcher, node_process(command, env, log):
        notify.wait_for("READY=1", START_TIMEOUT_S)
        assert inbox.wait(
            lambda: getattr(last_status(inbox, "wedge"), "serving", "") == "ready", 30
        )
        assert_pings(notify, 2)  # healthy while idle
        with Source(broker.url, source_id="cam", deployment=deployment) as cam:
            cam.publish(random_frames(1, synthetic_bundle.shape)[0])
        # Within WatchdogSec (2 s) plus a ping interval the pings stop for good.
        deadline = time.monotonic() + 15
        while notify.receive(timeout_s=3.5) is not None:
            assert time.monotonic() < deadline, "still pinging with a wedged worker"
    assert "not healthy" in log.read_text()


# ------------------------------------------------------------------------------ aggregator
def test_aggregator_unit_serves_and_talks_to_systemd(
    secured: SecuredBroker,
    synthetic_bundle: SyntheticBundle,
    notify: NotifySocket,
    tmp_path: Path,
) -> None:
    env = service_env(secured, "aggregator", notify, MQTTINFER_BUNDLE=str(synthetic_bundle.path))
    command = unit_command("mqttinfer-aggregator.service", "", env)
    monitor, inbox = watch_status(secured, "aggregator")
    try:
        with node_process(command, env, tmp_path / "aggregator.log") as proc:
            ready = notify.wait_for("READY=1", START_TIMEOUT_S)
            assert "serving bundle" in ready, ready
            assert inbox.wait(
                lambda: getattr(last_status(inbox, "aggregator"), "serving", "") == "ready"
            )
            assert_pings(notify, 2)
            stop_cleanly(proc, notify)
            assert inbox.wait(lambda: getattr(last_status(inbox, "aggregator"), "clean", False))
    finally:
        monitor.stop()


LAUNCHER = """
import subprocess, sys, time
proc = subprocess.Popen(sys.argv[1:])
print(proc.pid, flush=True)
time.sleep(120)
"""


def test_the_aggregator_stops_with_its_killed_launcher(
    broker: LocalBroker,
    deployment: str,
    synthetic_bundle: SyntheticBundle,
    notify: NotifySocket,
) -> None:
    command = [sys.executable, "-m", "mqttinfer", "aggregator", "run", "--broker", broker.url]
    command += ["--deployment", deployment, "--bundle", str(synthetic_bundle.path)]
    env = {**subprocess_env(), "MQTTINFER_EXIT_WITH_PARENT": "1", "NOTIFY_SOCKET": notify.address}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *command], stdout=subprocess.PIPE, text=True, env=env
    )
    pid = 0
    try:
        assert launcher.stdout is not None
        pid = int(launcher.stdout.readline())
        notify.wait_for("READY=1", START_TIMEOUT_S)  # it runs, connected
        launcher.kill()  # no teardown: the aggregator must notice by itself
        launcher.wait(timeout=10)
        assert wait_until(lambda: not _alive(pid), timeout_s=15), "the aggregator outlived it"
    finally:
        launcher.kill()
        launcher.wait(timeout=10)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------------------------ source
def test_source_unit_streams_its_folder_and_talks_to_systemd(
    secured: SecuredBroker, notify: NotifySocket, tmp_path: Path
) -> None:
    """No device answers here: the source streams, waits for results, exits 1 (the unit
    restarts it), and tells systemd it was ready, then stopping."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(random_frames(3)):
        np.save(folder / f"{index}.npy", frame)
    env = service_env(secured, "cam1", notify, MQTTINFER_SOURCE_FOLDER=str(folder))
    command = unit_command("mqttinfer-source@.service", "cam1", env)
    with node_process(command, env, tmp_path / "source.log") as proc:
        ready = notify.wait_for("READY=1", START_TIMEOUT_S)
        assert "streaming to deployment" in ready, ready
        notify.wait_for("STOPPING=1", 30)
        assert proc.wait(timeout=15) == 1  # frames sent, no result: see the docstring
    assert "frames sent 3" in (tmp_path / "source.log").read_text()
