"""EXPERIMENT, not product code: what the device's worker-thread hand-off still costs.

A device hands every frame from paho's network thread to its worker thread through a queue, and
the worker's publish goes back to the network thread (inference must stay off the network
thread). This module, put on ``PYTHONPATH`` of the device processes, patches them at
interpreter start-up to do the work on the network thread instead, so ``mqttinfer bench
latency`` can measure the difference in one command::

    MQTTINFER_INLINE=device PYTHONPATH=benchmarks/handoff_experiment \\
        .venv/bin/python -m mqttinfer bench latency --out /tmp/inline

(``LocalCluster`` passes ``PYTHONPATH`` on to its children.) The inline variant gives up what
the queue is for: a device computing on its network thread cannot drop stale frames or answer
keepalives while it computes. The aggregator half of the original experiment became the
product: the aggregator handles every message on its network thread since 2026-11-24
(``mqttinfer/runtime/aggregator.py``), so ``aggregator`` in ``MQTTINFER_INLINE`` is ignored.
"""

from __future__ import annotations

import os
import threading
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
