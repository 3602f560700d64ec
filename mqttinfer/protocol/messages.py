"""The binary envelopes: frame, partial and result (msgpack maps, see docs/protocol.md).

Each envelope is a frozen dataclass with ``encode() -> bytes`` and a validating
``decode(payload, limits) -> envelope`` classmethod that raises only ProtocolError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import numpy as np
import numpy.typing as npt

from mqttinfer.errors import ProtocolError
from mqttinfer.protocol import fields as f
from mqttinfer.protocol.limits import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits
from mqttinfer.protocol.tensor import Compression, decode_tensor, encode_tensor

DEFAULT_DEADLINE_MS = 1000
RESULT_REASONS = frozenset({"complete", "deadline", "dead", "evicted"})
LATENCY_KEYS = ("e2e_ms", "queue_ms", "compute_ms", "fc_ms", "transport_ms")


def unpack(payload: bytes, kind: str, limits: Limits, *, typed: bool = True) -> dict[str, Any]:
    """msgpack-decode ``payload`` into a checked map, or raise ProtocolError.

    ``typed`` envelopes carry ``"type": kind``; the compact partial is typed by its topic.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError("payload must be bytes", kind=kind)
    if len(payload) > limits.max_payload_bytes:
        raise ProtocolError(
            f"payload is {len(payload)} bytes, limit {limits.max_payload_bytes}", kind=kind
        )
    try:
        # unpackb bounds every container by the payload length, so the size check above
        # also bounds what decoding can allocate.
        obj = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"not msgpack ({type(exc).__name__})", kind=kind) from exc
    mapping = f.require_map(obj, kind)
    f.check_header(mapping, kind if typed else None)
    return mapping


def pack(obj: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


@dataclass(frozen=True, slots=True)
class Frame:
    """One input from a camera source. ``label`` is optional ground truth (for accuracy)."""

    KIND: ClassVar[str] = "frame"
    id: str
    source: str
    ts: float
    tensor: npt.NDArray[Any]
    deadline_ms: int = DEFAULT_DEADLINE_MS
    label: int | None = None

    def encode(self, *, compress: Compression = "auto") -> bytes:
        body: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "type": self.KIND,
            "id": self.id,
            "src": self.source,
            "ts": float(self.ts),
            "deadline_ms": int(self.deadline_ms),
            "tensor": encode_tensor(
                self.tensor,
                compress=compress,
                dtype=None if self.tensor.dtype == np.uint8 else "f16",
            ),
        }
        if self.label is not None:
            body["label"] = int(self.label)
        return pack(body)

    @classmethod
    def decode(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Frame:
        obj = unpack(payload, cls.KIND, limits)
        return cls(
            id=f.frame_id(obj, "id", cls.KIND, limits),
            source=f.node_id(obj, "src", cls.KIND),
            ts=f.number(obj, "ts", cls.KIND),
            deadline_ms=f.integer(
                obj,
                "deadline_ms",
                cls.KIND,
                minimum=1,
                maximum=limits.max_deadline_ms,
                default=DEFAULT_DEADLINE_MS,
            ),
            label=f.optional_integer(obj, "label", cls.KIND, maximum=1_000_000),
            tensor=decode_tensor(obj.get("tensor"), kind=cls.KIND, limits=limits),
        )


@dataclass(frozen=True, slots=True)
class Partial:
    """One device's pooled student features for one frame.

    This is the message every device sends per frame over a possibly slow radio link, so it is
    compact: single-letter keys, float32 numbers, and no fields the topic already carries
    (``partials/<partition>/<device>`` gives ``partition`` and ``device``). With a frame id of
    up to 15 characters the envelope costs at most 64 bytes beyond the fp16 features for up to
    127 features and no plan version, and at most 74 bytes for up to 32,767 features.
    """

    KIND: ClassVar[str] = "partial"
    frame: str
    partition: int
    device: str
    features: npt.NDArray[Any]
    compute_ms: float
    queue_ms: float
    plan_version: int = 0

    def encode(self, *, int8: bool = False, compress: Compression = "auto") -> bytes:
        body: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "f": self.frame,
            "c": float(self.compute_ms),
            "q": float(self.queue_ms),
            "x": encode_tensor(self.features, int8=int8, compress=compress),
        }
        if self.plan_version:
            body["p"] = int(self.plan_version)
        packed: bytes = msgpack.packb(body, use_bin_type=True, use_single_float=True)
        return packed

    @classmethod
    def decode(
        cls, payload: bytes, *, partition: int, device: str, limits: Limits = DEFAULT_LIMITS
    ) -> Partial:
        """Decode a partial received on ``partials/<partition>/<device>``."""
        obj = unpack(payload, cls.KIND, limits, typed=False)
        features = decode_tensor(obj.get("x"), kind=cls.KIND, limits=limits, rank=1)
        if features.dtype == np.uint8:
            raise ProtocolError("features must be f16, f32 or scaled i8", kind=cls.KIND)
        return cls(
            frame=f.frame_id(obj, "f", cls.KIND, limits),
            partition=partition,
            device=device,
            features=features,
            compute_ms=f.number(obj, "c", cls.KIND, maximum=1e7),
            queue_ms=f.number(obj, "q", cls.KIND, maximum=1e7),
            plan_version=f.integer(obj, "p", cls.KIND, default=0),
        )


@dataclass(frozen=True, slots=True)
class Result:
    """The aggregator's answer for one frame.

    ``reason`` is ``complete`` (one partial per partition), ``deadline`` (fired degraded on
    the frame's deadline), ``dead`` (fired degraded at once because every replica of a missing
    partition is offline) or ``evicted`` (pushed out by the open-slot bound).
    ``contributors`` maps partition number (as a string) to the device whose partial was used.
    """

    KIND: ClassVar[str] = "result"
    frame: str
    source: str
    logits: npt.NDArray[Any]
    label: int
    score: float
    degraded: bool
    missing: tuple[int, ...]
    reason: str
    ts: float
    latency: dict[str, float] = field(default_factory=dict)
    contributors: dict[str, str] = field(default_factory=dict)
    truth: int | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "type": self.KIND,
            "frame": self.frame,
            "src": self.source,
            "logits": encode_tensor(self.logits, dtype="f32", compress="never"),
            "label": int(self.label),
            "score": float(self.score),
            "degraded": bool(self.degraded),
            "missing": [int(p) for p in self.missing],
            "reason": self.reason,
            "ts": float(self.ts),
            "latency": {k: float(v) for k, v in self.latency.items()},
            "contributors": dict(self.contributors),
        }
        if self.truth is not None:
            body["truth"] = int(self.truth)
        return pack(body)

    @classmethod
    def decode(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Result:
        obj = unpack(payload, cls.KIND, limits)
        reason = f.text(obj, "reason", cls.KIND, max_length=16)
        if reason not in RESULT_REASONS:
            raise ProtocolError(
                f"reason {reason!r} is not one of {sorted(RESULT_REASONS)}", kind=cls.KIND
            )
        contributors = obj.get("contributors", {})
        if not isinstance(contributors, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in contributors.items()
        ):
            raise ProtocolError("'contributors' must map strings to strings", kind=cls.KIND)
        return cls(
            frame=f.frame_id(obj, "frame", cls.KIND, limits),
            source=f.node_id(obj, "src", cls.KIND),
            logits=decode_tensor(obj.get("logits"), kind=cls.KIND, limits=limits, rank=1),
            label=f.integer(obj, "label", cls.KIND, maximum=1_000_000),
            score=f.number(obj, "score", cls.KIND, maximum=1.0),
            degraded=f.boolean(obj, "degraded", cls.KIND),
            missing=f.int_list(obj, "missing", cls.KIND, limits),
            reason=reason,
            ts=f.number(obj, "ts", cls.KIND),
            latency=f.float_map(obj, "latency", cls.KIND, limits),
            contributors=contributors,
            truth=f.optional_integer(obj, "truth", cls.KIND, maximum=1_000_000),
        )
