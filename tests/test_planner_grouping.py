"""Device grouping (follow-the-leader, RoCoIn-G heuristic) and group/partition matching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttinfer.errors import PlanningError
from mqttinfer.planner.assignment import accuracy_proxy, choose_students, match
from mqttinfer.planner.grouping import (
    failure_probability,
    fit_group_count,
    follow_the_leader,
    heuristic_groups,
)
from mqttinfer.planner.inventory import Device, Fleet

SHAPE = (1, 28, 28)


def fleet_of(*specs: tuple[float, int, float, float]) -> Fleet:
    return Fleet(
        tuple(
            Device(f"d{i}", flops, memory, rate, outage)
            for i, (flops, memory, rate, outage) in enumerate(specs)
        )
    )


def random_fleet(rng: np.random.Generator, n: int) -> Fleet:
    return fleet_of(
        *(
            (
                float(rng.uniform(1e8, 1e9)),
                int(rng.choice([2**22, 2**24, 2**26])),
                float(rng.uniform(1e5, 1e6)),
                float(rng.uniform(0.05, 0.4)),
            )
            for _ in range(n)
        )
    )


def set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        for index in range(len(partition)):
            yield [*partition[:index], [first, *partition[index]], *partition[index + 1 :]]
        yield [[first], *partition]


def max_reliable_groups(fleet: Fleet, epsilon: float) -> int | None:
    """Brute force: the most groups a fleet can form with every group's P(fail) ≤ ε."""
    outages = fleet.column("outage")
    counts = [
        len(p)
        for p in set_partitions(list(range(len(fleet))))
        if all(failure_probability(outages[g]) <= epsilon for g in p)
    ]
    return max(counts) if counts else None


def assert_cover(fleet: Fleet, groups) -> None:
    assert sorted(i for g in groups for i in g) == list(range(len(fleet)))


# ----------------------------------------------------------------- follow-the-leader


def test_three_capability_levels_make_three_pairs():
    fleet = fleet_of(
        (2.4e9, 2**28, 40e6, 0.1),
        (4e8, 2**26, 8e6, 0.15),
        (6e7, 2**22, 2e6, 0.2),
        (2.4e9, 2**28, 40e6, 0.12),
        (4e8, 2**26, 8e6, 0.18),
        (6e7, 2**22, 2e6, 0.2),
    )
    grouping = follow_the_leader(fleet, 0.05)
    assert grouping.groups == ((0, 3), (1, 4), (2, 5))
    assert grouping.notes == ()
    assert max_reliable_groups(fleet, 0.05) == 3


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_grouping_meets_epsilon_and_is_near_brute_force(seed, n):
    fleet = random_fleet(np.random.default_rng(seed), n)
    best = max_reliable_groups(fleet, 0.05)
    if best is None:
        with pytest.raises(PlanningError, match="constraint"):
            follow_the_leader(fleet, 0.05)
        return
    grouping = follow_the_leader(fleet, 0.05)
    assert_cover(fleet, grouping.groups)
    outages = fleet.column("outage")
    assert all(failure_probability(outages[list(g)]) <= 0.05 for g in grouping.groups)
    # Follow-the-leader is a heuristic: never more groups than possible, at most one fewer.
    assert best - 1 <= len(grouping.groups) <= best


def test_grouping_reaches_the_brute_force_optimum_mostly():
    rng = np.random.default_rng(7)
    hits = total = 0
    for _ in range(150):
        fleet = random_fleet(rng, int(rng.integers(2, 7)))
        best = max_reliable_groups(fleet, 0.05)
        if best is None:
            continue
        total += 1
        hits += len(follow_the_leader(fleet, 0.05).groups) == best
    assert hits / total >= 0.8


def test_groups_hold_similar_devices():
    rng = np.random.default_rng(3)
    fast = [(float(rng.uniform(2e9, 2.2e9)), 2**28, 50e6, 0.2) for _ in range(6)]
    slow = [(float(rng.uniform(1e8, 1.2e8)), 2**22, 1e6, 0.2) for _ in range(6)]
    fleet = fleet_of(*[spec for pair in zip(fast, slow, strict=True) for spec in pair])
    for group in follow_the_leader(fleet, 0.01).groups:
        assert len({index % 2 for index in group}) == 1  # never mixes fast and slow


def test_leftover_groups_are_merged_and_noted():
    # One outlier with nobody similar within δ must not stay alone below ε.
    fleet = fleet_of(
        (1e9, 2**24, 1e6, 0.2),
        (1e9, 2**24, 1e6, 0.2),
        (1e9, 2**24, 1e6, 0.2),
        (9e9, 2**28, 9e7, 0.2),
    )
    grouping = follow_the_leader(fleet, 0.05, delta=0.1)
    # d0+d1 pair up; d2 and the outlier d3 are left short and merged with each other.
    assert grouping.groups == ((0, 1), (2, 3))
    assert len(grouping.notes) == 1 and "merged [d2]" in grouping.notes[0]
    with pytest.raises(PlanningError) as caught:
        follow_the_leader(fleet, 0.05, delta=0.1, strict=True)
    assert caught.value.constraint == "epsilon" and "d3" in caught.value.devices
    assert "--delta" in str(caught.value)


def test_unreachable_epsilon_names_constraint_and_devices():
    fleet = fleet_of((1e9, 2**24, 1e6, 0.5), (1e9, 2**24, 1e6, 0.5))
    with pytest.raises(PlanningError) as caught:
        follow_the_leader(fleet, 0.1)
    assert caught.value.devices == ("d0", "d1")
    assert "(1f)" in str(caught.value) and "0.25" in str(caught.value)


def test_min_replicas_forces_pairs():
    fleet = fleet_of(*[(1e9, 2**24, 1e6, 0.01)] * 4)
    assert all(len(g) == 1 for g in follow_the_leader(fleet, 0.05).groups)
    assert all(len(g) == 2 for g in follow_the_leader(fleet, 0.05, min_replicas=2).groups)


@pytest.mark.parametrize("epsilon", [0.0, 1.0, -0.1, float("nan")])
def test_bad_epsilon(epsilon):
    with pytest.raises(PlanningError, match="ε"):
        follow_the_leader(fleet_of((1e9, 2**24, 1e6, 0.1)), epsilon)


def test_heuristic_groups_follow_inventory_order():
    fleet = fleet_of(*[(1e9, 2**24, 1e6, 0.2)] * 5)
    grouping = heuristic_groups(fleet, 0.05)
    assert grouping.groups == ((0, 1), (2, 3, 4))
    assert grouping.notes


def test_fit_group_count_merges_and_splits():
    fleet = fleet_of(*[(1e9 * (1 + i), 2**24, 1e6, 0.1) for i in range(8)])
    grouping = follow_the_leader(fleet, 0.05)
    assert len(grouping.groups) == 4
    fewer = fit_group_count(fleet, grouping, 2, 0.05)
    assert len(fewer.groups) == 2 and len(fewer.notes) == 2
    assert_cover(fleet, fewer.groups)
    back = fit_group_count(fleet, fewer, 4, 0.05)
    assert len(back.groups) == 4
    with pytest.raises(PlanningError, match="--k 4"):
        fit_group_count(fleet, grouping, 5, 0.05)


# ----------------------------------------------------------------- matching


def brute_force_matching(weights: np.ndarray) -> float:
    size = weights.shape[0]
    return max(
        sum(weights[g, p] for g, p in enumerate(perm))
        for perm in itertools.permutations(range(size))
    )


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6))
def test_kuhn_munkres_matches_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    fleet = random_fleet(rng, k)
    groups = [(i,) for i in range(k)]
    sizes = [int(s) for s in rng.integers(1, 30, k)]
    candidates = ("wrn-10-0.5", "wrn-16-1", "mobilenetv2-0.5")
    pairs = match(fleet, groups, sizes, candidates, SHAPE)
    assert sorted(p for p, _ in pairs) == list(range(k))
    weights = np.array(
        [
            [
                max(
                    (c.weight for c in [choose_students(fleet, [g], s, candidates, SHAPE)[0]] if c),
                    default=-np.inf,
                )
                for s in sizes
            ]
            for g in groups
        ]
    )
    got = sum(choice.weight for _, choice in pairs)
    assert got == pytest.approx(brute_force_matching(weights), rel=1e-12)


def test_two_size_shortcut_equals_full_kuhn_munkres():
    from mqttinfer.planner import assignment

    rng = np.random.default_rng(5)
    n = 700  # above the full-matrix limit
    weights = rng.random((n, 2)) + np.array([0.0, 0.05])
    column_of = np.array([0] * 300 + [1] * 400)
    fast = assignment._assign(weights, column_of)
    full = assignment._kuhn_munkres(weights[:, column_of])
    total = weights[np.arange(n), column_of[fast]].sum()
    assert total == pytest.approx(weights[np.arange(n), column_of[full]].sum())
    assert sorted(fast) == list(range(n))


def test_students_respect_every_members_memory():
    fleet = fleet_of((1e9, 2**30, 1e6, 0.1), (1e9, 600_000, 1e6, 0.1))
    (choice,) = choose_students(fleet, [(0, 1)], 8, ("wrn-10-0.5", "mobilenetv2"), SHAPE)
    assert choice is not None and choice.cost.arch == "wrn-10-0.5"
    (big,) = choose_students(fleet, [(0,)], 8, ("wrn-10-0.5", "mobilenetv2"), SHAPE)
    assert big is not None and big.cost.arch == "mobilenetv2"


def test_no_fitting_student_is_a_planning_error():
    fleet = fleet_of((1e9, 1000, 1e6, 0.1))
    with pytest.raises(PlanningError) as caught:
        match(fleet, [(0,)], [8], ("wrn-16-1",), SHAPE)
    assert caught.value.constraint == "memory" and caught.value.devices == ("d0",)
    assert "wrn-16-1" in str(caught.value) and "fix:" in str(caught.value)


def test_accuracy_proxy():
    assert accuracy_proxy(1000, 10) == 100
    assert accuracy_proxy(1000, 10, params_per_filter=50) == 1.0
    assert accuracy_proxy(250, 10, params_per_filter=50) == 0.5


def test_params_per_filter_picks_the_fastest_student_that_learns():
    fleet = fleet_of((1e9, 2**30, 1e6, 0.1))
    names = ("wrn-10-0.5", "wrn-16-1", "mobilenetv2")
    (plain,) = choose_students(fleet, [(0,)], 8, names, SHAPE)
    (coupled,) = choose_students(fleet, [(0,)], 8, names, SHAPE, min_params_per_filter=10_000)
    assert plain is not None and plain.cost.arch == "mobilenetv2"  # most params per MAC
    assert coupled is not None and coupled.cost.arch == "wrn-16-1"  # fastest with ≥ 80 k
