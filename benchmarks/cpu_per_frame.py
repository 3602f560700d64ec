"""CPU time per frame of every process: mqttinfer's cluster against the floor, same broker.

    .venv/bin/python benchmarks/cpu_per_frame.py [--bundle DIR] [--frames 2000] [--rounds 2]

A private Mosquitto, one device process per student and an aggregator (``LocalCluster``), and
on the same broker the floor chain of ``mqttinfer bench latency`` (bare paho relays, the same
hops and payload sizes). After 100 warm-up frames through each, the script sends ``--frames``
sequential frames through the floor, then through mqttinfer (``Source.infer``), and repeats
that ``--rounds`` times. For each pass it prints the p50 round trip and the CPU time
(user + system, from ``/proc/<pid>/stat`` and this process's rusage) per frame of every
process: the broker, each device or device relay, the aggregator or its relay, and this
process (the caller: ``Source`` or the floor's caller client).

CPU time, unlike latency, barely moves with other load on the machine, and on two shared
cores it is what latency is made of: the processes of one inference take turns on the cores.
The JIFFY resolution of ``/proc`` (10 ms) is why it takes a couple of thousand frames.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script from a checkout: make the repository's mqttinfer importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqttinfer.bench.floor import FloorChain  # noqa: E402
from mqttinfer.bench.latency import bench_layout, envelope_sizes, sample_frames  # noqa: E402
from mqttinfer.bundle import Bundle, demo_bundle_path  # noqa: E402
from mqttinfer.runtime.bus import BrokerConfig  # noqa: E402
from mqttinfer.runtime.cluster import LocalCluster  # noqa: E402
from mqttinfer.runtime.source import Source  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
WARMUP = 100


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    name: str, send: Callable[[int], object], frames: int, pids: dict[str, int]
) -> dict[str, float]:
    """Send ``frames`` frames one after the other; CPU µs per frame per process, p50 in ms."""
    before = {label: process_cpu_s(pid) for label, pid in pids.items()}
    own_before = own_cpu_s()
    times = []
    for index in range(frames):
        started = time.perf_counter()
        send(index)
        times.append(time.perf_counter() - started)
    per_frame = {
        label: (process_cpu_s(pid) - before[label]) / frames * 1e6 for label, pid in pids.items()
    }
    per_frame["caller (this process)"] = (own_cpu_s() - own_before) / frames * 1e6
    total = sum(per_frame.values())
    print(f"\n{name}: p50 {statistics.median(times) * 1e3:.3f} ms, {total:.0f} µs CPU per frame")
    for label, value in per_frame.items():
        if value > 0:
            print(f"  {label:24s} {value:7.0f} µs")
    return per_frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: the demo bundle")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bundle = Bundle.load(args.bundle or demo_bundle_path())
    frames = sample_frames(bundle, 200)
    devices, shape = bench_layout(bundle, envelope_sizes(bundle, frames[0]))
    print(f"bundle {bundle.name}: {len(devices)} devices; {args.frames} frames per pass")
    with LocalCluster(bundle.root, devices, stats_interval_s=30.0) as cluster:
        broker = BrokerConfig.from_url(cluster.url)
        with (
            FloorChain(broker.host, broker.port, shape) as floor,
            Source(cluster.url, source_id="cpu", deployment=cluster.deployment) as source,
        ):
            nodes = {name: cluster.pid(name) for name in cluster.nodes}
            broker_pid = cluster.broker.pid if cluster.broker is not None else None
            cluster_pids = {name: pid for name, pid in nodes.items() if pid is not None}
            relay_pids = {f"device relay {i}": pid for i, pid in enumerate(floor.pids[:-1])}
            relay_pids["aggregator relay"] = floor.pids[-1]
            if broker_pid is not None:
                cluster_pids["broker"] = relay_pids["broker"] = broker_pid

            def infer(index: int) -> object:
                return source.infer(frames[index % len(frames)], 5.0)

            def round_trip(_index: int) -> object:
                return floor.round_trip(5.0)

            for index in range(WARMUP):
                infer(index)
                round_trip(index)
            for _ in range(args.rounds):
                measure("floor (bare paho relays)", round_trip, args.frames, relay_pids)
                measure("mqttinfer (Source.infer)", infer, args.frames, cluster_pids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
