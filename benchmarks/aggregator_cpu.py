"""Where the aggregator's CPU goes: process CPU time per frame under four receivers.

    .venv/bin/python benchmarks/aggregator_cpu.py [--frames 1500] [--bundle DIR]

A private Mosquitto; a publisher subprocess sends, every 4 ms, a frame and one partial per
partition (real envelopes); this process receives them with

- ``raw-paho``: a bare paho client whose ``on_message`` does nothing (the floor's relay);
- ``bus-noop``: mqttinfer's ``Bus`` with handlers that do nothing;
- ``inline``: the real ``Aggregator`` handling every message on the network thread;
- ``worker``: the real ``Aggregator`` as it runs (network thread → queue → worker thread);

and prints this process's CPU time (user + system) per frame for each, one after the other.
The differences are what the bus wrapper, mqttinfer's own decoding and logic, and the
hand-off to the worker thread cost. CPU time, not wall time, so the numbers hold up on a
machine that other jobs share.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

# Run as a script from a checkout: make the repository's mqttinfer importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("raw-paho", "bus-noop", "inline", "worker")
DEPLOYMENT = "cpu"

PUBLISHER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from mqttinfer.protocol import Frame, Partial
    port, frames, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    shape = tuple(int(x) for x in sys.argv[4].split(","))
    widths = [int(x) for x in sys.argv[5].split(",")]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(0.5)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for i in range(frames):
        fid = f"abcdef01-{i:x}"
        frame = Frame(id=fid, source="cam", ts=time.time(), tensor=pixels)
        client.publish(f"{prefix}/frames/cam", frame.encode(), qos=0)
        for k, w in enumerate(widths):
            partial = Partial(frame=fid, partition=k, device=f"d{k}",
                              features=np.ones(w, np.float16), compute_ms=0.1, queue_ms=0.1)
            client.publish(f"{prefix}/partials/{k}/d{k}", partial.encode(), qos=0)
        time.sleep(0.004)
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    """
)


def _receiver(mode: str, url: str, port: int, bundle_dir: Path) -> Any:
    """Start the receiver of ``mode``; return something whose ``stop()`` ends it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from mqttinfer.bundle import Bundle
    from mqttinfer.runtime.aggregator import AggregatorSettings
    from mqttinfer.runtime.aggregator_cli import build_aggregator
    from mqttinfer.runtime.bus import BrokerConfig, Bus
    from mqttinfer.topics import Topics

    topics = Topics(DEPLOYMENT)
    if mode == "raw-paho":
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        client.on_connect = lambda c, *_: c.subscribe(
            [(topics.all_frames, 1), (topics.all_partials, 1)]
        )
        client.on_message = lambda *_: None
        client.connect("127.0.0.1", port)
        client.loop_start()

        class _Raw:
            def stop(self) -> None:
                client.disconnect()
                client.loop_stop()

        return _Raw()
    bus = Bus(BrokerConfig.from_url(url), node="aggregator", kind="aggregator", topics=topics)
    if mode == "bus-noop":
        bus.subscribe(topics.all_frames, lambda _m: None, qos=1)
        bus.subscribe(topics.all_partials, lambda _m: None, qos=1)
    else:
        settings = AggregatorSettings(deployment=DEPLOYMENT)
        aggregator = build_aggregator(Bundle.load(bundle_dir), bus, settings)
        if mode == "inline":

            def handle(message: Any) -> None:
                aggregator.handle(message)
                aggregator.tick()

            bus.subscribe(topics.all_frames, handle, qos=1)
            bus.subscribe(topics.all_partials, handle, qos=1)
        else:
            aggregator.start()
    bus.start()
    bus.wait_connected(10)
    return bus


def measure(mode: str, frames: int, bundle_dir: Path) -> float:
    from mqttinfer.bundle import Bundle
    from mqttinfer.runtime.local_broker import LocalBroker

    bundle = Bundle.load(bundle_dir)
    shape = ",".join(str(d) for d in bundle.input.shape)
    widths = ",".join(str(w) for w in bundle.partition_sizes())
    with LocalBroker(extra_config="set_tcp_nodelay true\n") as broker:
        receiver = _receiver(mode, broker.url, broker.port, bundle_dir)
        time.sleep(1.0)
        started = time.process_time()
        argv = [sys.executable, "-c", PUBLISHER, str(broker.port), str(frames)]
        argv += [f"mqttinfer/{DEPLOYMENT}", shape, widths]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run(argv, env=env, check=True)
        used = time.process_time() - started
        receiver.stop()
    return used / frames * 1e6


def main(argv: list[str] | None = None) -> int:
    from mqttinfer.bundle import demo_bundle_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--bundle", type=Path, default=demo_bundle_path())
    args = parser.parse_args(argv)
    for mode in MODES:
        print(f"{mode:9s} {measure(mode, args.frames, args.bundle):7.0f} µs CPU per frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
