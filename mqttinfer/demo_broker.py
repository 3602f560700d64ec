"""The demo's broker: a private Mosquitto, else an embedded amqtt broker, else a clear error.

Mosquitto is what ``scripts/setup.sh`` installs and what the demo is made for (``LocalCluster``
starts it). Where no mosquitto binary exists, the demo falls back to amqtt, a pure-Python broker,
but only when it is importable: it is not a dependency of mqttinfer. It runs as a child process
(``python -m mqttinfer.demo_broker --port N``) in its own process group, so the demo can stop it
like any other node. Its limits matter to this project: it speaks only MQTT 3.1.1 (the bus falls
back to it by itself) and it does not enforce keepalives, so the will of a *hung* client never
fires (a killed process still closes its socket, and that will does fire).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mqttinfer.errors import BrokerError, DependencyError
from mqttinfer.runtime.local_broker import find_mosquitto, free_port, wait_for_port

log = logging.getLogger(__name__)

AMQTT_CAVEAT = (
    "embedded amqtt broker (no mosquitto here): it speaks only MQTT 3.1.1 and never fires the "
    "will of a hung client; run scripts/setup.sh for Mosquitto"
)
NO_BROKER = (
    "no MQTT broker: mosquitto is not installed and the amqtt fallback is not importable; "
    "run scripts/setup.sh (installs the Debian package 'mosquitto'), or pass --broker URL"
)
_HOST = "127.0.0.1"
_STOP_GRACE_S = 5.0
_PARENT_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class BrokerChoice:
    """Which broker the demo runs: ``mosquitto`` (started by LocalCluster) or ``amqtt``."""

    kind: str
    note: str


def amqtt_importable() -> bool:
    return importlib.util.find_spec("amqtt") is not None


def choose_broker() -> BrokerChoice:
    """Mosquitto when installed, else amqtt when importable, else DependencyError."""
    mosquitto = find_mosquitto()
    if mosquitto is not None:
        return BrokerChoice("mosquitto", f"private Mosquitto ({mosquitto})")
    if amqtt_importable():
        return BrokerChoice("amqtt", AMQTT_CAVEAT)
    raise DependencyError(NO_BROKER)


class EmbeddedBroker:
    """An amqtt broker in a child process on a free loopback port (``start`` / ``close``)."""

    def __init__(self, log_file: Path) -> None:
        self.port = free_port(_HOST)
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        # amqtt misreads an MQTT 5 CONNECT (as a will without a topic) and drops the connection
        # instead of refusing the version, so the bus's 5 -> 3.1.1 fallback never starts: ask
        # for 3.1.1 outright.
        return f"mqtt://{_HOST}:{self.port}?version=3.1.1"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with self.log_file.open("ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mqttinfer.demo_broker", "--port", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        if not wait_for_port(_HOST, self.port, timeout_s):
            self.close()
            tail = self.log_file.read_text(errors="replace")[-600:]
            raise BrokerError(f"the embedded amqtt broker did not listen on {self.url}: {tail}")
        return self

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=_STOP_GRACE_S)


async def _serve(port: int) -> None:
    broker_module = importlib.import_module("amqtt.broker")
    config = {"listeners": {"default": {"type": "tcp", "bind": f"{_HOST}:{port}"}}}
    broker = broker_module.Broker(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    watcher = asyncio.create_task(_stop_when_orphaned(stop))
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await broker.shutdown()


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A demo killed with SIGKILL cannot stop its broker: the broker notices and stops."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(_PARENT_POLL_S)
    log.warning("the demo (pid %d) is gone: stopping the broker", parent)
    stop.set()


def main() -> None:
    """``python -m mqttinfer.demo_broker --port N``: serve until SIGTERM."""
    parser = argparse.ArgumentParser(description="Embedded amqtt broker for mqttinfer demo.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(args.port))


if __name__ == "__main__":
    main()
