"""Device profiling: measure what the planner needs to know about a device, on the device.

``mqttinfer devices profile --id ID`` runs on the device itself and measures:

- **flops**: sustained FLOP/s of onnxruntime on a CNN, ``2 × MACs / median inference time``. The
  model is the largest student of a bundle (``--bundle``, else the shipped demo bundle when it is
  installed), else :func:`reference_model`, a two-layer 3×3 convolution network built here
  (so the measurement needs neither ``onnx`` nor a bundle).
- **memory**: bytes available now: ``MemAvailable`` of /proc/meminfo, lowered to the cgroup v2
  limit minus usage when the process runs in a memory-limited cgroup (a container, a systemd
  unit with ``MemoryMax=``).
- **rate**: the bit rate of a burst of QoS 1 messages echoed through the broker on the
  device's private probe topic: bytes × 8 / (last echo − first send). The bytes cross the
  device's link twice, so on a half-duplex radio this is about half the one-way rate: a
  conservative figure.
- **outage**: the fraction of pings (QoS 1, one at a time) not echoed within the ping timeout,
  or not even sent because the connection was down; and the round-trip times of the others.

The profile is JSON, retained on ``profile/<device>`` with ``--publish`` (docs/protocol.md,
"Device profiles"); ``mqttinfer devices list`` collects the fleet's profiles into an inventory
file for the planner.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mqttinfer import __version__
from mqttinfer.bundle import Bundle, demo_bundle_path
from mqttinfer.errors import BrokerError, ProtocolError
from mqttinfer.planner.inventory import Device as InventoryDevice
from mqttinfer.protocol import InputSpec
from mqttinfer.protocol import fields as f
from mqttinfer.protocol.control import dump_json, load_json
from mqttinfer.protocol.limits import PROTOCOL_VERSION
from mqttinfer.runtime.bus import Bus, Message
from mqttinfer.runtime.retained import BrokerBarrier, probe_topic, retained_snapshot
from mqttinfer.runtime.runner import StudentRunner
from mqttinfer.topics import is_valid_id

log = logging.getLogger(__name__)

PROFILE_QOS = 1
_MAX_LABELS = 32
_MAX_MEASURED = 64
_MIB = 1024 * 1024


# --------------------------------------------------------------------------- the message


@dataclass(frozen=True, slots=True)
class Profile:
    """A device's measured capacity, retained on ``profile/<device>``.

    ``flops`` FLOP/s, ``memory`` bytes, ``rate`` bit/s, ``outage`` a probability in [0, 1);
    ``measured`` holds the raw measurements behind them (free-form numbers and words).
    """

    KIND: ClassVar[str] = "profile"
    device: str
    ts: float
    flops: float
    memory: int
    rate: float
    outage: float
    version: str = __version__
    labels: Mapping[str, str] = field(default_factory=dict)
    measured: Mapping[str, float | int | str] = field(default_factory=dict)

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "device": self.device,
            "ts": self.ts,
            "flops": self.flops,
            "memory": self.memory,
            "rate": self.rate,
            "outage": self.outage,
            "version": self.version,
            "labels": dict(self.labels),
            "measured": dict(self.measured),
        }
        return dump_json(body)

    @classmethod
    def decode(cls, payload: bytes) -> Profile:
        obj = load_json(payload, cls.KIND)
        flops = f.number(obj, "flops", cls.KIND)
        memory = f.integer(obj, "memory", cls.KIND)
        rate = f.number(obj, "rate", cls.KIND)
        outage = f.number(obj, "outage", cls.KIND, maximum=1.0)
        if flops <= 0 or memory <= 0 or rate <= 0 or outage >= 1.0:
            raise ProtocolError("flops, memory and rate must be > 0, outage < 1", kind=cls.KIND)
        return cls(
            device=f.node_id(obj, "device", cls.KIND),
            ts=f.number(obj, "ts", cls.KIND),
            flops=flops,
            memory=memory,
            rate=rate,
            outage=outage,
            version=f.text(obj, "version", cls.KIND, max_length=64, default=""),
            labels=_labels(obj.get("labels", {})),
            measured=_measured(obj.get("measured", {})),
        )

    def inventory_device(self) -> InventoryDevice:
        """The entry of this device in a planner inventory (``devices/<fleet>.yaml``)."""
        return InventoryDevice(
            self.device, self.flops, self.memory, self.rate, self.outage, dict(self.labels)
        )


def _labels(obj: Any) -> dict[str, str]:
    if (
        not isinstance(obj, dict)
        or len(obj) > _MAX_LABELS
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 256
            for k, v in obj.items()
        )
    ):
        raise ProtocolError(
            f"'labels' must map at most {_MAX_LABELS} names to strings", kind="profile"
        )
    return dict(obj)


def _measured(obj: Any) -> dict[str, float | int | str]:
    if not isinstance(obj, dict) or len(obj) > _MAX_MEASURED:
        raise ProtocolError(f"'measured' must be a map of at most {_MAX_MEASURED}", kind="profile")
    out: dict[str, float | int | str] = {}
    for key, value in obj.items():
        plain = isinstance(value, (int, float, str)) and not isinstance(value, bool)
        if not isinstance(key, str) or len(key) > 64 or not plain:
            raise ProtocolError("'measured' values must be numbers or strings", kind="profile")
        out[key] = value[:256] if isinstance(value, str) else value
    return out


# --------------------------------------------------------------------------- compute


@dataclass(frozen=True, slots=True)
class ReferenceModel:
    """An ONNX model to time: its bytes, float input shape [C, H, W] and MACs per inference."""

    name: str
    data: bytes
    shape: tuple[int, int, int]
    macs: int


def reference_model(channels: int = 32, size: int = 32, layers: int = 2) -> ReferenceModel:
    """``layers`` × (3×3 conv, pad 1, ``channels``→``channels``, ReLU) on [channels, size, size].

    Serialised directly as ONNX protobuf (IR 8, opset 13), so that a device needs no ``onnx``
    package; tests check it with ``onnx.checker`` and against numpy.
    """
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    previous = "x"
    for layer in range(layers):
        weight = rng.normal(0, 0.1, (channels, channels, 3, 3)).astype(np.float32)
        name = f"w{layer}"
        initializers.append(_tensor(name, weight))
        conv, out = f"conv{layer}", f"relu{layer}" if layer < layers - 1 else "y"
        nodes.append(_node("Conv", [previous, name], [conv], kernel_shape=[3, 3], pads=[1] * 4))
        nodes.append(_node("Relu", [conv], [out]))
        previous = out
    shape = [1, channels, size, size]
    graph = b"".join(
        [
            *(_field(1, node) for node in nodes),
            _field(2, b"reference"),
            *(_field(5, tensor) for tensor in initializers),
            _field(11, _value_info("x", shape)),
            _field(12, _value_info("y", shape)),
        ]
    )
    opset = _field(1, b"") + _varint_field(2, 13)
    model = _varint_field(1, 8) + _field(2, b"mqttinfer") + _field(7, graph) + _field(8, opset)
    macs = layers * channels * channels * 9 * size * size
    return ReferenceModel(
        f"reference-conv{layers}x{channels}@{size}", model, (channels, size, size), macs
    )


# Minimal protobuf writer for the few ONNX messages above (field numbers from onnx.proto).
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _tensor(name: str, array: np.ndarray[Any, Any]) -> bytes:
    dims = b"".join(_varint_field(1, d) for d in array.shape)
    raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return dims + _varint_field(2, 1) + _field(8, name.encode()) + _field(9, raw)


def _node(op: str, inputs: list[str], outputs: list[str], **ints: list[int]) -> bytes:
    parts = [_field(1, i.encode()) for i in inputs] + [_field(2, o.encode()) for o in outputs]
    parts.append(_field(4, op.encode()))
    for name, values in ints.items():
        attribute = _field(1, name.encode()) + b"".join(_varint_field(8, v) for v in values)
        parts.append(_field(5, attribute + _varint_field(20, 7)))  # type INTS
    return b"".join(parts)


def _value_info(name: str, shape: list[int]) -> bytes:
    dims = b"".join(_field(1, _varint_field(1, d)) for d in shape)
    tensor_type = _varint_field(1, 1) + _field(2, dims)  # elem_type FLOAT
    return _field(1, name.encode()) + _field(2, _field(1, tensor_type))


def bundle_model(bundle_dir: Path) -> ReferenceModel | None:
    """The bundle's student with the most MACs, or None when the bundle gives no MAC counts."""
    bundle = Bundle.load(bundle_dir)
    student = max(bundle.students, key=lambda s: s.macs)
    if student.macs <= 0:
        return None
    shape = tuple(int(d) for d in bundle.input.shape)
    return ReferenceModel(
        f"{bundle.name}/{student.file.name}",
        student.file.read_bytes(),
        (shape[0], shape[1], shape[2]),
        student.macs,
    )


def default_model() -> ReferenceModel:
    """The demo bundle's largest student when installed, else :func:`reference_model`."""
    path = demo_bundle_path()
    if (path / "bundle.json").is_file():
        found = bundle_model(path)
        if found is not None:
            return found
    return reference_model()


@dataclass(frozen=True, slots=True)
class ComputeResult:
    flops: float
    median_ms: float
    runs: int
    macs: int
    model: str


def measure_compute(
    model: ReferenceModel, *, threads: int = 1, min_runs: int = 5, budget_s: float = 2.0
) -> ComputeResult:
    """Time inferences of ``model`` (after warm-up) for ``budget_s``, at least ``min_runs``."""
    spec = InputSpec(shape=model.shape, dtype="float32")
    runner = StudentRunner(model.data, spec, name=model.name, threads=threads, pool=False)
    x = np.random.default_rng(1).normal(size=(1, *model.shape)).astype(np.float32)
    times: list[float] = []
    stop_at = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < stop_at and len(times) < 1000):
        start = time.perf_counter()
        runner.run(x)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return ComputeResult(
        2.0 * model.macs / median, median * 1000.0, len(times), model.macs, model.name
    )


# --------------------------------------------------------------------------- memory


def available_memory(
    meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")
) -> int:
    """Bytes a new model can use now (see the module docstring); 0 when nothing is known."""
    found = _meminfo_available(meminfo)
    limit = _cgroup_room(cgroup)
    if found is None:
        found = _sysconf_available()
    if limit is not None:
        found = limit if found is None else min(found, limit)
    return max(0, found or 0)


def _meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                value, unit = line.split()[1:3]
                return int(value) * (1024 if unit.lower() == "kb" else 1)
    except (OSError, ValueError):
        return None
    return None


def _cgroup_room(root: Path) -> int | None:
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    try:
        return max(0, int(limit) - used)
    except ValueError:
        return None


def _sysconf_available() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- link


@dataclass(frozen=True, slots=True)
class LinkResult:
    rtt_ms: tuple[float, ...]
    pings: int
    lost: int
    burst_bytes: int
    burst_s: float

    @property
    def outage(self) -> float:
        return self.lost / self.pings if self.pings else 1.0

    @property
    def rate(self) -> float:
        return 8.0 * self.burst_bytes / self.burst_s if self.burst_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class LinkSettings:
    pings: int = 20
    ping_timeout_s: float = 1.0
    ping_interval_s: float = 0.05
    burst_bytes: int = 1024 * 1024
    message_bytes: int = 64 * 1024
    burst_timeout_s: float = 60.0


class _Echoes:
    """Echoed probe messages by sequence number (filled on the network thread)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.arrived: dict[int, float] = {}

    def __call__(self, message: Message) -> None:
        if len(message.payload) < 8:
            return
        (seq,) = struct.unpack_from("<Q", message.payload)
        with self.cond:
            self.arrived[seq] = message.received
            self.cond.notify_all()

    def wait_for(self, seqs: Iterable[int], deadline: float) -> bool:
        wanted = set(seqs)
        with self.cond:
            while not wanted <= self.arrived.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True


def measure_link(
    bus: Bus, settings: LinkSettings = LinkSettings(), *, owner: str | None = None
) -> LinkResult:
    """Ping, then a burst, through the broker on ``probe/<owner>/echo`` (``owner``: the device
    being profiled, default the bus's node; the bus must be connected)."""
    topic = f"{probe_topic(bus.topics, owner or bus.node)}/echo"
    echoes = _Echoes()
    bus.subscribe(topic, echoes, qos=PROFILE_QOS)
    BrokerBarrier(bus, owner).sync(settings.ping_timeout_s * 10)  # the subscription is in place
    rtts: list[float] = []
    lost = 0
    for seq in range(settings.pings):
        sent = time.monotonic()
        payload = struct.pack("<Q", seq)
        ok = bus.publish(topic, payload, qos=PROFILE_QOS) and echoes.wait_for(
            [seq], sent + settings.ping_timeout_s
        )
        if ok:
            rtts.append((echoes.arrived[seq] - sent) * 1000.0)
        else:
            lost += 1
        time.sleep(settings.ping_interval_s)
    if not rtts:
        raise BrokerError(f"no ping came back from {bus.config.url}: the link is down")
    # A connection lost during the pings (counted as outage) must be back for the burst.
    if not bus.wait_connected(settings.burst_timeout_s):
        raise BrokerError(f"lost the connection to {bus.config.url} before the rate burst")
    burst_bytes, burst_s = _burst(bus, topic, echoes, settings)
    bus.unsubscribe(topic)
    return LinkResult(tuple(rtts), settings.pings, lost, burst_bytes, burst_s)


def _burst(bus: Bus, topic: str, echoes: _Echoes, settings: LinkSettings) -> tuple[int, float]:
    size = max(16, min(settings.message_bytes, bus.max_payload(topic)))
    count = max(1, math.ceil(settings.burst_bytes / size))
    first = 1 << 32  # sequence numbers apart from the pings'
    filler = bytes(size - 8)
    started = time.monotonic()
    for seq in range(first, first + count):
        if not bus.publish(topic, struct.pack("<Q", seq) + filler, qos=PROFILE_QOS):
            raise BrokerError(f"the burst to {bus.config.url} failed: disconnected")
    if not echoes.wait_for(range(first, first + count), started + settings.burst_timeout_s):
        raise BrokerError(
            f"the {count * size}-byte burst did not come back within {settings.burst_timeout_s} s"
        )
    last = max(echoes.arrived[seq] for seq in range(first, first + count))
    return count * size, max(last - started, 1e-6)


# --------------------------------------------------------------------------- the whole profile


def build_profile(
    device: str,
    compute: ComputeResult,
    memory: int,
    link: LinkResult,
    *,
    labels: Mapping[str, str] | None = None,
    threads: int = 1,
    now: float | None = None,
) -> Profile:
    rtts = np.asarray(link.rtt_ms)
    return Profile(
        device=device,
        ts=time.time() if now is None else now,
        # Measurements this noisy do not deserve 16 digits, and round figures keep the inventory
        # readable (158G, not 158031121669.9878); memory is rounded down to whole MiB.
        flops=_significant(compute.flops),
        memory=max(_MIB, memory // _MIB * _MIB),
        rate=_significant(link.rate),
        outage=round(link.outage, 6),
        labels=dict(labels or {}),
        measured={
            "model": compute.model,
            "macs": compute.macs,
            "compute_ms_p50": round(compute.median_ms, 4),
            "runs": compute.runs,
            "threads": threads,
            "rtt_ms_p50": round(float(np.percentile(rtts, 50)), 3),
            "rtt_ms_p99": round(float(np.percentile(rtts, 99)), 3),
            "pings": link.pings,
            "pings_lost": link.lost,
            "burst_bytes": link.burst_bytes,
            "burst_s": round(link.burst_s, 6),
            "cpu_count": os.cpu_count() or 0,
            "machine": platform.machine()[:64],
        },
    )


def _significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}")


def profiler_node(device: str) -> str:
    """The profiler's own node id: never the device's, whose status it must not overwrite.

    Under a broker ACL the profiler runs with the device's identity: its probe topics are the
    device's (``probe/<device>/…``), and its own status is simply refused by the broker.
    """
    return f"{device[:55]}.profiler"


def publish_profile(bus: Bus, profile: Profile, timeout_s: float = 10.0) -> None:
    """Retain ``profile`` on ``profile/<device>`` and wait until the broker has it."""
    topic = bus.topics.profile(profile.device)
    if not bus.publish(topic, profile.encode(), qos=PROFILE_QOS, retain=True):
        raise BrokerError(f"could not publish the profile on {topic}")
    BrokerBarrier(bus, profile.device).sync(timeout_s)


def collect_profiles(bus: Bus, timeout_s: float = 10.0) -> list[Profile]:
    """Every valid profile retained on ``profile/+`` (invalid ones are logged and skipped)."""
    snapshot = retained_snapshot(bus, (bus.topics.all_profiles,), BrokerBarrier(bus), timeout_s)
    profiles = []
    for topic, payload in sorted(snapshot.items()):
        try:
            device = bus.topics.last_level(topic, "profile")
            profile = Profile.decode(payload)
            if profile.device != device or not is_valid_id(device):
                raise ProtocolError(
                    f"device {profile.device!r} on {device!r}'s topic", kind="profile"
                )
        except ProtocolError as exc:
            log.warning("skipping the profile on %s: %s", topic, exc)
            continue
        profiles.append(profile)
    return profiles
