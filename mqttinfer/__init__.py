"""mqttinfer: failure-resilient distributed CNN inference over MQTT.

The camera-side API is re-exported here::

    from mqttinfer import Source

    with Source("mqtt://127.0.0.1:1883", source_id="cam1") as cam:
        print(cam.infer(frame).label)

``Source`` and ``Result`` are imported on first use, so ``import mqttinfer.protocol`` (or the
planner) does not pull in paho-mqtt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Result", "Source", "__version__"]

if TYPE_CHECKING:
    from mqttinfer.runtime.source import Result, Source


def __getattr__(name: str) -> Any:
    if name in ("Source", "Result"):
        from mqttinfer.runtime import source

        return getattr(source, name)
    raise AttributeError(f"module 'mqttinfer' has no attribute {name!r}")
