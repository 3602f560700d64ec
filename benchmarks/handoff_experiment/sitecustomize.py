"""EXPERIMENT, not product code: what the device's fast path saves.

An idle device with a fast student handles a frame on paho's network thread (the fast path,
``Device._try_fast_path``) instead of handing it to its worker thread and the worker's publish
back to the network thread. This module, put on ``PYTHONPATH`` of the device processes with
``MQTTINFER_FAST_PATH=off``, turns the fast path off at interpreter start-up, so that
``mqttinfer bench latency`` can measure both in one sitting::

    MQTTINFER_FAST_PATH=off PYTHONPATH=benchmarks/handoff_experiment \\
        .venv/bin/python -m mqttinfer bench latency --out /tmp/queue-only

(``LocalCluster`` passes ``PYTHONPATH`` on to its children.) ``mqttinfer device run
--inline-max-ms 0`` does the same for one device; this switch reaches every device a benchmark
starts.
"""

from __future__ import annotations

import os
from typing import Any

if os.environ.get("MQTTINFER_FAST_PATH", "") == "off":
    from mqttinfer.runtime import device as _device

    def _never(_self: Any, _message: Any) -> bool:
        return False

    _device.Device._try_fast_path = _never  # type: ignore[method-assign]
