"""Field readers shared by the decoders: each returns a checked value or raises ProtocolError."""

from __future__ import annotations

import math
import re
from typing import Any

from mqttinfer.errors import ProtocolError
from mqttinfer.protocol.limits import SUPPORTED_VERSIONS, Limits
from mqttinfer.topics import is_valid_id

# Frame ids are free-form but printable and bounded; they never become topic levels.
_FRAME_ID = re.compile(r"^[A-Za-z0-9_.:\-]+$")


def require_map(obj: Any, kind: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError("payload must be a map", kind=kind)
    return obj


def check_header(obj: dict[str, Any], kind: str | None) -> None:
    """Check the version (and the ``type`` field, when ``kind`` is given)."""
    version = obj.get("v")
    # isinstance first: a list or map as version must not reach the (hashing) set lookup.
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or version not in SUPPORTED_VERSIONS
    ):
        speaks = sorted(SUPPORTED_VERSIONS)
        raise ProtocolError(
            f"unsupported version {str(version)[:20]!r}; this node speaks {speaks}",
            kind=kind or "message",
        )
    if kind is not None and obj.get("type") != kind:
        raise ProtocolError(f"type is {str(obj.get('type'))[:20]!r}, expected {kind!r}", kind=kind)


def node_id(obj: dict[str, Any], key: str, kind: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not is_valid_id(value):
        raise ProtocolError(f"'{key}' must be an id of 1-64 [A-Za-z0-9_.-]", kind=kind)
    return value


def frame_id(obj: dict[str, Any], key: str, kind: str, limits: Limits) -> str:
    value = obj.get(key)
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= limits.max_id_length
        or not _FRAME_ID.match(value)
    ):
        raise ProtocolError(
            f"'{key}' must be 1-{limits.max_id_length} characters of [A-Za-z0-9_.:-]", kind=kind
        )
    return value


def number(
    obj: dict[str, Any],
    key: str,
    kind: str,
    *,
    minimum: float = 0.0,
    maximum: float = math.inf,
    default: float | None = None,
) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"'{key}' must be a number", kind=kind)
    try:
        number_ = float(value)
    except OverflowError as exc:  # a JSON integer with hundreds of digits
        raise ProtocolError(f"'{key}' is out of range", kind=kind) from exc
    if not math.isfinite(number_) or not minimum <= number_ <= maximum:
        raise ProtocolError(f"'{key}' must be a finite number in [{minimum}, {maximum}]", kind=kind)
    return number_


def integer(
    obj: dict[str, Any],
    key: str,
    kind: str,
    *,
    minimum: int = 0,
    maximum: int = 2**53,
    default: int | None = None,
) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{key}' must be an integer", kind=kind)
    if not minimum <= value <= maximum:
        raise ProtocolError(f"'{key}' must be in [{minimum}, {maximum}]", kind=kind)
    return value


def optional_integer(
    obj: dict[str, Any], key: str, kind: str, *, minimum: int = 0, maximum: int = 2**53
) -> int | None:
    if obj.get(key) is None:
        return None
    return integer(obj, key, kind, minimum=minimum, maximum=maximum)


def boolean(obj: dict[str, Any], key: str, kind: str, *, default: bool | None = None) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"'{key}' must be true or false", kind=kind)
    return value


def text(
    obj: dict[str, Any], key: str, kind: str, *, max_length: int = 256, default: str | None = None
) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or len(value) > max_length:
        raise ProtocolError(
            f"'{key}' must be a string of at most {max_length} characters", kind=kind
        )
    return value


def int_list(obj: dict[str, Any], key: str, kind: str, limits: Limits) -> tuple[int, ...]:
    value = obj.get(key, [])
    if not isinstance(value, list) or len(value) > limits.max_list_items:
        raise ProtocolError(
            f"'{key}' must be a list of at most {limits.max_list_items} integers", kind=kind
        )
    out = []
    for item in value:
        if (
            isinstance(item, bool)
            or not isinstance(item, int)
            or not 0 <= item < limits.max_partitions
        ):
            raise ProtocolError(f"'{key}' must hold partition numbers", kind=kind)
        out.append(item)
    return tuple(out)


def float_map(obj: dict[str, Any], key: str, kind: str, limits: Limits) -> dict[str, float]:
    value = obj.get(key, {})
    if not isinstance(value, dict) or len(value) > limits.max_list_items:
        raise ProtocolError(f"'{key}' must be a map of names to numbers", kind=kind)
    out: dict[str, float] = {}
    for name in value:
        if not isinstance(name, str) or len(name) > 64:
            raise ProtocolError(f"'{key}' keys must be short strings", kind=kind)
        out[name] = number(value, name, kind, minimum=-math.inf)
    return out
