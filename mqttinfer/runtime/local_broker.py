"""Start a private Mosquitto on a free loopback port (demo, benchmarks and tests).

The broker runs as a child process with a generated config in a temporary directory; it can be
killed and restarted on the same port to exercise reconnects. A small guard process (plain
Python, no imports beyond the standard library) stops the broker and removes its directory if
the process that started it dies without stopping it (``kill -9``, a crash): Mosquitto knows
nothing of its launcher, and would otherwise listen on its loopback port forever.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from mqttinfer.errors import BrokerError

log = logging.getLogger(__name__)

_SEARCH_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
# Large enough for student models sent whole; plan apply chunks anything bigger.
DEFAULT_MAX_PACKET = 16 * 1024 * 1024


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in _SEARCH_PATHS if os.access(p, os.X_OK)), None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


# Run as `python -I -c _GUARD <launcher pid> <broker pid> <broker dir>`; checks once a second.
_GUARD = """
import os, shutil, signal, sys, time
launcher, broker, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1.0)
    try:
        os.kill(broker, 0)
    except ProcessLookupError:
        sys.exit(0)  # the broker is gone: nothing left to guard
    if os.getppid() != launcher:  # the launcher died without stopping its broker
        try:
            os.kill(broker, signal.SIGTERM)
        except ProcessLookupError:
            pass
        time.sleep(1.0)
        shutil.rmtree(folder, ignore_errors=True)
        sys.exit(0)
"""


class LocalBroker:
    """A Mosquitto child process listening on ``127.0.0.1:<port>``.

    Use as a context manager, or call ``start()`` / ``stop()``. ``kill()`` sends SIGKILL (a crash);
    ``start()`` again reuses the same port so clients can reconnect.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        max_packet_size: int = DEFAULT_MAX_PACKET,
        extra_config: str = "",
        binary: str | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.max_packet_size = max_packet_size
        self._extra = extra_config
        # A ready config (e.g. broker init's) that must listen on ``host:port`` itself.
        self._config_file = config_file
        self._binary = binary or find_mosquitto()
        self._dir = Path(tempfile.mkdtemp(prefix="mqttinfer-broker-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._guard: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    @property
    def stderr_path(self) -> Path:
        return self._dir / "mosquitto.stderr"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Mosquitto's process id while it runs, else None."""
        return self._proc.pid if self._proc is not None and self.running else None

    def config_text(self) -> str:
        return (
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            f"max_packet_size {self.max_packet_size}\n"
            "max_queued_messages 10000\n"
            "persistence false\n"
            # Small messages that follow one another (frame, partial, result) otherwise wait
            # for delayed ACKs: a cluster round trip measured 28 ms median without, 2.3 ms with.
            "set_tcp_nodelay true\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"{self._extra}\n"
        )

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        if self._binary is None:
            raise BrokerError(
                "mosquitto is not installed; run scripts/setup.sh (installs the Debian package "
                "'mosquitto') or pass --broker URL of a running broker"
            )
        if self.running:
            return self
        self._stop_guard()  # the guard of a broker that died on its own
        conf = self._config_file
        if conf is None:
            conf = self._dir / "mosquitto.conf"
            conf.write_text(self.config_text())
            self._make_log_writable()
        # stderr goes to a file: a config that logs to stderr must never block on a full pipe.
        with self.stderr_path.open("ab") as stderr:
            self._proc = subprocess.Popen(
                [self._binary, "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                cwd=self._dir,  # a config without persistence_location saves mosquitto.db here
            )
        if not wait_for_port(self.host, self.port, timeout_s):
            err = self._stderr_tail()
            self.stop()
            raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port}: {err}")
        watched = [str(os.getpid()), str(self._proc.pid), str(self._dir)]
        self._guard = subprocess.Popen(
            [sys.executable, "-I", "-c", _GUARD, *watched],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the launcher must not stop it first
        )
        log.debug("mosquitto pid %s on %s", self._proc.pid, self.url)
        return self

    def _make_log_writable(self) -> None:
        # Started as root, Mosquitto drops to the 'mosquitto' user and could not open a log
        # inside our private (0700) temporary directory.
        self._dir.chmod(0o755)
        self.log_path.touch()
        self.log_path.chmod(0o666)

    def _stderr_tail(self) -> str:
        if self._proc is None or self._proc.poll() is None:
            return "(still starting)"
        return self.stderr_path.read_bytes().decode(errors="replace")[-500:]

    def _stop_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None and guard.poll() is None:
            guard.terminate()
            try:
                guard.wait(timeout=5)
            except subprocess.TimeoutExpired:
                guard.kill()
                guard.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the broker (a crash: no clean disconnects, wills fire on restart only)."""
        self._stop_guard()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=5)

    def stop(self) -> None:
        self._stop_guard()
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
