"""Thread-safe building blocks shared by the runtime roles.

- :class:`Counters`: named integer counters that several threads bump.
- :class:`DropOldestQueue`: a bounded FIFO whose ``put`` never blocks; when full it drops the
  *oldest* item (a stale frame is worth less than a fresh one) and counts the drop.
- :class:`RollingQuantiles`: p50/p99/mean over the last N samples (compute, queue latency).
- :class:`Periodic`: a daemon thread calling a function every few seconds (stats publishing).
- :func:`build_stats`: the ``mqttinfer.protocol.Stats`` message from those pieces.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar, cast

import numpy as np

from mqttinfer.protocol import Quantiles, Stats

log = logging.getLogger(__name__)

T = TypeVar("T")
# Put by close(): tells consumers the queue is closed (never handed out as an item).
_CLOSED = object()


class Counters(Mapping[str, int]):
    """Named counters, safe to bump from any thread; reads give a consistent snapshot."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def inc(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def __repr__(self) -> str:
        return f"Counters({self.snapshot()})"


class DropOldestQueue(Generic[T]):
    """A bounded FIFO: ``put`` never blocks; when full, the oldest item is dropped and counted.

    The MQTT network thread only ever calls ``put``, so a slow consumer can never stall it.
    ``counters`` holds ``enqueued``, ``dropped`` (oldest pushed out) and ``dequeued``.

    Built on ``queue.SimpleQueue`` (implemented in C): a hand-off from the network thread to a
    waiting worker costs a few microseconds instead of the ~12 of a ``threading.Condition``,
    which matters once per frame. Producers take a lock among themselves so the bound holds;
    consumers never take it. ``close()`` leaves a marker behind the last item that every
    consumer puts back on seeing it, so it wakes them all.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"queue maxsize must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._producers = threading.Lock()
        self._closed = False
        self.counters = Counters("enqueued", "dropped", "dequeued")

    def put(self, item: T) -> T | None:
        """Append ``item``; return the item dropped to make room, if any."""
        dropped: T | None = None
        with self._producers:
            if self._closed:
                return item
            if self._items.qsize() >= self.maxsize:
                dropped = self._take_oldest()
            self._items.put(item)
        self.counters.inc("enqueued")
        return dropped

    def _take_oldest(self) -> T | None:
        try:
            oldest = self._items.get_nowait()
        except queue.Empty:  # a consumer took it first: there is room now
            return None
        self.counters.inc("dropped")
        return cast(T, oldest)

    def get(self, timeout_s: float | None = None) -> T | None:
        """The oldest item, waiting up to ``timeout_s``; None on timeout or once closed."""
        try:
            if timeout_s is not None and timeout_s <= 0:
                item = self._items.get_nowait()
            else:
                item = self._items.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if item is _CLOSED:
            self._items.put(_CLOSED)  # for the next consumer
            return None
        self.counters.inc("dequeued")
        return cast(T, item)

    def close(self) -> None:
        """Wake every waiting ``get``; later ``put`` calls are refused (returned as dropped).
        Items already queued are still handed out before ``get`` starts returning None."""
        with self._producers:
            if not self._closed:
                self._closed = True
                self._items.put(_CLOSED)

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        size = self._items.qsize()
        return max(0, size - 1) if self._closed else size


class RollingQuantiles:
    """p50 / p99 / mean over the most recent ``window`` samples (thread-safe)."""

    def __init__(self, window: int = 1024) -> None:
        self._samples: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._samples.append(float(value))

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    def quantiles(self) -> Quantiles:
        with self._lock:
            values = np.fromiter(self._samples, dtype=np.float64, count=len(self._samples))
        if values.size == 0:
            return Quantiles(p50=0.0, p99=0.0, mean=0.0, n=0)
        p50, p99 = np.percentile(values, [50.0, 99.0])
        # Microsecond resolution is all a millisecond latency needs; it keeps stats readable.
        return Quantiles(
            p50=round(float(p50), 3),
            p99=round(float(p99), 3),
            mean=round(float(values.mean()), 3),
            n=values.size,
        )


def build_stats(
    *,
    node: str,
    kind: str,
    interval_s: float,
    counters: Mapping[str, int],
    gauges: Mapping[str, float] | None = None,
    latencies: Mapping[str, RollingQuantiles] | None = None,
    ts: float | None = None,
) -> Stats:
    """A ``Stats`` message; latencies with no samples yet are left out."""
    quantiles = {
        name: rolling.quantiles() for name, rolling in (latencies or {}).items() if len(rolling)
    }
    return Stats(
        node=node,
        kind=kind,
        ts=round(time.time() if ts is None else ts, 3),
        interval_s=float(interval_s),
        counters=dict(counters),
        gauges={k: round(float(v), 3) for k, v in (gauges or {}).items()},
        latency_ms=quantiles,
    )


class Periodic:
    """Calls ``action`` every ``interval_s`` on a daemon thread until ``stop()``.

    Exceptions from ``action`` are logged and the schedule goes on (stats must never kill a node).
    """

    def __init__(self, interval_s: float, action: Callable[[], None], *, name: str) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._action()
            except Exception:
                log.exception("periodic task %s failed", self._thread.name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
