"""``mqttinfer bench latency``: latency, bytes and throughput of the real runtime, as ratios.

One run starts a private Mosquitto, one device process per student and an aggregator process
(:class:`~mqttinfer.runtime.cluster.LocalCluster`), plus the floor chain's relay processes
(:mod:`mqttinfer.bench.floor`) on the same broker. It then measures, **interleaved in
rounds** so that a noisy machine slows every contender alike:

- the floor: a frame → partial → result chain of bare paho clients with the same hops and
  payload sizes, no model;
- mqttinfer: ``Source.infer()`` end to end, with the aggregator's breakdown of every result
  (queueing, slowest student compute, FC head, transport);
- the teacher: one onnxruntime session (one thread) in this process on the same CPU.

Then the wire bytes (sniffed from the broker), and the throughput at saturation with a bounded
window of frames in flight against the students' compute bound on this machine. Ratios:

- overhead = p50(e2e − slowest student compute − FC) / p50(floor): what mqttinfer's own code
  adds to the unavoidable broker hops (1.0 = nothing);
- speedup = p50(teacher) / p50(e2e), measured with every process sharing this machine's cores;
- projected speedup with one device per student = p50(teacher) / (p50 of the slowest student
  alone on a core + p50(FC) + p50(floor)): the transport is the measured broker hops; a
  conservative variant counts all of mqttinfer's non-compute time, p50(e2e − compute − FC),
  as transport instead.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mqttinfer.bench.floor import FloorChain, FloorShape
from mqttinfer.bench.report import ResultsDir, Summary, machine
from mqttinfer.bundle import Bundle
from mqttinfer.errors import BundleError, InferTimeoutError
from mqttinfer.protocol import Frame, Partial, Result
from mqttinfer.runtime.bus import BrokerConfig, Bus, Message, packet_size
from mqttinfer.runtime.cluster import MQTT_VERSIONS, DeviceSpec, LocalCluster
from mqttinfer.runtime.runner import StudentRunner, read_model
from mqttinfer.runtime.source import Source
from mqttinfer.topics import Topics

log = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
SOURCE_ID = "bench"
# A frame id as long as Source makes them (8 hex + '-' + base-36 counter): 15 characters.
WIRE_FRAME_ID = "0123abcd-zzzzzz"


@dataclass(frozen=True, slots=True)
class LatencySettings:
    frames: int = 400  # per contender, split over the rounds
    rounds: int = 40  # short rounds: load that comes and goes hits every contender alike
    warmup: int = 30
    window: int = 8  # frames in flight for the throughput phase
    throughput_s: float = 5.0
    sniff_frames: int = 20
    compute_runs: int = 200  # uncontended runs per student (and the teacher) for the bound
    deadline_ms: int = 2000
    timeout_s: float = 10.0
    seed: int = 0
    mqtt_version: str = "auto"  # every client of the run, the floor's included

    def __post_init__(self) -> None:
        if self.mqtt_version not in MQTT_VERSIONS:
            raise ValueError(
                f"--mqtt-version must be one of {', '.join(MQTT_VERSIONS)}, "
                f"got {self.mqtt_version!r}"
            )


# --------------------------------------------------------------------------- inputs
def sample_frames(bundle: Bundle, count: int, seed: int = 0) -> U8:
    """Real Fashion-MNIST test images when the bundle takes them, else seeded random pixels."""
    shape = tuple(bundle.input.shape)
    dataset = bundle.meta.get("dataset", {})
    name = str(dataset.get("name", "")) if isinstance(dataset, dict) else ""
    if shape == (1, 28, 28) and "fashion" in name.lower():
        try:
            from mqttinfer.datasets import load_fashion_mnist

            images = load_fashion_mnist().x
            return np.ascontiguousarray(images[:count])
        except Exception as exc:  # missing package: random frames still time the system
            log.info("Fashion-MNIST unavailable (%s); using random frames", exc)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, *shape), dtype=np.uint8)


def student_runner(
    bundle: Bundle, path: Path, sha256: str | None, *, pool: bool = True
) -> StudentRunner:
    return StudentRunner(
        read_model(path, sha256), bundle.input, name=path.name, threads=1, pool=pool
    )


def time_runner(runner: StudentRunner, frames: U8, runs: int) -> Summary:
    """Compute time of ``runner.run`` (preprocessing excluded, as the device reports it)."""
    inputs = [runner.preprocess(frames[i % len(frames)]) for i in range(min(runs, 64))]
    times = []
    for index in range(runs):
        x = inputs[index % len(inputs)]
        started = time.perf_counter()
        runner.run(x)
        times.append((time.perf_counter() - started) * 1000.0)
    return Summary.of(times)


def teacher_path(bundle: Bundle) -> tuple[Path, str | None] | None:
    teacher = bundle.meta.get("teacher")
    if not isinstance(teacher, dict) or not isinstance(teacher.get("file"), str):
        return None
    path = bundle.root / teacher["file"]
    sha = teacher.get("sha256")
    return (path, sha if isinstance(sha, str) else None) if path.is_file() else None


def bench_layout(
    bundle: Bundle, envelopes: tuple[int, list[PartialBytes], int]
) -> tuple[list[DeviceSpec], FloorShape]:
    """One device per student (``d<partition>``), and the floor chain that mirrors them: the
    same devices, each answering with its partition's partial size (``envelopes`` as
    :func:`envelope_sizes` measures them)."""
    frame_bytes, partials, result_bytes = envelopes
    devices = [DeviceSpec(f"d{s.partition}", s.partition) for s in bundle.students]
    shape = FloorShape(
        frame_bytes=frame_bytes,
        partial_bytes={f"d{p.partition}": (p.partition, p.payload) for p in partials},
        result_bytes=result_bytes,
    )
    return devices, shape


# --------------------------------------------------------------------------- bytes
@dataclass(frozen=True, slots=True)
class PartialBytes:
    partition: int
    features: int
    payload: int  # the compact msgpack envelope with fp16 features
    bound: int  # 2·|P_k| + 64
    fp32_map: int  # the partition's final-conv map in fp32, as NoNN/RoCoIn send it
    json: int  # a naive JSON encoding of the same partial


def envelope_sizes(bundle: Bundle, frame: U8) -> tuple[int, list[PartialBytes], int]:
    """Payload bytes of a real frame, of each partition's partial and of a result."""
    import json as jsonlib

    frame_bytes = len(
        Frame(id=WIRE_FRAME_ID, source=SOURCE_ID, ts=time.time(), tensor=frame).encode()
    )
    partials = []
    for student in bundle.students:
        pooled = student_runner(bundle, student.file, student.sha256).features(frame)
        full_map = student_runner(bundle, student.file, student.sha256, pool=False).features(frame)
        features16 = pooled.astype(np.float16)
        payload = Partial(
            frame=WIRE_FRAME_ID,
            partition=student.partition,
            device=f"d{student.partition}",
            features=features16,
            compute_ms=1.234,
            queue_ms=0.056,
        ).encode()
        naive = jsonlib.dumps(
            {
                "frame_id": WIRE_FRAME_ID,
                "partition": student.partition,
                "device": f"d{student.partition}",
                "compute_ms": 1.234,
                "queue_ms": 0.056,
                "features": [float(v) for v in pooled],
            }
        )
        partials.append(
            PartialBytes(
                partition=student.partition,
                features=int(pooled.size),
                payload=len(payload),
                bound=2 * int(pooled.size) + 64,
                fp32_map=4 * int(full_map.size),
                json=len(naive.encode()),
            )
        )
    head = bundle.head
    result = Result(
        frame=WIRE_FRAME_ID,
        source=SOURCE_ID,
        logits=np.zeros(head.num_classes, dtype=np.float32),
        label=0,
        score=0.5,
        degraded=False,
        missing=(),
        reason="complete",
        ts=time.time(),
        latency=dict.fromkeys(("e2e_ms", "queue_ms", "compute_ms", "fc_ms", "transport_ms"), 1.0),
        contributors={str(s.partition): f"d{s.partition}" for s in bundle.students},
    )
    return frame_bytes, partials, len(result.encode())


class WireSniffer:
    """Payload sizes of every frame, partial and result of a deployment, as the broker sent them."""

    def __init__(self, url: str, deployment: str) -> None:
        self.topics = Topics(deployment)
        self.bus = Bus(
            BrokerConfig.from_url(url), node="bench-sniffer", kind="monitor", topics=self.topics
        )
        self.sizes: dict[str, list[tuple[str, int]]] = {"frame": [], "partial": [], "result": []}
        self._lock = threading.Lock()
        for kind, topic in (
            ("frame", self.topics.all_frames),
            ("partial", self.topics.all_partials),
            ("result", self.topics.all_results),
        ):
            self.bus.subscribe(topic, self._handler(kind), qos=0)

    def _handler(self, kind: str) -> Callable[[Message], None]:
        def handle(message: Message) -> None:
            with self._lock:
                self.sizes[kind].append((message.topic, len(message.payload)))

        return handle

    def __enter__(self) -> WireSniffer:
        self.bus.start()
        self.bus.wait_connected(10)
        time.sleep(0.2)  # let the SUBACKs land before the first frame
        return self

    def __exit__(self, *exc: object) -> None:
        self.bus.stop()


def wire_bytes(
    sizes: dict[str, list[tuple[str, int]]],
    frames: int,
    devices: int,
    qos: dict[str, int],
    *,
    mqtt5: bool = True,
) -> dict[str, Any]:
    """Bytes per frame over every TCP hop (client → broker, broker → each subscriber).

    A frame goes up once and down to every device and the aggregator; each partial goes up
    once and down to the aggregator; the result goes up once and down to the source. MQTT
    bytes are whole PUBLISH packets (MQTT 5 or 3.1.1 headers, topic included; acks left out).
    """
    out: dict[str, Any] = {"frames": frames}
    total_payload = total_mqtt = 0.0
    fanout = {"frame": 1 + devices + 1, "partial": 2, "result": 2}
    for kind, seen in sizes.items():
        if not seen or frames == 0:
            out[kind] = None
            continue
        payload = sum(size for _, size in seen) / frames
        mqtt = sum(packet_size(t, size, qos[kind], mqtt5) for t, size in seen) / frames
        out[kind] = {
            "messages_per_frame": len(seen) / frames,
            "payload_bytes_per_frame": round(payload, 1),
            "mqtt_bytes_per_frame": round(mqtt, 1),
        }
        total_payload += payload * fanout[kind]
        total_mqtt += mqtt * fanout[kind]
    out["all_hops_payload_bytes_per_frame"] = round(total_payload, 1)
    out["all_hops_mqtt_bytes_per_frame"] = round(total_mqtt, 1)
    return out


# --------------------------------------------------------------------------- the run
@dataclass
class _Samples:
    floor: list[float]
    floor_one_relay: list[float]
    e2e: list[float]
    teacher: list[float]
    breakdown: dict[str, list[float]]
    degraded: int = 0
    timeouts: int = 0


def _interleaved(
    settings: LatencySettings,
    frames: U8,
    floors: tuple[FloorChain, FloorChain],
    source: Source,
    teacher: StudentRunner | None,
) -> _Samples:
    """Floor (a relay per device), floor with one relay, mqttinfer and the teacher, taking
    turns in short rounds."""
    samples = _Samples(
        [],
        [],
        [],
        [],
        {k: [] for k in ("queue_ms", "compute_ms", "fc_ms", "transport_ms", "e2e_ms")},
    )
    floor, floor_one_relay = floors
    cycle = itertools.cycle(range(len(frames)))
    teacher_inputs = [teacher.preprocess(f) for f in frames[:64]] if teacher is not None else []

    def one_floor() -> None:
        samples.floor.append(floor.round_trip(settings.timeout_s))

    def one_floor_one_relay() -> None:
        samples.floor_one_relay.append(floor_one_relay.round_trip(settings.timeout_s))

    def one_e2e() -> None:
        try:
            result = source.infer(frames[next(cycle)], settings.timeout_s)
        except InferTimeoutError:
            samples.timeouts += 1
            return
        if result.degraded:
            samples.degraded += 1
            return
        samples.e2e.append(result.latency_ms)
        for key, values in samples.breakdown.items():
            values.append(float(result.breakdown.get(key, float("nan"))))

    def one_teacher() -> None:
        if teacher is None:
            return
        x = teacher_inputs[len(samples.teacher) % len(teacher_inputs)]
        started = time.perf_counter()
        teacher.run(x)
        samples.teacher.append((time.perf_counter() - started) * 1000.0)

    contenders = [one_floor, one_e2e, one_floor_one_relay, one_teacher]
    for _ in range(settings.warmup):
        for action in contenders:
            action()
    samples.floor.clear()
    samples.floor_one_relay.clear()
    samples.e2e.clear()
    samples.teacher.clear()
    for values in samples.breakdown.values():
        values.clear()
    samples.degraded = samples.timeouts = 0
    per_round = max(1, settings.frames // settings.rounds)
    for round_index in range(settings.rounds):
        # Rotate who goes first, so no contender always follows the same one.
        shift = round_index % len(contenders)
        for action in contenders[shift:] + contenders[:shift]:
            for _ in range(per_round):
                action()
    return samples


def _throughput(url: str, deployment: str, frames: U8, settings: LatencySettings) -> dict[str, Any]:
    """Results per second with ``window`` frames in flight, for ``throughput_s`` seconds."""
    slots = threading.Semaphore(settings.window)
    with Source(
        url,
        source_id=f"{SOURCE_ID}-tp",
        deployment=deployment,
        deadline_ms=settings.deadline_ms,
        on_result=lambda _result: slots.release(),
    ) as source:
        cycle = itertools.cycle(range(len(frames)))
        started = time.monotonic()
        stop = started + settings.throughput_s
        sent = 0
        while time.monotonic() < stop:
            if not slots.acquire(timeout=settings.timeout_s):
                break
            source.publish(frames[next(cycle)])
            sent += 1
        source.wait_all(settings.timeout_s)
        elapsed = time.monotonic() - started
        counters = source.counters.snapshot()
    return {
        "window": settings.window,
        "seconds": round(elapsed, 3),
        "sent": sent,
        "results": counters["results"],
        "complete": counters["complete"],
        "degraded": counters["degraded"],
        "lost": counters["lost"],
        "frames_per_s": round(counters["complete"] / elapsed, 2) if elapsed > 0 else 0.0,
    }


def run_latency(
    bundle_dir: Path, settings: LatencySettings, out: ResultsDir, *, plots: bool = False
) -> dict[str, Any]:
    """The whole benchmark; returns (and writes) the report."""
    bundle = Bundle.load(bundle_dir)
    bundle.verify()
    frames = sample_frames(bundle, max(64, min(settings.frames, 1000)), settings.seed)
    timing_only = bool(bundle.meta.get("timing_only"))
    log.info("measuring each student alone (one thread, no contention)")
    students = {
        s.partition: time_runner(
            student_runner(bundle, s.file, s.sha256), frames, settings.compute_runs
        )
        for s in bundle.students
    }
    teacher_file = teacher_path(bundle)
    teacher = student_runner(bundle, *teacher_file) if teacher_file is not None else None
    frame_bytes, partials, result_bytes = envelopes = envelope_sizes(bundle, frames[0])
    devices, shape = bench_layout(bundle, envelopes)
    log.info("starting the cluster: broker, %d devices, aggregator", len(devices))
    with LocalCluster(
        bundle.root, devices, stats_interval_s=30.0, mqtt_version=settings.mqtt_version
    ) as cluster:
        broker = BrokerConfig.from_url(cluster.url)
        with (
            FloorChain(
                broker.host, broker.port, shape, mqtt_version=settings.mqtt_version
            ) as floor,
            FloorChain(
                broker.host,
                broker.port,
                shape,
                prefix="floor1",
                mqtt_version=settings.mqtt_version,
                relays="one",
            ) as floor_one_relay,
            Source(
                cluster.url,
                source_id=SOURCE_ID,
                deployment=cluster.deployment,
                deadline_ms=settings.deadline_ms,
            ) as source,
        ):
            log.info("interleaved rounds: floor, mqttinfer, teacher")
            samples = _interleaved(settings, frames, (floor, floor_one_relay), source, teacher)
        log.info("throughput with %d frames in flight", settings.window)
        throughput = _throughput(cluster.url, cluster.deployment, frames, settings)
        with (
            WireSniffer(cluster.url, cluster.deployment) as sniffer,
            Source(cluster.url, source_id=SOURCE_ID, deployment=cluster.deployment) as source,
        ):
            for index in range(settings.sniff_frames):
                source.infer(frames[index % len(frames)], settings.timeout_s)
            time.sleep(0.2)
            sizes = {k: list(v) for k, v in sniffer.sizes.items()}
    report = _report(
        bundle=bundle,
        settings=settings,
        timing_only=timing_only,
        students=students,
        teacher_alone=time_runner(teacher, frames, settings.compute_runs) if teacher else None,
        samples=samples,
        throughput=throughput,
        envelopes=(frame_bytes, partials, result_bytes),
        wire=wire_bytes(
            sizes,
            settings.sniff_frames,
            len(devices),
            {"frame": 0, "partial": 0, "result": 1},
            mqtt5=settings.mqtt_version != "3.1.1",
        ),
    )
    out.write_json(report)
    if plots:
        plot_latency(report, out.figure_path())
    return report


def plot_latency(report: dict[str, Any], path: Path) -> None:
    """p50 bars: floor, mqttinfer split into its parts, the teacher; and the partial's bytes."""
    from mqttinfer.bench.report import pyplot

    plt = pyplot()
    lat = report["latency_ms"]
    parts = lat["breakdown"]
    compute, fc = parts["compute_ms"]["p50"], parts["fc_ms"]["p50"]
    other = max(0.0, lat["e2e"]["p50"] - compute - fc)
    figure, (times, sizes) = plt.subplots(1, 2, figsize=(11, 3.6), width_ratios=(3, 2))
    rows = ["floor (bare paho)", "floor, one relay", "mqttinfer e2e"]
    times.barh(0, lat["floor"]["p50"], color="tab:grey")
    times.barh(1, lat["floor_one_relay"]["p50"], color="tab:grey", alpha=0.6)
    times.barh(2, compute, color="tab:blue", label="slowest student compute")
    times.barh(2, fc, left=compute, color="tab:cyan", label="FC head")
    times.barh(2, other, left=compute + fc, color="tab:orange", label="everything else")
    if lat["teacher"] is not None:
        rows.append("teacher, one process")
        times.barh(3, lat["teacher"]["p50"], color="tab:red")
    times.set_yticks(range(len(rows)), rows)
    times.invert_yaxis()
    times.set_xlabel("p50 latency, ms")
    ratios = report["ratios"]
    title = f"overhead ratio {ratios['overhead_p50']:.2f}"
    if ratios["speedup_measured"] is not None:
        title += f", speedup {ratios['speedup_measured']:.2f}x"
    times.set_title(title)
    longest = max(lat["floor"]["p50"], lat["e2e"]["p50"], (lat["teacher"] or {"p50": 0.0})["p50"])
    times.set_xlim(0, longest * 1.6)  # room for the legend on the right
    times.legend(fontsize=7, loc="center right")
    partials = report["bytes"]["partials"]
    labels = ["mqttinfer\n(fp16 pooled)", "JSON\n(pooled)", "fp32 map\n(NoNN/RoCoIn)"]
    values = [float(np.mean([p[key] for p in partials])) for key in ("payload", "json", "fp32_map")]
    sizes.bar(labels, values, color=["tab:blue", "tab:orange", "tab:red"])
    sizes.set_yscale("log")
    sizes.set_ylabel("bytes per partial (mean)")
    for index, value in enumerate(values):
        sizes.annotate(f"{value:.0f} B", (index, value), ha="center", va="bottom", fontsize=8)
    for ax in (times, sizes):
        ax.grid(alpha=0.3, axis="x" if ax is times else "y")
    bundle = report["bundle"]
    figure.suptitle(
        f"{bundle['name']}: {len(bundle['partitions'])} students"
        + (" (random weights, timing only)" if bundle["timing_only"] else ""),
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _report(
    *,
    bundle: Bundle,
    settings: LatencySettings,
    timing_only: bool,
    students: dict[int, Summary],
    teacher_alone: Summary | None,
    samples: _Samples,
    throughput: dict[str, Any],
    envelopes: tuple[int, list[PartialBytes], int],
    wire: dict[str, Any],
) -> dict[str, Any]:
    e2e = Summary.of(samples.e2e)
    floor = Summary.of(samples.floor)
    floor_one_relay = Summary.of(samples.floor_one_relay)
    compute = np.asarray(samples.breakdown["compute_ms"])
    fc = np.asarray(samples.breakdown["fc_ms"])
    overhead = Summary.of(np.asarray(samples.e2e) - compute - fc)
    teacher = Summary.of(samples.teacher)
    slowest_alone = max(s.p50 for s in students.values())
    sum_alone = sum(s.p50 for s in students.values())
    cores = os.cpu_count() or 1
    bound = min(1000.0 / slowest_alone, cores * 1000.0 / sum_alone)
    fc_p50 = Summary.of(fc).p50
    frame_bytes, partials, result_bytes = envelopes
    return {
        "benchmark": "latency",
        "machine": machine(),
        "bundle": {
            "path": str(bundle.root),
            "name": bundle.name,
            "partitions": bundle.partition_sizes(),
            "students": [s.arch for s in bundle.students],
            "teacher": (bundle.meta.get("teacher") or {}).get("arch"),
            "timing_only": timing_only,
            "note": "random weights: timing only, accuracy meaningless" if timing_only else None,
        },
        "settings": asdict(settings),
        "latency_ms": {
            "floor": floor.as_dict(),
            "floor_one_relay": floor_one_relay.as_dict(),
            "e2e": e2e.as_dict(),
            "overhead": overhead.as_dict(),
            "teacher": teacher.as_dict() if samples.teacher else None,
            "breakdown": {k: Summary.of(v).as_dict() for k, v in samples.breakdown.items()},
            "students_alone": {str(k): v.as_dict() for k, v in students.items()},
            "teacher_alone": teacher_alone.as_dict() if teacher_alone else None,
        },
        "ratios": {
            "overhead_p50": overhead.p50 / floor.p50,
            "overhead_p99": overhead.p99 / floor.p99,
            "speedup_measured": teacher.p50 / e2e.p50 if samples.teacher else None,
            # One device per student: the slowest student alone on its core, the FC head, and
            # the transport measured as the floor with one relay (every hop and byte of one
            # inference, no software, no relays competing for this machine's cores).
            "speedup_projected": (
                teacher.p50 / (slowest_alone + fc_p50 + floor_one_relay.p50)
                if samples.teacher
                else None
            ),
            # The same with the floor proper (a relay per device, all on these cores).
            "speedup_projected_shared_floor": (
                teacher.p50 / (slowest_alone + fc_p50 + floor.p50) if samples.teacher else None
            ),
            # The same with everything mqttinfer adds besides compute as the transport.
            "speedup_projected_conservative": (
                teacher.p50 / (slowest_alone + fc_p50 + overhead.p50) if samples.teacher else None
            ),
            "throughput_vs_compute_bound": throughput["frames_per_s"] / bound,
        },
        "degraded": samples.degraded,
        "timeouts": samples.timeouts,
        "bytes": {
            "frame_payload": frame_bytes,
            "result_payload": result_bytes,
            "partials": [asdict(p) for p in partials],
            "partials_within_bound": all(p.payload <= p.bound for p in partials),
            "wire": wire,
        },
        "throughput": {
            **throughput,
            "compute_bound_frames_per_s": round(bound, 2),
            "compute_bound": (
                f"min(1000/{slowest_alone:.3f} ms, {cores} cores x 1000/{sum_alone:.3f} ms)"
            ),
        },
    }


def check_bundle_dir(path: Path | None) -> Path:
    """The bundle to measure: ``path``, else the shipped demo bundle."""
    from mqttinfer.bundle import demo_bundle_path

    chosen = path or demo_bundle_path()
    if not (chosen / "bundle.json").is_file():
        raise BundleError(
            "no bundle here",
            source=str(chosen),
            fix="pass --bundle DIR (e.g. the timing bundle from "
            "'python benchmarks/make_timing_bundle.py': bench-results/timing-bundle)",
        )
    return chosen


def render(report: dict[str, Any]) -> list[Any]:
    """Rich tables: latency side by side, ratios, bytes, throughput."""
    from rich.table import Table

    from mqttinfer.bench.report import ms

    lat = report["latency_ms"]
    bundle = report["bundle"]
    title = f"latency: {bundle['name']} ({len(bundle['partitions'])} students"
    title += ", RANDOM WEIGHTS: timing only)" if bundle["timing_only"] else ")"
    version = report["settings"].get("mqtt_version", "auto")
    title += "" if version == "auto" else f" over MQTT {version}"
    table = Table(title=title)
    for column in ("", "p50 ms", "p99 ms", "n"):
        table.add_column(column, justify="right" if column else "left")
    rows = [
        ("floor (bare paho, same hops and sizes)", lat["floor"]),
        ("floor with one relay for all partitions", lat.get("floor_one_relay")),
        ("mqttinfer end to end (Source.infer)", lat["e2e"]),
        ("  queueing (slowest)", lat["breakdown"]["queue_ms"]),
        ("  slowest student compute", lat["breakdown"]["compute_ms"]),
        ("  FC head", lat["breakdown"]["fc_ms"]),
        ("  transport (slowest partial)", lat["breakdown"]["transport_ms"]),
        ("  e2e − compute − FC (overhead)", lat["overhead"]),
        ("teacher, one process (onnxruntime)", lat["teacher"]),
    ]
    for part, values in lat["students_alone"].items():
        rows.append((f"student {part} alone", values))
    for label, values in rows:
        if values is None:
            table.add_row(label, "n/a", "n/a", "0")
        else:
            table.add_row(label, ms(values["p50"]), ms(values["p99"]), str(values["n"]))
    ratios = report["ratios"]
    ratio_table = Table(title="ratios (taken in this one run)")
    ratio_table.add_column("ratio")
    ratio_table.add_column("value", justify="right")

    def fmt(value: float | None, suffix: str = "") -> str:
        return "n/a" if value is None else f"{value:.2f}{suffix}"

    ratio_table.add_row("overhead p50 = (e2e − compute − FC) / floor", fmt(ratios["overhead_p50"]))
    ratio_table.add_row("overhead p99", fmt(ratios["overhead_p99"]))
    ratio_table.add_row(
        "speedup teacher / e2e (shared cores)", fmt(ratios["speedup_measured"], "×")
    )
    ratio_table.add_row(
        "projected, one device per student (one-relay floor as transport)",
        fmt(ratios["speedup_projected"], "×"),
    )
    ratio_table.add_row(
        "  same, the floor (a relay per device, shared cores) as transport",
        fmt(ratios.get("speedup_projected_shared_floor"), "×"),
    )
    ratio_table.add_row(
        "  same, all of mqttinfer's non-compute time as transport",
        fmt(ratios["speedup_projected_conservative"], "×"),
    )
    ratio_table.add_row(
        "throughput / students' compute bound", fmt(ratios["throughput_vs_compute_bound"])
    )
    byte_table = Table(title="bytes per partial (payload)")
    for column in ("partition", "|P_k|", "mqttinfer", "2·|P_k|+64", "fp32 map", "JSON"):
        byte_table.add_column(column, justify="right")
    for p in report["bytes"]["partials"]:
        byte_table.add_row(
            str(p["partition"]),
            str(p["features"]),
            str(p["payload"]),
            str(p["bound"]),
            str(p["fp32_map"]),
            str(p["json"]),
        )
    wire = report["bytes"]["wire"]
    tp = report["throughput"]
    summary = Table(title="per frame")
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("frame payload", f"{report['bytes']['frame_payload']} B")
    summary.add_row("result payload", f"{report['bytes']['result_payload']} B")
    summary.add_row("all hops, payload", f"{wire['all_hops_payload_bytes_per_frame']} B")
    summary.add_row("all hops, MQTT packets", f"{wire['all_hops_mqtt_bytes_per_frame']} B")
    summary.add_row(
        f"throughput, {tp['window']} in flight",
        f"{tp['frames_per_s']} frames/s (bound {tp['compute_bound_frames_per_s']})",
    )
    return [table, ratio_table, byte_table, summary]
