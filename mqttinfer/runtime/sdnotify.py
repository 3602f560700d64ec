"""A tiny sd_notify(3) client: tell systemd that a service is ready, alive, or stopping.

Under a ``Type=notify`` unit systemd passes ``$NOTIFY_SOCKET`` (a unix datagram socket; a
leading ``@`` means the abstract namespace) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC``
(and ``$WATCHDOG_PID``: the watchdog is meant for that process only). Everything here is a
no-op returning False when those variables are absent, so the same code runs unchanged from
a shell, in tests, and under systemd. Sending never raises: a service must not die because
systemd could not be told something.

How a long-running role uses it::

    notify_ready("serving partition 2")          # once initialised (see docs/operations.md)
    pinger = WatchdogPinger(healthy=worker_alive)
    pinger.start()                               # pings every watchdog_interval_s()
    ...                                          # SIGTERM arrives
    notify_stopping()
    pinger.stop()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

_USEC_PER_S = 1_000_000
# systemd's advice (sd_watchdog_enabled(3)): ping at half the timeout, so a late ping survives.
_PING_FRACTION = 0.5


def _notify_address(env: Mapping[str, str]) -> str | bytes | None:
    """The datagram address in ``$NOTIFY_SOCKET``, or None when unset or unsupported."""
    value = env.get("NOTIFY_SOCKET", "")
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: Linux names it with a leading NUL byte instead of '@'.
        return b"\0" + value[1:].encode()
    if value:
        log.debug("NOTIFY_SOCKET %r is not a unix socket; not notifying systemd", value[:80])
    return None


def notify(*assignments: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` assignments as one datagram; True when it was sent.

    ``env`` defaults to ``os.environ`` (tests pass their own).
    """
    for assignment in assignments:
        if "=" not in assignment or "\n" in assignment:
            raise ValueError(f"not a single KEY=VALUE line: {assignment!r}")
    address = _notify_address(os.environ if env is None else env)
    if address is None or not assignments:
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", message[:80], exc)
        return False
    return True


def _status_line(text: str) -> str:
    # STATUS= is one line of free text shown by `systemctl status`.
    return "STATUS=" + " ".join(text.split())


def notify_ready(status: str | None = None) -> bool:
    """READY=1: initialisation is done (systemd then considers the unit started)."""
    fields = ["READY=1"] + ([_status_line(status)] if status else [])
    return notify(*fields)


def notify_status(status: str) -> bool:
    """STATUS=...: a one-line state shown by ``systemctl status``."""
    return notify(_status_line(status))


def notify_watchdog() -> bool:
    """WATCHDOG=1: the service is alive; systemd restarts it when these stop coming."""
    return notify("WATCHDOG=1")


def notify_stopping(status: str | None = None) -> bool:
    """STOPPING=1: a clean shutdown has begun (systemd does not count it as a failure)."""
    fields = ["STOPPING=1"] + ([_status_line(status)] if status else [])
    return notify(*fields)


def watchdog_timeout_s(
    env: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """The unit's ``WatchdogSec`` in seconds, or None when no watchdog applies to this process."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None  # meant for another process (e.g. our parent shell)
        except ValueError:
            return None
    return usec / _USEC_PER_S


def watchdog_interval_s(
    env: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """How often to call ``notify_watchdog()`` (half of WatchdogSec), or None when disabled."""
    timeout = watchdog_timeout_s(env, pid)
    return None if timeout is None else timeout * _PING_FRACTION


class WatchdogPinger:
    """Pings the systemd watchdog from a daemon thread while ``healthy()`` returns True.

    ``healthy`` should say whether the work loop is still making progress (e.g. the worker
    thread ticked within the last few seconds). When it returns False the pings stop and
    systemd, after WatchdogSec, kills the service with SIGABRT and restarts it. ``start()``
    returns False (and starts nothing) when no watchdog is configured.
    """

    def __init__(
        self,
        healthy: Callable[[], bool] | None = None,
        *,
        interval_s: float | None = None,
    ) -> None:
        self._healthy = healthy
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.skipped = 0

    def start(self) -> bool:
        interval = self._interval_s if self._interval_s is not None else watchdog_interval_s()
        if interval is None or self._thread is not None:
            return False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="sd-watchdog", daemon=True
        )
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self, interval_s: float) -> None:
        while True:
            if not self._is_healthy():
                self.skipped += 1
                log.warning("work loop is not healthy; not pinging the systemd watchdog")
            elif notify_watchdog():
                self.pings += 1
            if self._stop.wait(interval_s):
                return

    def _is_healthy(self) -> bool:
        if self._healthy is None:
            return True
        try:
            return bool(self._healthy())
        except Exception:
            log.exception("watchdog health check failed")
            return False
