"""The JSON control messages: status (birth/will), stats, and device role (plan/<device>).

They are JSON, not msgpack, so that ``mosquitto_sub -t 'mqttinfer/#' -v`` reads well and any
dashboard can consume them. Decoders validate and raise only ProtocolError.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from mqttinfer.errors import ProtocolError
from mqttinfer.protocol import fields as f
from mqttinfer.protocol.limits import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits

NODE_KINDS = frozenset({"device", "aggregator", "source", "apply", "monitor", "profiler"})
STATES = frozenset({"online", "offline"})
SERVING = frozenset({"idle", "loading", "ready", "error", "stopped"})
_MAX_JSON_BYTES = 256 * 1024


def load_json(payload: bytes, kind: str, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse a JSON control payload into a checked map (version checked), or ProtocolError."""
    if len(payload) > min(limits.max_payload_bytes, _MAX_JSON_BYTES):
        raise ProtocolError(f"payload is {len(payload)} bytes, too large", kind=kind)
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON ({type(exc).__name__})", kind=kind) from exc
    mapping = f.require_map(obj, kind)
    version = mapping.get("v")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported version {str(version)[:20]!r}", kind=kind)
    return mapping


def dump_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class RoleSummary:
    """What a device serves, as announced in its status (the aggregator tracks liveness by it)."""

    group: str
    partition: int
    plan: str = ""
    plan_version: int = 0
    model_sha256: str = ""

    @classmethod
    def from_obj(cls, obj: Any, kind: str) -> RoleSummary:
        mapping = f.require_map(obj, kind)
        return cls(
            group=f.node_id(mapping, "group", kind),
            partition=f.integer(
                mapping, "partition", kind, maximum=DEFAULT_LIMITS.max_partitions - 1
            ),
            plan=f.text(mapping, "plan", kind, max_length=128, default=""),
            plan_version=f.integer(mapping, "plan_version", kind, default=0),
            model_sha256=f.text(mapping, "model_sha256", kind, max_length=64, default=""),
        )


@dataclass(frozen=True, slots=True)
class Status:
    """Retained on ``status/<node>``: the birth message (online) and the will (offline).

    ``bdseq`` grows on every connect of the node, so a monitor can tell a stale will (an
    offline message whose bdseq is older than the online one it already has) from a real one.
    """

    KIND: ClassVar[str] = "status"
    node: str
    kind: str
    state: str
    bdseq: int
    ts: float
    version: str = ""
    role: RoleSummary | None = None
    serving: str = "idle"
    error: str | None = None
    clean: bool = False

    def encode(self) -> bytes:
        body = asdict(self)
        body["v"] = PROTOCOL_VERSION
        return dump_json(body)

    @classmethod
    def decode(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Status:
        obj = load_json(payload, cls.KIND, limits)
        kind = f.text(obj, "kind", cls.KIND, max_length=16)
        state = f.text(obj, "state", cls.KIND, max_length=16)
        serving = f.text(obj, "serving", cls.KIND, max_length=16, default="idle")
        if kind not in NODE_KINDS or state not in STATES or serving not in SERVING:
            raise ProtocolError("kind, state or serving has an unknown value", kind=cls.KIND)
        role_obj = obj.get("role")
        error = obj.get("error")
        if error is not None and not isinstance(error, str):
            raise ProtocolError("'error' must be a string or null", kind=cls.KIND)
        return cls(
            node=f.node_id(obj, "node", cls.KIND),
            kind=kind,
            state=state,
            bdseq=f.integer(obj, "bdseq", cls.KIND),
            ts=f.number(obj, "ts", cls.KIND),
            version=f.text(obj, "version", cls.KIND, max_length=64, default=""),
            role=None if role_obj is None else RoleSummary.from_obj(role_obj, cls.KIND),
            serving=serving,
            error=None if error is None else error[:512],
            clean=f.boolean(obj, "clean", cls.KIND, default=False),
        )


@dataclass(frozen=True, slots=True)
class Quantiles:
    p50: float
    p99: float
    mean: float
    n: int


@dataclass(frozen=True, slots=True)
class Stats:
    """Published every few seconds on ``stats/<node>`` (not retained)."""

    KIND: ClassVar[str] = "stats"
    node: str
    kind: str
    ts: float
    interval_s: float
    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, Quantiles] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = asdict(self)
        body["v"] = PROTOCOL_VERSION
        return dump_json(body)

    @classmethod
    def decode(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Stats:
        obj = load_json(payload, cls.KIND, limits)
        kind = f.text(obj, "kind", cls.KIND, max_length=16)
        if kind not in NODE_KINDS:
            raise ProtocolError(f"unknown node kind {kind!r}", kind=cls.KIND)
        counters = obj.get("counters", {})
        if not isinstance(counters, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in counters.items()
        ):
            raise ProtocolError("'counters' must map names to integers", kind=cls.KIND)
        return cls(
            node=f.node_id(obj, "node", cls.KIND),
            kind=kind,
            ts=f.number(obj, "ts", cls.KIND),
            interval_s=f.number(obj, "interval_s", cls.KIND, maximum=86400.0),
            counters=counters,
            gauges=f.float_map(obj, "gauges", cls.KIND, limits),
            latency_ms=_decode_quantiles(obj.get("latency_ms", {}), limits),
        )


def _decode_quantiles(obj: Any, limits: Limits) -> dict[str, Quantiles]:
    if not isinstance(obj, dict) or len(obj) > limits.max_list_items:
        raise ProtocolError("'latency_ms' must be a map", kind="stats")
    out: dict[str, Quantiles] = {}
    for name, item in obj.items():
        mapping = f.require_map(item, "stats")
        out[str(name)[:64]] = Quantiles(
            p50=f.number(mapping, "p50", "stats"),
            p99=f.number(mapping, "p99", "stats"),
            mean=f.number(mapping, "mean", "stats"),
            n=f.integer(mapping, "n", "stats"),
        )
    return out


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Where a device gets its student: a sha256, its size, and a local file or model topic."""

    sha256: str
    size: int = 0
    arch: str = ""
    file: str | None = None


@dataclass(frozen=True, slots=True)
class InputSpec:
    """How a device turns a uint8 frame into the model input: x = (u8 * scale - mean) / std."""

    shape: tuple[int, ...]
    dtype: str = "uint8"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclass(frozen=True, slots=True)
class Role:
    """A device's role, retained on ``plan/<device>`` by ``plan apply`` or read from a file."""

    KIND: ClassVar[str] = "role"
    device: str
    group: str
    partition: int
    model: ModelRef
    input: InputSpec
    plan: str = ""
    plan_version: int = 0
    deployment: str = "default"
    pool: bool = True

    def summary(self) -> RoleSummary:
        return RoleSummary(
            group=self.group,
            partition=self.partition,
            plan=self.plan,
            plan_version=self.plan_version,
            model_sha256=self.model.sha256,
        )

    def encode(self) -> bytes:
        body = asdict(self)
        body["v"] = PROTOCOL_VERSION
        return dump_json(body)

    @classmethod
    def decode(cls, payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Role:
        return cls.from_obj(load_json(payload, cls.KIND, limits))

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Role:
        kind = cls.KIND
        model = f.require_map(obj.get("model"), kind)
        inp = f.require_map(obj.get("input"), kind)
        sha = f.text(model, "sha256", kind, max_length=64)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ProtocolError("'model.sha256' must be 64 lowercase hex digits", kind=kind)
        model_file = model.get("file")
        if model_file is not None and not isinstance(model_file, str):
            raise ProtocolError("'model.file' must be a path string", kind=kind)
        return cls(
            device=f.node_id(obj, "device", kind),
            group=f.node_id(obj, "group", kind),
            partition=f.integer(obj, "partition", kind, maximum=DEFAULT_LIMITS.max_partitions - 1),
            model=ModelRef(
                sha256=sha,
                size=f.integer(model, "size", kind, default=0),
                arch=f.text(model, "arch", kind, max_length=64, default=""),
                file=model_file,
            ),
            input=_input_spec(inp, kind),
            plan=f.text(obj, "plan", kind, max_length=128, default=""),
            plan_version=f.integer(obj, "plan_version", kind, default=0),
            deployment=f.node_id({"d": obj.get("deployment", "default")}, "d", kind),
            pool=f.boolean(obj, "pool", kind, default=True),
        )


def _input_spec(obj: dict[str, Any], kind: str) -> InputSpec:
    shape = obj.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 4096 for d in shape)
    ):
        raise ProtocolError("'input.shape' must be a list of 1-3 positive integers", kind=kind)
    mean, std = obj.get("mean", [0.0]), obj.get("std", [1.0])
    for name, values in (("mean", mean), ("std", std)):
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            raise ProtocolError(f"'input.{name}' must be a list of numbers", kind=kind)
    if any(v <= 0 for v in std):
        raise ProtocolError("'input.std' values must be positive", kind=kind)
    dtype = f.text(obj, "dtype", kind, max_length=16, default="uint8")
    if dtype not in {"uint8", "float16", "float32"}:
        raise ProtocolError("'input.dtype' must be uint8, float16 or float32", kind=kind)
    return InputSpec(
        shape=tuple(shape),
        dtype=dtype,
        scale=f.number(obj, "scale", kind, default=1.0 / 255.0, maximum=1e6),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )
