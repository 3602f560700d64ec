"""Helpers for tests that watch a real broker: collect messages and wait for conditions."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mqttinfer.protocol import Stats, Status
from mqttinfer.runtime.bus import BrokerConfig, Bus, Message
from mqttinfer.topics import Topics

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python that must import this checkout's mqttinfer."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


class Inbox:
    """Collects messages from a bus handler (thread-safe)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        with self._lock:
            self.messages.append(message)

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def on(self, suffix: str) -> list[Message]:
        return [m for m in self.snapshot() if m.topic.endswith(suffix)]

    def statuses(self, node: str) -> list[Status]:
        found = [Status.decode(m.payload) for m in self.snapshot() if "/status/" in m.topic]
        return [s for s in found if s.node == node]

    def stats(self, node: str) -> list[Stats]:
        return [Stats.decode(m.payload) for m in self.on(f"/stats/{node}")]

    def wait(self, predicate: Callable[[], object], timeout_s: float = 10.0) -> bool:
        return wait_until(predicate, timeout_s)


def make_bus(url: str, deployment: str, node: str, kind: str = "device", **cfg: object) -> Bus:
    return Bus(BrokerConfig.from_url(url, **cfg), node=node, kind=kind, topics=Topics(deployment))
