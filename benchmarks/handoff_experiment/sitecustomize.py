"""EXPERIMENT, not product code: what the device's and aggregator's worker-thread hand-off costs.

The runtime hands every frame (device) and every message (aggregator) from paho's network
thread to a worker thread through a queue. This module, put on ``PYTHONPATH`` of the device and
aggregator processes, patches them at interpreter start-up to do the work on the network
thread instead, so ``mqttinfer bench latency`` can measure the difference in one command::

    MQTTINFER_INLINE=aggregator,device PYTHONPATH=benchmarks/handoff_experiment \\
        .venv/bin/python -m mqttinfer bench latency --bundle DIR --out /tmp/inline

(``LocalCluster`` passes ``PYTHONPATH`` on to its children.) The inline variants give up what
the queues are for: a device computing on its network thread cannot drop stale frames or
answer keepalives while it computes, and an aggregator flood is not bounded by the queue. The
aggregator variant keeps a timer thread that ticks deadlines under the same lock.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

_MODE = os.environ.get("MQTTINFER_INLINE", "")

if "device" in _MODE:
    from mqttinfer.runtime import device as _device

    _device_lock = threading.Lock()

    def _on_frame(self: Any, message: Any) -> None:
        self.counters.inc("frames")
        with _device_lock:
            self._handle(message)

    _device.Device._on_frame = _on_frame  # type: ignore[method-assign]

if "aggregator" in _MODE:
    from mqttinfer.runtime import aggregator as _aggregator

    _aggregator_lock = threading.Lock()

    def _enqueue(self: Any, message: Any) -> None:
        with _aggregator_lock:
            self.handle(message)
            self.tick()

    def _run(self: Any) -> None:
        while not self._queue.closed:
            time.sleep(self.settings.tick_ms / 1000.0)
            with _aggregator_lock:
                self.tick()

    _aggregator.Aggregator.enqueue = _enqueue  # type: ignore[method-assign]
    _aggregator.Aggregator._run = _run  # type: ignore[method-assign]
