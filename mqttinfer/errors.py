"""The one exception hierarchy of mqttinfer.

::

    MqttInferError
    ├── ConfigError          a file or option is wrong (names file, field and fix)
    │   ├── BundleError      a model bundle is missing, inconsistent or fails its hash
    │   ├── RoleError        a device role (file or plan topic) is invalid
    │   └── InventoryError   a device inventory file is invalid
    ├── ProtocolError        a message on the wire is malformed (counted, logged, never fatal)
    ├── PlanningError        the planner cannot satisfy the constraints (names them and devices)
    ├── BrokerError          the broker cannot be reached, started, or refused us
    ├── InferenceError       onnxruntime failed on a model or an input
    ├── InferTimeout         Source.infer() got no result before its timeout
    └── DependencyError      an optional extra (train, plots) is needed but missing

Every error carries enough context to act on: ``str(err)`` is a complete sentence.
"""

from __future__ import annotations


class MqttInferError(Exception):
    """Base class of every error mqttinfer raises on purpose."""


class ConfigError(MqttInferError):
    """A configuration file or command-line option is invalid.

    ``source`` is the file (or option) and ``field`` the offending key, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.source = source
        self.field = field
        self.fix = fix
        parts = []
        if source:
            parts.append(f"{source}")
        if field:
            parts.append(f"field '{field}'")
        prefix = ": ".join(parts)
        text = f"{prefix}: {message}" if prefix else message
        if fix:
            text = f"{text} (fix: {fix})"
        super().__init__(text)


class BundleError(ConfigError):
    """A model bundle (bundle.json + ONNX files + head) is missing or inconsistent."""


class RoleError(ConfigError):
    """A device role is invalid."""


class InventoryError(ConfigError):
    """A device inventory file is invalid."""


class ProtocolError(MqttInferError):
    """A message on the wire does not follow docs/protocol.md.

    Nodes catch this, count it as rejected, log it (payload truncated) and carry on.
    ``kind`` names the envelope that was being decoded (frame, partial, result, ...).
    """

    def __init__(self, message: str, *, kind: str = "message") -> None:
        self.kind = kind
        super().__init__(f"invalid {kind}: {message}")


class PlanningError(MqttInferError):
    """No plan satisfies the constraints; the message names the constraint and the devices."""

    def __init__(
        self, message: str, *, constraint: str = "", devices: tuple[str, ...] = ()
    ) -> None:
        self.constraint = constraint
        self.devices = devices
        super().__init__(message)


class BrokerError(MqttInferError):
    """The MQTT broker could not be started, reached, or refused the connection."""


class InferenceError(MqttInferError):
    """onnxruntime could not load or run a model."""


class InferTimeoutError(MqttInferError, TimeoutError):
    """No result arrived for a frame before the caller's timeout."""

    def __init__(self, frame_id: str, timeout_s: float) -> None:
        self.frame_id = frame_id
        self.timeout_s = timeout_s
        super().__init__(f"no result for frame {frame_id} within {timeout_s:.3f} s")


class DependencyError(MqttInferError):
    """An optional dependency is missing; the message says which extra to install."""
