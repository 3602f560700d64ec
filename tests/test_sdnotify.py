"""sd_notify client against real unix datagram sockets (what systemd listens on)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqttinfer.runtime.sdnotify import (
    WatchdogPinger,
    notify,
    notify_ready,
    notify_status,
    notify_stopping,
    notify_watchdog,
    watchdog_interval_s,
    watchdog_timeout_s,
)

REPO = Path(__file__).resolve().parents[1]


class Listener:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # the NOTIFY_SOCKET value

    def receive(self, timeout_s: float = 5.0) -> str:
        self.sock.settimeout(timeout_s)
        return self.sock.recv(4096).decode()

    def receive_all(self, quiet_s: float = 0.3) -> list[str]:
        messages: list[str] = []
        while True:
            try:
                messages.append(self.receive(quiet_s))
            except TimeoutError:
                return messages


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield Listener(sock, address)


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    name = f"mqttinfer-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        yield Listener(sock, f"@{name}")


def test_without_systemd_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notify_ready() is False
    assert notify_watchdog() is False
    assert notify_stopping() is False
    assert watchdog_interval_s() is None
    assert WatchdogPinger().start() is False


def test_ready_with_status_reaches_a_path_socket(path_socket: Listener) -> None:
    assert notify_ready("serving partition 2") is True
    assert path_socket.receive() == "READY=1\nSTATUS=serving partition 2"


def test_abstract_namespace_socket(abstract_socket: Listener) -> None:
    assert notify_watchdog() is True
    assert abstract_socket.receive() == "WATCHDOG=1"
    assert notify_stopping("stopping: SIGTERM") is True
    assert abstract_socket.receive() == "STOPPING=1\nSTATUS=stopping: SIGTERM"


def test_status_text_is_kept_on_one_line(path_socket: Listener) -> None:
    assert notify_status("waiting\nfor   a plan") is True
    assert path_socket.receive() == "STATUS=waiting for a plan"


def test_a_malformed_assignment_is_a_programming_error(path_socket: Listener) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notify("READY")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notify("STATUS=a\nb")


def test_an_unreachable_socket_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert notify_ready() is False
    assert "could not notify systemd" in caplog.text


def test_unsupported_socket_kinds_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("vsock:2:1234", "@", "relative/path"):
        monkeypatch.setenv("NOTIFY_SOCKET", value)
        assert notify_ready() is False


def test_env_argument_overrides_os_environ(path_socket: Listener) -> None:
    assert notify("READY=1", env={}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": path_socket.address}) is True
    assert path_socket.receive() == "READY=1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nan"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval_s(env) == expected
    timeout = watchdog_timeout_s(env)
    assert timeout == (None if expected is None else 2 * expected)


def test_pinger_pings_while_healthy_and_stops_when_not(path_socket: Listener) -> None:
    healthy = True
    pinger = WatchdogPinger(lambda: healthy, interval_s=0.05)
    assert pinger.start() is True
    assert pinger.start() is False  # already running
    try:
        assert path_socket.receive() == "WATCHDOG=1"
        assert path_socket.receive() == "WATCHDOG=1"
        healthy = False
        time.sleep(0.2)  # let any ping already on its way arrive
        path_socket.receive_all(quiet_s=0.1)
        assert path_socket.receive_all(quiet_s=0.3) == []
        assert pinger.skipped >= 1
    finally:
        pinger.stop()
    assert pinger.pings >= 2


def test_pinger_treats_a_failing_health_check_as_unhealthy(
    path_socket: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bool:
        raise RuntimeError("worker state unreadable")

    pinger = WatchdogPinger(broken, interval_s=0.05)
    pinger.start()
    try:
        assert path_socket.receive_all(quiet_s=0.3) == []
    finally:
        pinger.stop()
    assert pinger.pings == 0
    assert "health check failed" in caplog.text


def test_pinger_takes_its_interval_from_the_environment(
    path_socket: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s -> a ping every 0.05 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    pinger = WatchdogPinger()
    assert pinger.start() is True
    try:
        assert [path_socket.receive() for _ in range(3)] == ["WATCHDOG=1"] * 3
    finally:
        pinger.stop()


# The life cycle the runtime roles follow, in a real child process that systemd would start:
# READY, watchdog pings, then STOPPING on SIGTERM and a clean exit.
_SERVICE = textwrap.dedent(
    """
    import signal, threading
    from mqttinfer.runtime.sdnotify import WatchdogPinger, notify_ready, notify_stopping
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pinger = WatchdogPinger()
    assert pinger.start(), "no watchdog configured"
    notify_ready("serving")
    stop.wait(30)
    notify_stopping()
    pinger.stop()
    """
)


def test_a_service_process_under_a_systemd_like_environment(path_socket: Listener) -> None:
    env = {
        **os.environ,
        "NOTIFY_SOCKET": path_socket.address,
        "WATCHDOG_USEC": "200000",
        "PYTHONPATH": str(REPO),
    }
    # systemd sets WATCHDOG_PID to the service's main pid: `exec` keeps the shell's pid.
    child = subprocess.Popen(
        ["/bin/sh", "-c", f'WATCHDOG_PID=$$ exec "{sys.executable}" -c "$0"', _SERVICE],
        env=env,
    )
    try:
        messages = [path_socket.receive(timeout_s=20) for _ in range(3)]
        assert "READY=1\nSTATUS=serving" in messages
        assert messages.count("WATCHDOG=1") >= 2
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == 0
        assert "STOPPING=1" in path_socket.receive_all()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
