"""``mqttinfer monitor``: the pure MonitorState, and the CLI against a real local cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqttinfer.monitor_state import MonitorState, supersedes
from mqttinfer.protocol import Quantiles, RoleSummary, Stats, Status
from mqttinfer.runtime.cluster import DeviceSpec, LocalCluster
from mqttinfer.runtime.source import Source
from tests.support.synthetic import SyntheticBundle, random_frames

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers
def status(
    node: str,
    state: str = "online",
    bdseq: int = 100,
    *,
    kind: str = "device",
    partition: int | None = 0,
    serving: str = "ready",
    clean: bool = False,
) -> Status:
    role = None if partition is None else RoleSummary(group=f"g{partition}", partition=partition)
    return Status(
        node=node,
        kind=kind,
        state=state,
        bdseq=bdseq,
        ts=1000.0,
        role=role if kind == "device" else None,
        serving=serving,
        clean=clean,
    )


def stats(
    node: str,
    ts: float,
    *,
    kind: str = "device",
    interval_s: float = 2.0,
    gauges: dict[str, float] | None = None,
    **counters: int,
) -> Stats:
    return Stats(
        node=node,
        kind=kind,
        ts=ts,
        interval_s=interval_s,
        counters=dict(counters),
        gauges=gauges or {},
        latency_ms={
            "compute": Quantiles(p50=1.5, p99=4.0, mean=2.0, n=10),
            "e2e": Quantiles(p50=8.0, p99=30.0, mean=9.0, n=10),
        },
    )


def view_of(state: MonitorState, node: str, now: float = 0.0) -> Any:
    return next(v for v in state.views(now) if v.node == node)


# --------------------------------------------------------------------------- statuses
def test_stale_will_after_a_fast_restart_is_ignored_and_counted() -> None:
    state = MonitorState()
    assert state.on_status(status("d1", "online", bdseq=200), now=1.0)
    # The will of the previous connection (bdseq 100) arrives after the new birth.
    assert not state.on_status(status("d1", "offline", bdseq=100), now=2.0)
    view = view_of(state, "d1")
    assert (view.state, view.bdseq) == ("online", 200)
    assert state.stale_statuses == 1
    assert state.snapshot(3.0)["stale_statuses_ignored"] == 1


def test_will_of_the_current_connection_takes_the_node_offline() -> None:
    state = MonitorState()
    state.on_status(status("d1", "online", bdseq=200), now=1.0)
    assert state.on_status(status("d1", "offline", bdseq=200), now=2.0)
    assert view_of(state, "d1").state == "offline"
    # ...and a birth of the same connection cannot resurrect it; a new connection can.
    assert not state.on_status(status("d1", "online", bdseq=200), now=3.0)
    assert state.on_status(status("d1", "online", bdseq=300), now=4.0)
    assert (view_of(state, "d1").state, view_of(state, "d1").bdseq) == ("online", 300)


def test_a_later_birth_of_the_same_connection_updates_serving() -> None:
    state = MonitorState()
    state.on_status(status("d1", bdseq=5, serving="loading"), now=0.0)
    assert state.on_status(status("d1", bdseq=5, serving="ready"), now=1.0)
    assert view_of(state, "d1").serving == "ready"
    assert supersedes(status("x", "offline", 5), status("x", "online", 5))
    assert supersedes(status("x", "online", 4), status("x", "offline", 3))
    assert not supersedes(status("x", "offline", 3), status("x", "online", 4))


def test_cleared_status_forgets_the_node_and_own_node_is_ignored() -> None:
    state = MonitorState(ignore=["monitor-me"])
    state.on_status(status("d1"), now=0.0)
    state.on_status(status("monitor-me", kind="monitor", partition=None), now=0.0)
    state.on_stats(stats("monitor-me", 10.0, kind="monitor"), now=0.0)
    assert [v.node for v in state.views(0.0)] == ["d1"]
    state.on_status_cleared("d1")
    assert state.views(0.0) == []


# --------------------------------------------------------------------------- stats
def test_rates_from_consecutive_stats_and_counter_resets() -> None:
    state = MonitorState()
    state.on_status(status("d1"), now=0.0)
    state.on_stats(stats("d1", 100.0, frames=10, answered=10, errors=1, bad_input=2), now=0.0)
    assert view_of(state, "d1").rates == {}  # one message: no rate yet
    state.on_stats(stats("d1", 102.0, frames=30, answered=28, errors=1, bad_input=2), now=2.0)
    view = view_of(state, "d1", now=2.5)
    assert view.rates["frames"] == pytest.approx(10.0)
    assert view.rates["answered"] == pytest.approx(9.0)
    assert view.rates["errors"] == 0.0
    assert (view.frames, view.errors, view.rejected) == (30, 1, 2)
    assert (view.latency_name, view.p50_ms, view.p99_ms) == ("compute", 1.5, 4.0)
    assert view.stats_age_s == pytest.approx(0.5)
    # The node restarted: counters went down, so no rate (never a negative one).
    state.on_stats(stats("d1", 104.0, frames=3, answered=3), now=4.0)
    assert "frames" not in view_of(state, "d1", 4.0).rates


def test_aggregator_rates_prefer_its_own_gauges() -> None:
    state = MonitorState()
    state.on_status(status("agg", kind="aggregator", partition=None), now=0.0)
    state.on_stats(stats("agg", 10.0, kind="aggregator", complete=0, late=0), now=0.0)
    gauges = {"complete_per_s": 42.0, "degraded_per_s": 1.5}
    state.on_stats(stats("agg", 12.0, kind="aggregator", gauges=gauges, complete=10, late=8), 2.0)
    view = view_of(state, "agg")
    assert view.rates["complete"] == 42.0  # the gauge, not the 5/s from the counters
    assert view.rates["late"] == pytest.approx(4.0)  # no gauge: from the counters
    assert view.latency_name == "e2e"
    (aggregator,) = state.snapshot(2.0)["aggregators"]
    assert aggregator["per_s"] == {
        "complete": 42.0,
        "degraded": 1.5,
        "timed_out": None,
        "duplicate": None,
        "late": 4.0,
    }


def test_stats_go_stale_after_three_intervals() -> None:
    state = MonitorState()
    state.on_stats(stats("d1", 1.0, interval_s=2.0, frames=1), now=10.0)
    assert not view_of(state, "d1", now=15.9).stats_stale
    assert view_of(state, "d1", now=16.1).stats_stale
    assert view_of(state, "d1", now=16.1).state == "unknown"  # stats, but no status yet


def test_snapshot_orders_nodes_and_lists_live_replicas_per_partition() -> None:
    state = MonitorState()
    for node, partition, state_name in (
        ("b1", 1, "online"),
        ("a1", 1, "offline"),
        ("a0", 0, "online"),
    ):
        state.on_status(status(node, state_name, partition=partition), now=0.0)
    state.on_status(status("cam", kind="source", partition=None, serving="idle"), now=0.0)
    state.on_status(status("agg", kind="aggregator", partition=None), now=0.0)
    document = state.snapshot(0.0)
    assert [n["node"] for n in document["nodes"]] == ["agg", "a0", "a1", "b1", "cam"]
    assert document["partitions"] == {"0": {"live": ["a0"]}, "1": {"live": ["b1"]}}
    assert (document["online"], document["offline"], document["devices_ready"]) == (4, 1, 2)
    json.dumps(document)  # JSON-ready as it is


def test_rejected_messages_are_counted_per_kind() -> None:
    state = MonitorState()
    state.on_rejected("stats")
    state.on_rejected("stats")
    state.on_rejected("status")
    assert state.snapshot(0.0)["rejected"] == {"stats": 2, "status": 1}


# --------------------------------------------------------------------------- the CLI
def run_monitor(cluster: LocalCluster, *extra: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "mqttinfer", "monitor", "--broker", cluster.url]
    argv += ["--deployment", cluster.deployment, "--once", "--json", "--settle", "2", *extra]
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


@pytest.fixture(scope="module")
def cluster(synthetic_bundle: SyntheticBundle) -> Iterator[LocalCluster]:
    devices = [DeviceSpec("d0", 0), DeviceSpec("d1", 1), DeviceSpec("d2", 1)]
    with LocalCluster(
        synthetic_bundle.path, devices, deployment="mon1", stats_interval_s=0.5
    ) as running:
        yield running


def nodes_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {node["node"]: node for node in document["nodes"]}


@pytest.mark.broker
def test_monitor_once_json_finds_every_node(cluster: LocalCluster) -> None:
    # Some traffic, so the counters and latencies have something to say.
    with Source(cluster.url, "cam", cluster.deployment, deadline_ms=3000) as camera:
        for frame in random_frames(5):
            assert not camera.infer(frame, timeout_s=10).degraded

    document = run_monitor(cluster)
    nodes = nodes_of(document)
    assert {"aggregator", "d0", "d1", "d2"} <= set(nodes)
    for name in ("aggregator", "d0", "d1", "d2"):
        node = nodes[name]
        board = cluster.status(name)
        assert board is not None
        assert (node["state"], node["serving"], node["bdseq"]) == ("online", "ready", board.bdseq)
        assert node["stats_age_s"] is not None and not node["stats_stale"], node
    for name, partition in (("d0", 0), ("d1", 1), ("d2", 1)):
        assert (nodes[name]["group"], nodes[name]["partition"]) == (f"g{partition}", partition)
        assert nodes[name]["counters"]["answered"] >= 5
        assert nodes[name]["latency_name"] == "compute" and nodes[name]["p50_ms"] > 0
    assert nodes["aggregator"]["counters"]["complete"] >= 5
    assert document["partitions"] == {"0": {"live": ["d0"]}, "1": {"live": ["d1", "d2"]}}
    assert document["aggregators"][0]["node"] == "aggregator"
    assert document["deployment"] == cluster.deployment


@pytest.mark.broker
def test_monitor_sees_a_killed_device_offline(cluster: LocalCluster) -> None:
    before = cluster.status("d1")
    assert before is not None
    cluster.kill("d1")
    cluster.wait_offline(["d1"], timeout_s=15)
    try:
        nodes = nodes_of(document := run_monitor(cluster))
        # The will carries the bdseq of the connection it ended.
        assert (nodes["d1"]["state"], nodes["d1"]["bdseq"]) == ("offline", before.bdseq)
        assert not nodes["d1"]["clean"]
        assert nodes["d2"]["state"] == nodes["d0"]["state"] == "online"
        assert document["partitions"]["1"] == {"live": ["d2"]}
    finally:
        cluster.restart("d1")
