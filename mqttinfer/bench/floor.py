"""The floor: the same broker hops as one inference, with bare paho clients and no model.

One inference crosses the broker three times: the frame (source → devices and aggregator),
one partial per device (device → aggregator), and the result (aggregator → source). The floor
chain reproduces exactly that with relay *processes* (one per device of the cluster, one for
the aggregator) on the same broker, publishing payloads of the same sizes at the same QoS
(frames and partials QoS 0, results QoS 1) over sockets with Nagle disabled, but doing
nothing else: no decoding, no validation, no queues or worker threads, no model. Its round
trip is what any MQTT design on this machine must pay; what mqttinfer adds on top of it, less
the model's own compute, is mqttinfer's overhead.

This is the one module outside ``runtime/bus.py`` that uses paho-mqtt directly, on purpose:
the floor must not contain the code it is the floor of.

The chain comes in two layouts. ``relays="per-device"`` (the floor proper) runs one device
relay per device of the cluster, all sharing this machine's cores as the devices do.
``relays="one"`` runs a single device relay that answers every frame with one partial per
partition: every hop, message and byte of one inference, without K relay processes competing
for the cores. It is the transport a device sees when each device has a CPU of its own, which
is what the one-device-per-student projection needs. It errs both ways: its K partials leave
one relay one after the other instead of K devices at once (slower), and the broker sends the
frame to one relay instead of K devices (K - 1 fewer deliveries: faster).

A relay runs as ``python -m mqttinfer.bench.floor device|aggregator ...``. Payloads start with
the frame id (16 bytes, space padded) and are padded to the measured envelope sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

import mqttinfer
from mqttinfer.errors import BrokerError, MqttInferError
from mqttinfer.runtime.bus import MQTT_PROTOCOLS

ID_BYTES = 16
FRAME_QOS = 0
PARTIAL_QOS = 0
RESULT_QOS = 1
SOURCE_ID = "floor-src"
_READY_TIMEOUT_S = 60.0
_MAX_OPEN = 10_000


# "per-device": one relay process per device (the floor); "one": one relay for every partition.
RELAY_LAYOUTS = ("per-device", "one")


# The floor speaks what the cluster speaks: the bus's table of versions (a constant, not code).
PROTOCOLS = MQTT_PROTOCOLS


def _client(name: str, mqtt_version: str = "auto") -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=name, protocol=PROTOCOLS[mqtt_version]
    )
    client.on_socket_open = _no_delay
    return client


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    # As runtime/bus.py does: small messages must leave at once.
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def frame_id_bytes(frame_id: str) -> bytes:
    return frame_id.encode().ljust(ID_BYTES)[:ID_BYTES]


def padded(frame_id: bytes, size: int) -> bytes:
    return frame_id + bytes(max(0, size - len(frame_id)))


# --------------------------------------------------------------------------- relays (children)
def run_device_relay(
    *,
    host: str,
    port: int,
    prefix: str,
    answers: Sequence[tuple[int, int]],
    device: str,
    mqtt_version: str = "auto",
) -> None:
    """Answer every frame with one partial-sized message per ``(partition, size)`` in
    ``answers``, from the network thread."""
    client = _client(f"{prefix}-{device}", mqtt_version)
    replies = [
        (f"{prefix}/partials/{partition}/{device}", bytes(max(0, size - ID_BYTES)))
        for partition, size in answers
    ]

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        c.subscribe(f"{prefix}/frames/+", qos=FRAME_QOS)

    def on_message(c: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        frame_id = bytes(msg.payload[:ID_BYTES])
        for topic, padding in replies:
            c.publish(topic, frame_id + padding, qos=PARTIAL_QOS)

    client.on_connect = on_connect
    client.on_message = on_message
    _serve(client, host, port)


def run_aggregator_relay(
    host: str, port: int, prefix: str, partitions: int, size: int, *, mqtt_version: str = "auto"
) -> None:
    """Publish a result-sized message once a frame and one partial per partition arrived."""
    client = _client(f"{prefix}-aggregator", mqtt_version)
    padding = bytes(max(0, size - ID_BYTES))
    # frame id -> (source or None until the frame arrived, partitions seen); late replicas'
    # partials reopen an entry that never completes, hence the bound below.
    open_frames: dict[bytes, tuple[str | None, set[str]]] = {}
    frames_head = f"{prefix}/frames/"

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        # QoS 1 subscriptions, as the aggregator's (delivery is at the publisher's QoS 0).
        c.subscribe([(f"{prefix}/frames/+", 1), (f"{prefix}/partials/+/+", 1)])

    def on_message(c: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        frame_id = bytes(msg.payload[:ID_BYTES])
        source, seen = open_frames.get(frame_id, (None, set()))
        if msg.topic.startswith(frames_head):
            source = msg.topic[len(frames_head) :]
        else:
            seen.add(msg.topic.split("/")[-2])
        if source is not None and len(seen) == partitions:
            open_frames.pop(frame_id, None)
            c.publish(f"{prefix}/results/{source}", frame_id + padding, qos=RESULT_QOS)
        else:
            if len(open_frames) > _MAX_OPEN:
                open_frames.clear()
            open_frames[frame_id] = (source, seen)

    client.on_connect = on_connect
    client.on_message = on_message
    _serve(client, host, port)


def _serve(client: mqtt.Client, host: str, port: int) -> None:
    # The handler only puts on a SimpleQueue (reentrant): a handler that took paho's locks
    # could land while the main thread holds them and deadlock.
    stops: queue.SimpleQueue[int] = queue.SimpleQueue()

    def stop(signum: int, _frame: Any) -> None:
        stops.put(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    stops.get()
    client.disconnect()
    client.loop_stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqttinfer.bench.floor")
    parser.add_argument("role", choices=("device", "aggregator"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument(
        "--answer",
        type=_answer,
        action="append",
        default=[],
        metavar="PARTITION:BYTES",
        help="device: one partial per frame on this partition, of this many payload bytes "
        "(repeat for a relay that answers for several partitions)",
    )
    parser.add_argument("--device", default="d0")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--size", type=int, default=0, help="aggregator: result payload bytes")
    parser.add_argument("--mqtt-version", choices=sorted(PROTOCOLS), default="auto")
    args = parser.parse_args(argv)
    if args.role == "device":
        if not args.answer:
            parser.error("a device relay needs at least one --answer PARTITION:BYTES")
        run_device_relay(
            host=args.host,
            port=args.port,
            prefix=args.prefix,
            answers=args.answer,
            device=args.device,
            mqtt_version=args.mqtt_version,
        )
    else:
        run_aggregator_relay(
            args.host,
            args.port,
            args.prefix,
            args.partitions,
            args.size,
            mqtt_version=args.mqtt_version,
        )
    return 0


def _answer(text: str) -> tuple[int, int]:
    partition, sep, size = text.partition(":")
    if not sep or not partition.isdigit() or not size.isdigit():
        raise argparse.ArgumentTypeError(f"expected PARTITION:BYTES, got {text!r}")
    return int(partition), int(size)


# --------------------------------------------------------------------------- the chain (parent)
@dataclass(frozen=True, slots=True)
class FloorShape:
    """What one inference moves: frame size, one partial size per device, result size."""

    frame_bytes: int
    partial_bytes: dict[str, tuple[int, int]]  # device -> (partition, partial payload bytes)
    result_bytes: int

    @property
    def partitions(self) -> int:
        return len({partition for partition, _ in self.partial_bytes.values()})


class FloorChain:
    """Relay processes plus a caller client; ``round_trip()`` times one frame → result."""

    def __init__(
        self,
        host: str,
        port: int,
        shape: FloorShape,
        *,
        prefix: str = "floor",
        mqtt_version: str = "auto",
        relays: str = "per-device",
    ) -> None:
        if mqtt_version not in PROTOCOLS:
            raise ValueError(f"mqtt_version must be one of {sorted(PROTOCOLS)}")
        if relays not in RELAY_LAYOUTS:
            raise ValueError(f"relays must be one of {RELAY_LAYOUTS}")
        self.relays = relays
        self.host = host
        self.port = port
        self.shape = shape
        self.prefix = prefix
        self.mqtt_version = mqtt_version
        self._procs: list[subprocess.Popen[bytes]] = []
        self._client = _client(f"{prefix}-caller-{os.getpid()}", mqtt_version)
        self._answers: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._counter = 0
        self._frame_padding = bytes(max(0, shape.frame_bytes - ID_BYTES))
        self._frames_topic = f"{prefix}/frames/{SOURCE_ID}"

    def start(self, timeout_s: float = _READY_TIMEOUT_S) -> FloorChain:
        base = [sys.executable, "-m", "mqttinfer.bench.floor"]
        common = ["--host", self.host, "--port", str(self.port), "--prefix", self.prefix]
        common += ["--mqtt-version", self.mqtt_version]
        for device, answers in self._relay_answers().items():
            argv = [*base, "device", *common, "--device", device]
            for partition, size in answers:
                argv += ["--answer", f"{partition}:{size}"]
            self._spawn(argv)
        aggregator = [*base, "aggregator", *common, "--partitions", str(self.shape.partitions)]
        self._spawn([*aggregator, "--size", str(self.shape.result_bytes)])
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(15):
            self.close()
            raise BrokerError(f"floor caller cannot connect to {self.host}:{self.port}")
        self._wait_ready(timeout_s)
        return self

    def _relay_answers(self) -> dict[str, list[tuple[int, int]]]:
        """Device relay -> the (partition, partial bytes) it answers every frame with."""
        if self.relays == "one":
            # One answer per partition (replicas of a partition would be the same hop again).
            by_partition = dict(self.shape.partial_bytes.values())
            return {"all": sorted(by_partition.items())}
        return {device: [answer] for device, answer in self.shape.partial_bytes.items()}

    @property
    def pids(self) -> list[int]:
        """The relay processes' ids (device relays first, the aggregator relay last)."""
        return [proc.pid for proc in self._procs]

    def _spawn(self, argv: list[str]) -> None:
        self._procs.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=child_env(),
                start_new_session=True,
            )
        )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in self._procs):
                break
            with contextlib.suppress(TimeoutError):
                self.round_trip(timeout_s=0.5)
                return
        self.close()
        raise MqttInferError("the floor relays did not answer a probe frame")

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(f"{self.prefix}/results/{SOURCE_ID}", qos=RESULT_QOS)
        self._connected.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            event = self._answers.get(bytes(msg.payload[:ID_BYTES]))
        if event is not None:
            event.set()

    def round_trip(self, timeout_s: float = 5.0) -> float:
        """Publish one frame, wait for its result; milliseconds (TimeoutError if none came)."""
        self._counter += 1
        frame_id = frame_id_bytes(f"f{self._counter}")
        event = threading.Event()
        with self._lock:
            self._answers[frame_id] = event
        try:
            started = time.monotonic()
            self._client.publish(self._frames_topic, frame_id + self._frame_padding, qos=FRAME_QOS)
            if not event.wait(timeout_s):
                raise TimeoutError(f"no floor result within {timeout_s} s")
            return (time.monotonic() - started) * 1000.0
        finally:
            with self._lock:
                self._answers.pop(frame_id, None)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._procs.clear()

    def __enter__(self) -> FloorChain:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def child_env() -> dict[str, str]:
    """Children import this very mqttinfer, installed or not."""
    root = str(Path(mqttinfer.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{root}{os.pathsep}{path}" if path else root
    return env


if __name__ == "__main__":
    sys.exit(main())
