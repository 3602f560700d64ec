"""The wire protocol (docs/protocol.md is the human contract; tests check both agree)."""

from __future__ import annotations

from mqttinfer.protocol.control import (
    InputSpec,
    ModelRef,
    Quantiles,
    Role,
    RoleSummary,
    Stats,
    Status,
)
from mqttinfer.protocol.limits import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits
from mqttinfer.protocol.messages import Frame, Partial, Result
from mqttinfer.protocol.tensor import decode_tensor, encode_tensor

__all__ = [
    "DEFAULT_LIMITS",
    "PROTOCOL_VERSION",
    "Frame",
    "InputSpec",
    "Limits",
    "ModelRef",
    "Partial",
    "Quantiles",
    "Result",
    "Role",
    "RoleSummary",
    "Stats",
    "Status",
    "decode_tensor",
    "encode_tensor",
]
