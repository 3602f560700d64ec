"""``mqttinfer bench aggregator``: the pure aggregation state machine alone.

Partials per second: ``frames`` frames, each opened by its header and completed by one partial
per partition (fp16 features of the partition's width, as they come off the wire), fed to
:class:`~mqttinfer.aggregation.Aggregation` on a synthetic clock; the time is the wall time
of those calls only (the inputs are built beforehand). A second pass also applies the FC head
to every fired slot (``concat_features`` + ``apply_head``, what the aggregator role does per
result). Replicas are measured too: with ``replicas`` > 1 every partition gets that many
partials, the extra ones arriving after the slot fired (counted ``late``).

Memory per open frame: ``open_frames`` slots held open (header plus every partition but one),
measured with tracemalloc as the growth of traced memory divided by the number of slots.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mqttinfer.aggregation import Aggregation, AggregationConfig, apply_head, concat_features
from mqttinfer.bench.report import ResultsDir, machine


@dataclass(frozen=True, slots=True)
class AggregatorSettings:
    partitions: tuple[int, ...] = (22, 21, 21)  # the demo bundle's partition widths
    classes: int = 10
    frames: int = 20_000
    replicas: int = 1
    open_frames: int = 2_000
    repeats: int = 3  # best of: the machine is shared
    seed: int = 0


def _inputs(settings: AggregatorSettings) -> tuple[list[str], list[list[tuple[int, str, Any]]]]:
    rng = np.random.default_rng(settings.seed)
    ids = [f"{i:08x}-{i:x}" for i in range(settings.frames)]
    vectors = [rng.standard_normal((64, width)).astype(np.float16) for width in settings.partitions]
    partials = []
    for index in range(settings.frames):
        row = []
        for replica in range(settings.replicas):
            for partition in range(len(settings.partitions)):
                device = f"d{partition}-{replica}"
                row.append((partition, device, vectors[partition][index % 64]))
        partials.append(row)
    return ids, partials


def _machine(settings: AggregatorSettings, frames: int) -> Aggregation:
    widths = dict(enumerate(settings.partitions))
    return Aggregation(
        AggregationConfig(widths=widths, max_open=max(256, frames + 1), remember_fired=frames + 1)
    )


def partials_per_second(settings: AggregatorSettings, *, with_head: bool) -> dict[str, Any]:
    """Best of ``repeats`` passes over ``frames`` frames."""
    ids, partials = _inputs(settings)
    rng = np.random.default_rng(settings.seed + 1)
    width = sum(settings.partitions)
    weight = rng.standard_normal((settings.classes, width)).astype(np.float32)
    bias = np.zeros(settings.classes, dtype=np.float32)
    widths = dict(enumerate(settings.partitions))
    best = float("inf")
    fired_total = 0
    for _ in range(settings.repeats):
        machine_ = _machine(settings, settings.frames)
        gc.collect()
        now = 0.0
        fired_total = 0
        started = time.perf_counter()
        for frame_id, row in zip(ids, partials, strict=True):
            now += 0.001
            machine_.open_frame(frame_id, "cam", now)
            for partition, device, features in row:
                result = machine_.add_partial(frame_id, partition, device, features, now)
                for fired in result.fired:
                    fired_total += 1
                    if with_head:
                        apply_head(weight, bias, concat_features(widths, fired.features))
        best = min(best, time.perf_counter() - started)
    count = settings.frames * settings.replicas * len(settings.partitions)
    return {
        "with_head": with_head,
        "partials": count,
        "frames_fired": fired_total,
        "seconds": round(best, 4),
        "partials_per_s": round(count / best, 1),
        "frames_per_s": round(settings.frames / best, 1),
        "us_per_partial": round(best / count * 1e6, 3),
    }


def memory_per_open_frame(settings: AggregatorSettings) -> dict[str, Any]:
    """Traced bytes per open slot (header + all partitions but the last)."""
    ids, partials = _inputs(settings)
    count = min(settings.open_frames, settings.frames)
    machine_ = _machine(settings, count)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(count):
            machine_.open_frame(ids[index], "cam", 0.0)
            for partition, device, features in partials[index][: len(settings.partitions) - 1]:
                machine_.add_partial(ids[index], partition, device, features, 0.0)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    if machine_.open_count != count:
        raise RuntimeError(f"expected {count} open slots, found {machine_.open_count}")
    return {
        "open_frames": count,
        "bytes_total": after - before,
        "bytes_per_open_frame": round((after - before) / count, 1),
        "partials_per_open_frame": len(settings.partitions) - 1,
    }


def run_aggregator(settings: AggregatorSettings, out: ResultsDir) -> dict[str, Any]:
    report = {
        "benchmark": "aggregator",
        "machine": machine(),
        "settings": asdict(settings),
        "state_machine": partials_per_second(settings, with_head=False),
        "with_head": partials_per_second(settings, with_head=True),
        "memory": memory_per_open_frame(settings),
    }
    out.write_json(report)
    return report


def render(report: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    settings = report["settings"]
    table = Table(
        title=f"aggregation state machine: partitions {settings['partitions']}, "
        f"{settings['replicas']} replica(s), best of {settings['repeats']}"
    )
    for column in ("pass", "partials/s", "frames/s", "µs/partial"):
        table.add_column(column, justify="right" if column != "pass" else "left")
    for key, label in (("state_machine", "state machine"), ("with_head", "+ FC head per result")):
        row = report[key]
        table.add_row(
            label,
            f"{row['partials_per_s']:,.0f}",
            f"{row['frames_per_s']:,.0f}",
            f"{row['us_per_partial']:.2f}",
        )
    memory = report["memory"]
    table.add_row(
        f"memory per open frame ({memory['partials_per_open_frame']} partials held)",
        f"{memory['bytes_per_open_frame']:,.0f} B",
        "",
        "",
    )
    return [table]
