"""Print the Markdown tables of docs/benchmarks.md from the benchmarks' JSON results.

    .venv/bin/python benchmarks/summarize.py [bench-results] > /tmp/tables.md

Reads every ``latency.json``, ``failures.json``, ``aggregator.json`` and
``heterogeneity.json`` under the folder (recursively: one ``--out`` folder per run, e.g.
``demo/`` and ``timing/`` for the two latency runs), so the numbers in the document are the
ones the commands wrote, not retyped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def row(*cells: object) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = m.get("load_average")
    return (
        f"{m['arch']}, {m['cpus']} CPUs ({m['cpu_model']}), {m['system']}, Python {m['python']}"
        + (f"; load average at the end of the run {load[0]}" if load else "")
    )


def latency_tables(report: dict[str, Any], path: Path) -> str:
    lat = report["latency_ms"]
    bundle = report["bundle"]
    ratios = report["ratios"]
    rows = [
        ("floor: bare paho chain, same hops and payload sizes", lat["floor"]),
        ("floor with one relay answering for every partition", lat.get("floor_one_relay")),
        ("mqttinfer end to end (`Source.infer`)", lat["e2e"]),
        ("— queueing (slowest device queue)", lat["breakdown"]["queue_ms"]),
        ("— slowest student compute", lat["breakdown"]["compute_ms"]),
        ("— FC head", lat["breakdown"]["fc_ms"]),
        ("— transport (slowest partial, aggregator's estimate)", lat["breakdown"]["transport_ms"]),
        ("e2e − slowest compute − FC", lat["overhead"]),
        ("teacher, one onnxruntime session, one process", lat["teacher"]),
    ]
    rows += [(f"student {k} alone on one core", v) for k, v in lat["students_alone"].items()]
    if lat.get("teacher_alone"):
        rows.append(("teacher alone (no cluster running)", lat["teacher_alone"]))
    out = [
        f"`{path}`: bundle **{bundle['name']}** ({len(bundle['partitions'])} students "
        f"{', '.join(sorted(set(bundle['students'])))}, partitions {bundle['partitions']}, "
        f"teacher {bundle['teacher']})"
        + (" — **random weights, timing only**" if bundle["timing_only"] else ""),
        "",
        f"Machine: {machine_line(report)}.",
        "",
    ]
    out += ["| | p50 ms | p99 ms | n |", "| --- | ---: | ---: | ---: |"]
    for label, values in rows:
        if values is None:
            out.append(f"| {label} | n/a | n/a | 0 |")
        else:
            out.append(f"| {label} | {values['p50']:.3f} | {values['p99']:.3f} | {values['n']} |")

    def fmt(value: float | None, suffix: str = "") -> str:
        return "n/a" if value is None else f"{value:.2f}{suffix}"

    out += ["", "| ratio (one run) | value |", "| --- | ---: |"]
    ratio_rows = [
        ("overhead p50 = p50(e2e − compute − FC) / p50(floor)", ratios["overhead_p50"], ""),
        ("overhead p99", ratios["overhead_p99"], ""),
        (
            "speedup = p50(teacher) / p50(e2e), every process on this machine",
            ratios["speedup_measured"],
            "×",
        ),
        (
            "projected, one device per student: teacher / (slowest student alone + FC + "
            "one-relay floor)",
            ratios["speedup_projected"],
            "×",
        ),
        (
            "same with the floor (a relay per device, all on these cores) as transport",
            ratios.get("speedup_projected_shared_floor"),
            "×",
        ),
        (
            "same, conservative: p50(e2e − compute − FC) instead of the floor as transport",
            ratios["speedup_projected_conservative"],
            "×",
        ),
        ("throughput / students' compute bound", ratios["throughput_vs_compute_bound"], ""),
    ]
    out += [row(label, fmt(value, suffix)) for label, value, suffix in ratio_rows]
    b = report["bytes"]
    size = "\\|P_k\\|"
    out += [
        "",
        row("partition", size, "mqttinfer partial", f"bound 2·{size}+64", "fp32 map", "naive JSON"),
        row(*["---:"] * 6),
    ]
    for p in b["partials"]:
        cells = [f"{p[k]} B" for k in ("payload", "bound", "fp32_map", "json")]
        out.append(row(p["partition"], p["features"], *cells))
    wire = b["wire"]
    tp = report["throughput"]
    out += [
        "",
        f"Frame payload {b['frame_payload']} B, result payload {b['result_payload']} B. "
        f"Sniffed on the broker over {wire['frames']} frames: "
        f"{wire['all_hops_payload_bytes_per_frame']:.0f} B of payload "
        f"({wire['all_hops_mqtt_bytes_per_frame']:.0f} B of MQTT PUBLISH packets) cross TCP per "
        f"frame, every hop counted (frame up and down to each device and the aggregator, partials "
        f"up and down, result up and down).",
        "",
        f"Throughput with {tp['window']} frames in flight for {tp['seconds']:.1f} s: "
        f"**{tp['frames_per_s']:.1f} frames/s** complete ({tp['degraded']} degraded, "
        f"{tp['lost']} lost); the students' compute bound on this machine is "
        f"{tp['compute_bound_frames_per_s']:.0f} frames/s ({tp['compute_bound']}).",
    ]
    return "\n".join(out)


def failures_table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    failed = sorted({r["failed"] for r in rows})
    heads = sorted({r["head"] for r in rows}, key=lambda h: (h == "plain", h))
    out = [
        f"{report['images']} Fashion-MNIST test images, {report['settings']['trials']} trials "
        f"per failure count (seed {report['settings']['seed']}). Machine: {machine_line(report)}.",
        "",
    ]
    if report.get("note"):
        out += [f"Note: {report['note']}", ""]
    out.append(
        "| strategy (partition sizes) | head | " + " | ".join(f"{f} failed" for f in failed) + " |"
    )
    out.append("| --- | --- | " + " | ".join("---:" for _ in failed) + " |")
    for case in report["cases"]:
        for head in heads:
            mine = {
                r["failed"]: r
                for r in rows
                if r["strategy"] == case["strategy"] and r["head"] == head
            }
            cells = [
                f"{mine[f]['mean']:.3f} ({mine[f]['min']:.3f}–{mine[f]['max']:.3f})"
                if f in mine
                else ""
                for f in failed
            ]
            out.append(
                f"| {case['strategy']} {case['partition_sizes']} | {head} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(out)


def aggregator_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    out = [
        f"Partitions {s['partitions']}, {s['replicas']} replica(s), {s['frames']} frames, best of "
        f"{s['repeats']}. Machine: {machine_line(report)}.",
        "",
        "| pass | partials/s | frames/s | µs per partial |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("state_machine", "state machine alone"),
        ("with_head", "+ concat + FC head per result"),
    ):
        r = report[key]
        out.append(
            row(
                label,
                f"{r['partials_per_s']:,.0f}",
                f"{r['frames_per_s']:,.0f}",
                f"{r['us_per_partial']:.2f}",
            )
        )
    m = report["memory"]
    out += [
        "",
        f"Memory: {m['bytes_per_open_frame']:,.0f} B per open frame (tracemalloc, "
        f"{m['open_frames']} slots each holding {m['partials_per_open_frame']} partials).",
    ]
    return "\n".join(out)


def heterogeneity_table(report: dict[str, Any]) -> str:
    out = [
        f"Fleet {report['fleet']['source']}: "
        + ", ".join(
            f"{d['id']} {d['flops'] / 1e6:.0f} MFLOP/s {d['rate'] / 1e6:g} Mbit/s"
            for d in report["fleet"]["devices"]
        )
        + f". Time scale {report['time_scale']:.4g}. Machine: {machine_line(report)}.",
        "",
        row("strategy", "groups", "predicted ms", "measured e2e p50 ms", "p99 ms", "difference"),
        row("---", *["---:"] * 5),
    ]
    for r in report["rows"]:
        measured, predicted = r["measured_p50_ms"], r["predicted_ms"]
        out.append(
            row(
                r["strategy"],
                r["groups"],
                f"{predicted:.1f}",
                f"{measured:.1f}",
                f"{r['measured_p99_ms']:.1f}",
                f"{measured - predicted:+.1f}",
            )
        )
    return "\n".join(out)


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def spread_table(paths: list[Path], root: Path) -> str:
    """One line per latency run: the ratios and the load it ran under."""
    out = [
        row(
            "run",
            "bundle",
            "MQTT",
            "load",
            "floor p50",
            "one-relay floor p50",
            "e2e p50",
            "overhead",
            "speedup",
            "projected (one-relay floor)",
            "projected (floor)",
            "tp/bound",
        ),
        row(*["---"] * 3, *["---:"] * 9),
    ]
    for path in paths:
        report = _load(path)
        lat, ratios = report["latency_ms"], report["ratios"]
        load = report["machine"].get("load_average") or ["?"]
        one_relay = lat.get("floor_one_relay")
        out.append(
            row(
                path.parent.relative_to(root),
                report["bundle"]["name"],
                report["settings"].get("mqtt_version", "auto"),
                load[0],
                f"{lat['floor']['p50']:.2f} ms",
                "n/a" if one_relay is None else f"{one_relay['p50']:.2f} ms",
                f"{lat['e2e']['p50']:.2f} ms",
                f"{ratios['overhead_p50']:.2f}",
                _times(ratios["speedup_measured"]),
                # Reports from before the one-relay floor projected with the floor.
                _times(ratios["speedup_projected"] if one_relay else None),
                _times(ratios.get("speedup_projected_shared_floor", ratios["speedup_projected"])),
                f"{ratios['throughput_vs_compute_bound']:.2f}",
            )
        )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path("bench-results")
    runs = sorted(root.rglob("latency.json"))
    for name in ("demo", "timing"):
        path = root / name / "latency.json"
        if path.is_file():
            print(f"### latency: {path.parent}\n\n{latency_tables(_load(path), path)}\n")
    if runs:
        print(f"### latency runs\n\n{spread_table(runs, root)}\n")
    sections = (
        ("failures.json", "failures", failures_table),
        ("aggregator.json", "aggregator", aggregator_table),
        ("heterogeneity.json", "heterogeneity", heterogeneity_table),
    )
    for name, title, table in sections:
        for path in sorted(root.rglob(name)):
            print(f"### {title}: {path.parent}\n\n{table(_load(path))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
