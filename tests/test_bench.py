"""Benchmarks run on tiny configurations and write well-formed output (no timing assertions,
except lower bounds that an emulated sleep guarantees)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from mqttinfer.bench.aggregator import AggregatorSettings, render, run_aggregator
from mqttinfer.bench.cli import bench_app
from mqttinfer.bench.failures import (
    FailureCase,
    FailureSettings,
    cases_from_dir,
    draw_failures,
    run_failures,
    student_features,
)
from mqttinfer.bench.floor import ID_BYTES, FloorChain, FloorShape, frame_id_bytes
from mqttinfer.bench.floor import main as floor_main
from mqttinfer.bench.heterogeneity import HeterogeneitySettings, run_heterogeneity
from mqttinfer.bench.latency import LatencySettings, run_latency
from mqttinfer.bench.latency import render as render_latency
from mqttinfer.bench.report import ResultsDir
from mqttinfer.bundle import Bundle
from mqttinfer.errors import ConfigError
from mqttinfer.planner.bundle_source import load_bundle_spec
from mqttinfer.planner.inventory import parse_inventory
from mqttinfer.planner.plan import save_plan
from mqttinfer.planner.strategies import PlanRequest, make_plan
from mqttinfer.runtime.bus import BrokerConfig, Bus
from mqttinfer.runtime.cluster import DeviceSpec, LocalCluster
from mqttinfer.runtime.device import DeviceSettings
from mqttinfer.runtime.local_broker import LocalBroker
from mqttinfer.runtime.source import Source
from mqttinfer.topics import Topics
from tests.support.synthetic import SyntheticBundle, build_synthetic_bundle, random_frames


# --------------------------------------------------------------------------- --link-rate
def test_link_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="link_rate_bps"):
        DeviceSettings(node="d0", link_rate_bps=0.0)
    assert DeviceSpec("d0", 0, link_rate=4000.0).args()[-2:] == ["--link-rate", "4000.0"]


@pytest.mark.broker
def test_link_rate_delays_partials_as_transport(synthetic_bundle: SyntheticBundle) -> None:
    # 4 kbit/s: a partial of ~50 bytes takes ~0.1 s to "send"; the other device is not limited.
    devices = [DeviceSpec("d0", 0, link_rate=4000.0), DeviceSpec("d1", 1)]
    frames = random_frames(3)
    with (
        LocalCluster(synthetic_bundle.path, devices) as cluster,
        Source(
            cluster.url, source_id="cam", deployment=cluster.deployment, deadline_ms=5000
        ) as camera,
    ):
        results = [camera.infer(frame, timeout_s=10) for frame in frames]
    for result in results:
        assert (result.reason, result.degraded) == ("complete", False)
        # The emulated serialisation of a >= 40-byte partial at 4 kbit/s sleeps >= 80 ms.
        assert result.breakdown["transport_ms"] >= 60.0
        assert result.breakdown["compute_ms"] < result.breakdown["transport_ms"]


# --------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bundle_with_plain_head(root: Path, sizes: tuple[int, ...] = (6, 5)) -> SyntheticBundle:
    """A synthetic bundle whose head.file is declared dropout-trained and which has head.plain."""
    bundle = build_synthetic_bundle(root, partition_sizes=sizes)
    rng = np.random.default_rng(7)
    plain = rng.normal(0, 1.0, bundle.head_weight.shape).astype(np.float32)
    np.savez(root / "head-plain.npz", weight=plain, bias=bundle.head_bias)
    meta = json.loads((root / "bundle.json").read_text())
    meta["head"].update(plain="head-plain.npz", partition_dropout=0.25)
    (root / "bundle.json").write_text(json.dumps(meta))
    return bundle


def _zero_filled_logits(
    features: list[np.ndarray], weight: np.ndarray, bias: np.ndarray, missing: frozenset[int]
) -> np.ndarray:
    """The oracle, vectorised: the wire's fp16 features, missing partitions zeroed, then W·x+b."""
    parts = [
        np.zeros(f.shape, np.float32) if k in missing else f.astype(np.float32)
        for k, f in enumerate(features)
    ]
    return np.concatenate(parts, axis=1) @ weight.T + bias


# --------------------------------------------------------------------------- aggregator
def test_aggregator_bench_counts_partials_and_memory(tmp_path: Path) -> None:
    settings = AggregatorSettings(partitions=(4, 3, 5), frames=300, open_frames=50, repeats=1)
    report = run_aggregator(settings, ResultsDir(tmp_path, "aggregator"))
    written = _read_json(tmp_path / "aggregator.json")
    assert written["state_machine"]["partials"] == 900
    assert written["state_machine"]["frames_fired"] == 300
    assert written["with_head"]["frames_fired"] == 300
    assert written["state_machine"]["partials_per_s"] > 0
    memory = written["memory"]
    assert (memory["open_frames"], memory["partials_per_open_frame"]) == (50, 2)
    # Two fp32 vectors of 4 and 3 features per slot at the very least.
    assert memory["bytes_per_open_frame"] > 4 * (4 + 3)
    assert written["machine"]["cpus"] >= 1
    assert render(report)


def test_aggregator_cli_prints_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        bench_app,
        [
            *("aggregator", "--frames", "200", "--open-frames", "20", "--repeats", "1"),
            *("--partitions", "3,3", "--replicas", "2", "--out", str(tmp_path), "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["settings"]["replicas"] == 2
    # Each frame: 2 partitions x 2 replicas; the second replica of each is late.
    assert document["state_machine"]["partials"] == 800
    assert document["state_machine"]["frames_fired"] == 200


def test_aggregator_cli_rejects_bad_partitions(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench_app, ["aggregator", "--partitions", "a,b"])
    assert result.exit_code == 2
    assert "--partitions" in result.output


# --------------------------------------------------------------------------- failures
def test_failure_draws_are_seeded_and_sized() -> None:
    ids = ["a", "b", "c", "d"]
    first = draw_failures(ids, 2, 10, seed=3)
    assert first == draw_failures(ids, 2, 10, seed=3)
    assert all(len(survivors) == 2 and survivors <= set(ids) for survivors in first)
    assert draw_failures(ids, 0, 3, seed=3) == [frozenset(ids)] * 3


def test_failures_bench_matches_zero_filled_oracle(tmp_path: Path) -> None:
    bundle = _bundle_with_plain_head(tmp_path / "bundle")
    frames = random_frames(60, bundle.shape, seed=5)
    features = student_features(Bundle.load(bundle.path), frames, None)
    # The features are the synthetic model's (numpy reference), as fp16.
    np.testing.assert_allclose(features[1], bundle.student_features(frames, 1), atol=1e-2)
    bias = bundle.head_bias
    # Labels the ensemble gets right with every partition: accuracy 1 at 0 failures.
    labels = _zero_filled_logits(features, bundle.head_weight, bias, frozenset()).argmax(axis=1)
    # Partition 0 has two replicas (a, b), partition 1 one device (c).
    case = FailureCase("rocoin", bundle.path, {"a": 0, "b": 0, "c": 1})
    settings = FailureSettings(images=60, trials=8, seed=1)
    out = ResultsDir(tmp_path / "out", "failures")
    report = run_failures([case], frames, labels, settings, out, plots=True)

    plain = np.load(bundle.path / "head-plain.npz")["weight"]
    weights = {"dropout": bundle.head_weight, "plain": plain}
    rows = {(r["head"], r["failed"]): r for r in report["rows"]}
    assert set(rows) == {(h, f) for h in weights for f in range(3)}
    assert rows[("dropout", 0)]["mean"] == 1.0
    for (head, failed), row in rows.items():
        expected = []
        for survivors in draw_failures(["a", "b", "c"], failed, 8, seed=1):
            served = {case.devices[d] for d in survivors}
            missing = frozenset({0, 1} - served)
            logits = _zero_filled_logits(features, weights[head], bias, missing)
            expected.append(float((logits.argmax(axis=1) == labels).mean()))
        assert row["trials"] == 8
        assert row["mean"] == pytest.approx(np.mean(expected), abs=1e-9)
        assert row["min"] == pytest.approx(min(expected), abs=1e-9)
    with (tmp_path / "out" / "failures.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6 and set(table[0]) >= {"strategy", "head", "failed", "mean", "min"}
    assert _is_png(tmp_path / "out" / "failures.png")
    # The cached features are reused on a second run (same numbers).
    again = run_failures([case], frames, labels, settings, out, plots=False)
    assert again["rows"] == report["rows"]
    assert list((tmp_path / "out" / "features").glob("*.npz"))


def test_failure_cases_come_from_plans_next_to_bundles(tmp_path: Path) -> None:
    build_synthetic_bundle(tmp_path / "nonn" / "bundle")
    fleet = parse_inventory(
        {
            "version": 1,
            "devices": [
                {"id": "x", "flops": "1G", "memory": "64MiB", "rate": "1Mbit/s", "outage": 0.1},
                {"id": "y", "flops": "2G", "memory": "64MiB", "rate": "1Mbit/s", "outage": 0.1},
            ],
        }
    )
    spec = load_bundle_spec(tmp_path / "nonn" / "bundle")
    save_plan(
        make_plan(PlanRequest(fleet=fleet, strategy="nonn", bundle_spec=spec)),
        tmp_path / "nonn" / "plan.yaml",
    )
    (cases,) = [cases_from_dir(tmp_path)]
    assert [c.strategy for c in cases] == ["nonn"]
    assert sorted(cases[0].devices) == ["x", "y"]
    assert sorted(cases[0].devices.values()) == [0, 1]


# --------------------------------------------------------------------------- latency
@pytest.mark.broker
def test_latency_bench_on_a_real_cluster(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    settings = LatencySettings(
        frames=12, rounds=2, warmup=2, throughput_s=0.5, sniff_frames=3, compute_runs=5
    )
    report = run_latency(
        synthetic_bundle.path, settings, ResultsDir(tmp_path, "latency"), plots=True
    )
    written = _read_json(tmp_path / "latency.json")
    assert (tmp_path / "latency.png").read_bytes().startswith(b"\x89PNG")
    assert written["bundle"]["partitions"] == [6, 5]
    latency = written["latency_ms"]
    assert latency["floor"]["n"] == 12 and latency["e2e"]["n"] == 12
    assert latency["floor_one_relay"]["n"] == 12
    assert latency["teacher"] is None  # the synthetic bundle ships no teacher
    assert written["ratios"]["speedup_measured"] is None
    assert written["ratios"]["speedup_projected"] is None
    assert written["ratios"]["speedup_projected_shared_floor"] is None
    assert written["ratios"]["overhead_p50"] > 0
    assert set(latency["breakdown"]) == {
        "queue_ms",
        "compute_ms",
        "fc_ms",
        "transport_ms",
        "e2e_ms",
    }
    partials = written["bytes"]["partials"]
    assert [p["features"] for p in partials] == [6, 5]
    assert written["bytes"]["partials_within_bound"] is True
    for p in partials:
        assert p["payload"] <= p["bound"] < p["json"]
        assert p["fp32_map"] == 4 * p["features"] * 4 * 4  # 8x8 input, stride 2: 4x4 maps
    wire = written["bytes"]["wire"]
    # Per frame: one frame, one partial per device, one result, as sniffed from the broker.
    assert wire["frame"]["messages_per_frame"] == 1
    assert wire["partial"]["messages_per_frame"] == 2
    assert wire["result"]["messages_per_frame"] == 1
    # The envelope sizes assume the longest frame id (15 characters); real ids are shorter.
    assert 0 < wire["partial"]["payload_bytes_per_frame"] <= sum(p["payload"] for p in partials)
    throughput = written["throughput"]
    assert throughput["complete"] >= 1 and throughput["compute_bound_frames_per_s"] > 0
    assert render_latency(report)


@pytest.mark.broker
def test_latency_bench_over_mqtt_311(synthetic_bundle: SyntheticBundle, tmp_path: Path) -> None:
    settings = LatencySettings(
        frames=4,
        rounds=1,
        warmup=1,
        throughput_s=0.2,
        sniff_frames=2,
        compute_runs=2,
        mqtt_version="3.1.1",
    )
    run_latency(synthetic_bundle.path, settings, ResultsDir(tmp_path, "latency"))
    written = _read_json(tmp_path / "latency.json")
    assert written["settings"]["mqtt_version"] == "3.1.1"
    assert written["latency_ms"]["floor"]["n"] == 4 and written["latency_ms"]["e2e"]["n"] == 4
    assert written["bytes"]["wire"]["result"]["messages_per_frame"] == 1


# Two partitions, partition 0 with two replicas: three devices, two partials per inference.
REPLICA_SHAPE = FloorShape(
    frame_bytes=100, partial_bytes={"a": (0, 40), "b": (0, 40), "c": (1, 30)}, result_bytes=50
)


@pytest.mark.broker
@pytest.mark.parametrize(("relays", "expected"), [("per-device", 3), ("one", 2)])
def test_floor_layouts_send_one_partial_per_device_or_per_partition(
    broker: LocalBroker, relays: str, expected: int
) -> None:
    prefix = f"floortest{expected}"
    seen: list[tuple[bytes, str, int]] = []
    sniffer = Bus(
        BrokerConfig.from_url(broker.url), node=f"sniff-{prefix}", kind="monitor", topics=Topics()
    )
    sniffer.subscribe(
        f"{prefix}/partials/+/+",
        lambda m: seen.append((m.payload[:ID_BYTES], m.topic, len(m.payload))),
    )
    with sniffer:
        assert sniffer.wait_connected(10)
        chain = FloorChain("127.0.0.1", broker.port, REPLICA_SHAPE, prefix=prefix, relays=relays)
        with chain:
            first = chain._counter + 1  # after the probe frames of start()
            for _ in range(3):
                assert chain.round_trip(timeout_s=5.0) > 0
            time.sleep(0.3)  # a replica's partial may come after the result
    ours = {frame_id_bytes(f"f{n}") for n in range(first, first + 3)}
    seen = [entry for entry in seen if entry[0] in ours]
    assert len(seen) == 3 * expected
    partitions = sorted({topic.split("/")[2] for _, topic, _ in seen})
    assert partitions == ["0", "1"]
    sizes = {topic.split("/")[2]: size for _, topic, size in seen}
    assert sizes == {"0": 40, "1": 30}


def test_floor_chain_refuses_an_unknown_relay_layout() -> None:
    with pytest.raises(ValueError, match="per-device"):
        FloorChain("127.0.0.1", 1, REPLICA_SHAPE, relays="many")


def test_floor_device_relay_needs_an_answer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        floor_main(["device", "--port", "1", "--prefix", "x"])
    assert "--answer PARTITION:BYTES" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        floor_main(["device", "--port", "1", "--prefix", "x", "--answer", "0-40"])
    assert "expected PARTITION:BYTES" in capsys.readouterr().err


def test_latency_bench_refuses_an_unknown_mqtt_version() -> None:
    with pytest.raises(ValueError, match=r"3\.1\.1"):
        LatencySettings(mqtt_version="4")


def test_cluster_url_carries_the_mqtt_version(synthetic_bundle: SyntheticBundle) -> None:
    cluster = LocalCluster(synthetic_bundle.path, [], broker_url="mqtt://h:1", mqtt_version="3.1.1")
    assert cluster.url == "mqtt://h:1?version=3.1.1"
    assert BrokerConfig.from_url(cluster.url).mqtt_version == "3.1.1"
    plain = LocalCluster(synthetic_bundle.path, [], broker_url="mqtt://h:1", aggregator=False)
    assert plain.url == "mqtt://h:1"
    with pytest.raises(ConfigError, match="mqtt_version"):
        LocalCluster(synthetic_bundle.path, [], broker_url="mqtt://h:1", mqtt_version="4")


# --------------------------------------------------------------------------- heterogeneity
@pytest.mark.broker
def test_heterogeneity_bench_emulates_the_plan(tmp_path: Path) -> None:
    for strategy in ("rocoin", "nonn"):
        build_synthetic_bundle(tmp_path / strategy / "bundle")
    fleet = parse_inventory(
        {
            "version": 1,
            "devices": [
                {"id": "fast", "flops": "2G", "memory": "64MiB", "rate": "8Mbit/s", "outage": 0.1},
                {"id": "slow", "flops": "1G", "memory": "64MiB", "rate": "1Mbit/s", "outage": 0.1},
            ],
        }
    )
    settings = HeterogeneitySettings(frames=4, warmup=1, margin=2.0, compute_runs=5, epsilon=0.5)
    cases = [(s, tmp_path / s / "bundle") for s in ("rocoin", "nonn")]
    out = ResultsDir(tmp_path / "out", "heterogeneity")
    report = run_heterogeneity(cases, fleet, settings, out, plots=True)
    rows = {row["strategy"]: row for row in report["rows"]}
    assert set(rows) == {"rocoin", "nonn"}
    scale = report["time_scale"]
    for row in rows.values():
        assert row["devices"] == 2 and row["frames"] == 4
        assert row["time_scale"] == scale
        assert row["predicted_ms"] == pytest.approx(scale * row["predicted_unscaled_s"] * 1000)
        by_device = {e["device"]: e for e in row["emulated"]}
        # The slower device is slowed down more, and its link rate is the inventory's / scale.
        assert by_device["slow"]["slowdown"] >= by_device["fast"]["slowdown"] >= 1.0
        assert by_device["slow"]["link_rate"] == pytest.approx(1e6 / scale)
        assert row["measured_p50_ms"] > 0
    with (tmp_path / "out" / "heterogeneity.csv").open() as handle:
        assert [r["strategy"] for r in csv.DictReader(handle)] == ["rocoin", "nonn"]
    assert _is_png(tmp_path / "out" / "heterogeneity.png")
