"""Strategies end to end: constraints hold, RoCoIn vs the baselines, plan files, prediction."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttinfer.errors import ConfigError, PlanningError
from mqttinfer.planner.bundle_source import load_bundle_spec
from mqttinfer.planner.catalog import student_cost
from mqttinfer.planner.inventory import Device, Fleet, load_inventory
from mqttinfer.planner.latency import device_latency, frame_prediction, output_bytes
from mqttinfer.planner.plan import (
    STRATEGIES,
    dump_plan,
    load_plan,
    parse_plan,
    plan_document,
    save_plan,
)
from mqttinfer.planner.simulate import simulate_plan, survives_single_failures
from mqttinfer.planner.strategies import PlanRequest, make_plan
from mqttinfer.planner.synthetic import heterogeneous_fleet

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "devices" / "example-fleet.yaml"


def check_plan_constraints(plan, fleet: Fleet, epsilon: float, channels: int) -> None:
    """Memory fits every member, partitions cover every filter once, ε where it applies."""
    memory = {d.id: d.memory for d in fleet.devices}
    assert sorted(plan.devices) == sorted(fleet.ids)
    filters = sorted(f for g in plan.groups for f in g.filters)
    assert filters == list(range(channels))
    assert sorted(g.partition for g in plan.groups) == list(range(len(plan.groups)))
    for group in plan.groups:
        assert group.student.memory <= min(memory[m.device] for m in group.members)
        assert student_cost(group.student.arch, plan.input_shape, len(group.filters)).params == (
            group.student.params
        )
    if plan.strategy in ("rocoin", "rocoin-g"):
        assert plan.meets_epsilon()
        assert all(g.failure_probability <= epsilon * (1 + 1e-9) for g in plan.groups)


# ----------------------------------------------------------------- constraints


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 24),
    level=st.integers(0, 5),
    strategy=st.sampled_from(STRATEGIES),
    epsilon=st.sampled_from([0.01, 0.05, 0.1]),
)
def test_every_plan_meets_memory_epsilon_and_covers_partitions(seed, n, level, strategy, epsilon):
    rng = np.random.default_rng(seed)
    fleet = heterogeneous_fleet(n, level, rng, memory=int(rng.choice([2**21, 2**23, 2**26])))
    request = PlanRequest(fleet, strategy, epsilon, channels=48, input_shape=(1, 28, 28))
    try:
        plan = make_plan(request)
    except PlanningError as err:
        # Only an unreachable ε (whole fleet too unreliable) or too little memory may fail.
        assert err.constraint in ("epsilon", "memory")
        assert err.devices
        return
    check_plan_constraints(plan, fleet, epsilon, 48)


def test_plans_from_activations_use_the_filter_network():
    rng = np.random.default_rng(0)
    acts = rng.random((300, 40)).astype(np.float32)
    acts[:, 35:] = 0.0  # five dead filters
    fleet = load_inventory(EXAMPLE)
    for strategy in STRATEGIES:
        plan = make_plan(
            PlanRequest(fleet, strategy, 0.05, activations=acts, input_shape=(1, 28, 28))
        )
        check_plan_constraints(plan, fleet, 0.05, 40)
        expected = {
            "rocoin": "normalized-cut",
            "rocoin-g": "normalized-cut",
            "nonn": "louvain",
            "hetnonn": "normalized-cut",
        }[strategy]
        assert plan.partitioning == expected
        if strategy.startswith("rocoin"):
            sizes = [len(g.filters) for g in plan.groups]
            assert max(sizes) - min(sizes) <= 1  # balanced normalized cut


def test_hetnonn_partitions_follow_device_speed():
    fleet = load_inventory(EXAMPLE)
    plan = make_plan(PlanRequest(fleet, "hetnonn", 0.05, channels=64, input_shape=(1, 28, 28)))
    size = {g.members[0].device: len(g.filters) for g in plan.groups}
    assert size["pi4-a"] > size["pi0-a"] > size["esp-a"]
    assert sum(size.values()) == 64


def test_nonn_uses_one_student_that_fits_everyone():
    fleet = load_inventory(EXAMPLE)
    plan = make_plan(PlanRequest(fleet, "nonn", 0.05, channels=64, input_shape=(1, 28, 28)))
    assert len({g.student.arch for g in plan.groups}) == 1
    assert len(plan.groups) == 6 and all(len(g.members) == 1 for g in plan.groups)
    # The ESP32s have 4 MiB: MobileNetV2 (7.8 MiB) does not fit; the largest that does
    # (by parameters) is WRN-16-2 (0.69 M parameters, 2.8 MiB).
    assert plan.groups[0].student.arch == "wrn-16-2"


def test_example_fleet_gives_three_groups_of_two():
    plan = make_plan(PlanRequest(load_inventory(EXAMPLE), "rocoin", 0.05, channels=64))
    assert [len(g.members) for g in plan.groups] == [2, 2, 2]
    kinds = [{m.device.split("-")[0] for m in g.members} for g in plan.groups]
    assert all(len(kind) == 1 for kind in kinds)


# ----------------------------------------------------------------- RoCoIn vs baselines


def test_rocoin_latency_beats_nonn_and_hetnonn_on_heterogeneous_fleets():
    rng = np.random.default_rng(20)
    wins_nonn = wins_het = draws = 0
    for level in (1, 2, 3, 4, 5):
        for _ in range(12):
            fleet = heterogeneous_fleet(20, level, rng)
            latency = {
                strategy: make_plan(
                    PlanRequest(fleet, strategy, 0.05, channels=256)
                ).predicted.latency_s
                for strategy in ("rocoin", "nonn", "hetnonn")
            }
            draws += 1
            wins_nonn += latency["rocoin"] <= latency["nonn"]
            wins_het += latency["rocoin"] <= latency["hetnonn"]
    assert wins_nonn / draws >= 0.9
    assert wins_het / draws >= 0.9


def test_rocoin_survives_every_single_failure_where_baselines_do_not():
    rng = np.random.default_rng(21)
    for level in (1, 3, 5):
        fleet = heterogeneous_fleet(20, level, rng)
        plans = {s: make_plan(PlanRequest(fleet, s, 0.05, channels=256)) for s in STRATEGIES}
        for device in fleet.ids:
            for strategy, plan in plans.items():
                alive = all(any(m.device != device for m in g.members) for g in plan.groups)
                assert alive == (strategy in ("rocoin", "rocoin-g")), (strategy, device)
        assert survives_single_failures(plans["rocoin"])
        assert not survives_single_failures(plans["nonn"])
        assert not survives_single_failures(plans["hetnonn"])


# ----------------------------------------------------------------- errors


def test_more_groups_than_filters_is_a_clear_error():
    fleet = heterogeneous_fleet(20, 2, np.random.default_rng(0))
    with pytest.raises(PlanningError) as caught:
        make_plan(PlanRequest(fleet, "nonn", 0.05, channels=8))
    assert caught.value.constraint == "partitions" and "8 filters" in str(caught.value)


def test_missing_channels_and_unknown_strategy():
    fleet = load_inventory(EXAMPLE)
    with pytest.raises(PlanningError, match="--channels"):
        make_plan(PlanRequest(fleet, "rocoin", 0.05))
    with pytest.raises(PlanningError, match="unknown strategy"):
        make_plan(PlanRequest(fleet, "magic", 0.05, channels=8))
    with pytest.raises(PlanningError, match="disagrees"):
        make_plan(PlanRequest(fleet, "rocoin", 0.05, channels=8, activations=np.ones((3, 9))))


def test_memory_infeasible_fleet():
    fleet = Fleet((Device("tiny", 1e9, 10_000, 1e6, 0.01),))
    with pytest.raises(PlanningError) as caught:
        make_plan(PlanRequest(fleet, "rocoin", 0.05, channels=8))
    assert caught.value.constraint == "memory" and caught.value.devices == ("tiny",)


# ----------------------------------------------------------------- bundles


def test_plan_for_a_bundle_takes_its_partitions_and_students(tmp_path):
    pytest.importorskip("onnx")
    from tests.support.synthetic import build_synthetic_bundle

    build_synthetic_bundle(tmp_path / "b", partition_sizes=(6, 5, 5), shape=(1, 8, 8))
    spec = load_bundle_spec(tmp_path / "b")
    fleet = load_inventory(EXAMPLE)
    plan = make_plan(PlanRequest(fleet, "rocoin", 0.05, bundle_spec=spec))
    assert plan.partitioning == "bundle" and plan.input_shape == (1, 8, 8)
    assert plan.bundle == str(tmp_path / "b")
    for group in plan.groups:
        assert list(group.filters) == list(spec.partitions[group.partition])
        assert group.student.arch == "synthetic-conv3x3"
    assert parse_plan(yaml.safe_load(dump_plan(plan))).groups == plan.groups
    with pytest.raises(PlanningError, match="one device per partition"):
        make_plan(PlanRequest(fleet, "nonn", 0.05, bundle_spec=spec))


# ----------------------------------------------------------------- plan files


def test_plan_round_trip(tmp_path):
    fleet = load_inventory(EXAMPLE)
    plan = make_plan(
        PlanRequest(fleet, "rocoin", 0.05, channels=64, input_shape=(1, 28, 28), name="site-a")
    )
    path = tmp_path / "plans" / "site-a.yaml"
    save_plan(plan, path)
    again = load_plan(path)
    assert [g.filters for g in again.groups] == [g.filters for g in plan.groups]
    assert [g.student for g in again.groups] == [g.student for g in plan.groups]
    assert again.predicted.completion_probability == pytest.approx(
        plan.predicted.completion_probability, rel=1e-5
    )
    assert again.predicted.latency_s == pytest.approx(plan.predicted.latency_s, rel=1e-5)
    document = yaml.safe_load(path.read_text())
    assert document["version"] == 1 and document["groups"][0]["members"][0]["device"]


def test_shipped_example_plan_loads():
    plan = load_plan(REPO / "plans" / "example.yaml")
    assert len(plan.groups) == 3 and plan.meets_epsilon()


def mutate(document: dict, path: tuple, value: object) -> dict:
    copy = yaml.safe_load(yaml.safe_dump(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copy


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("version",), 9, "version"),
        (("strategy",), "best", "strategy"),
        (("epsilon",), 2.0, "epsilon"),
        (("channels",), KeyError, "channels"),
        (("input_shape",), [1, 28], "input_shape"),
        (("groups", 0, "filters"), [0, 1, 999], "groups[0].filters"),
        (("groups", 0, "filters"), [], "groups[0].filters"),
        (("groups", 1, "partition"), 0, "groups[].partition"),
        (("groups", 0, "members", 0, "outage"), 1.0, "groups[0].members[0].outage"),
        (("groups", 0, "members", 0, "device"), "a/b", "groups[0].members[0].device"),
        (("groups", 0, "student", "params"), -1, "groups[0].student.params"),
        (("groups", 0, "colour"), "red", "groups[0].colour"),
        (("extra",), 1, "extra"),
    ],
)
def test_plan_validation_names_the_field(path, value, field):
    plan = make_plan(PlanRequest(load_inventory(EXAMPLE), "rocoin", 0.05, channels=64))
    document = mutate(plan_document(plan), path, value)
    with pytest.raises(ConfigError) as caught:
        parse_plan(document, source="plans/x.yaml")
    assert caught.value.field == field
    assert "plans/x.yaml" in str(caught.value) and "fix:" in str(caught.value)


def test_plan_validation_catches_duplicates_and_gaps():
    plan = make_plan(PlanRequest(load_inventory(EXAMPLE), "rocoin", 0.05, channels=64))
    document = plan_document(plan)
    taken = document["groups"][0]["members"][0]["device"]
    duplicated = mutate(document, ("groups", 1, "members", 0, "device"), taken)
    with pytest.raises(ConfigError, match="appears more than once"):
        parse_plan(duplicated)
    gap = mutate(document, ("groups", 0, "filters"), document["groups"][0]["filters"][1:])
    with pytest.raises(ConfigError, match="belong to no partition"):
        parse_plan(gap)
    dropped = mutate(gap, ("dropped_filters",), document["groups"][0]["filters"][:1])
    assert parse_plan(dropped).dropped_filters == tuple(document["groups"][0]["filters"][:1])


# ----------------------------------------------------------------- prediction and simulation


def test_latency_model():
    assert output_bytes(10) == 84
    assert device_latency(1e6, 10, 2e6, 8 * 84) == pytest.approx(1.0 + 1.0)


def brute_force_prediction(latencies, outages):
    """Enumerate every alive/dead pattern."""
    flat = [
        (g, t, p)
        for g, (ts, ps) in enumerate(zip(latencies, outages, strict=True))
        for t, p in zip(ts, ps, strict=True)
    ]
    complete = expected = 0.0
    for pattern in itertools.product([True, False], repeat=len(flat)):
        prob = math.prod((1 - p) if up else p for (_, _, p), up in zip(flat, pattern, strict=True))
        best = [
            min(
                (t for (g2, t, _), up in zip(flat, pattern, strict=True) if up and g2 == g),
                default=None,
            )
            for g in range(len(latencies))
        ]
        if all(b is not None for b in best):
            complete += prob
            expected += prob * max(best)
    return expected / complete, complete


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(
        st.lists(st.tuples(st.floats(0.01, 10), st.floats(0.0, 0.9)), min_size=1, max_size=3),
        min_size=1,
        max_size=4,
    )
)
def test_frame_prediction_is_exact(groups):
    latencies = [[t for t, _ in g] for g in groups]
    outages = [[p for _, p in g] for g in groups]
    predicted = frame_prediction(latencies, outages)
    latency, complete = brute_force_prediction(latencies, outages)
    assert predicted.completion_probability == pytest.approx(complete, rel=1e-9, abs=1e-12)
    assert predicted.latency_s == pytest.approx(latency, rel=1e-9)
    assert predicted.all_up_latency_s <= predicted.latency_s + 1e-12
    assert predicted.latency_s <= predicted.worst_case_latency_s + 1e-12


def test_simulation_agrees_with_prediction():
    fleet = heterogeneous_fleet(20, 4, np.random.default_rng(3))
    plan = make_plan(PlanRequest(fleet, "rocoin", 0.05, channels=256))
    result = simulate_plan(plan, trials=40_000, seed=1)
    assert result.completion_rate == pytest.approx(plan.predicted.completion_probability, abs=0.01)
    assert result.mean_latency_s == pytest.approx(plan.predicted.latency_s, rel=0.01)
    assert result.p50_latency_s <= result.p99_latency_s
    assert set(result.partition_availability) == {g.id for g in plan.groups}
    assert simulate_plan(plan, trials=500, seed=9) == simulate_plan(plan, trials=500, seed=9)
    with pytest.raises(ValueError, match="trials"):
        simulate_plan(plan, trials=0)
