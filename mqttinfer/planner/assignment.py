"""Student assignment: which student each group runs, and which partition it learns.

RoCoIn §IV-B.3 reduces the device-group × partition × student matching to a bipartite one.
For group g and partition P_k, only the students that fit the memory of *every* member of g
are candidates (constraint (1g)). Eq. (5) weighs the pair by the best accuracy-to-delay ratio
over those candidates:

    w(g, k) = max_s  acc(s, P_k)  /  max_{d ∈ g} t_d(s, |P_k|),   acc(s, P_k) = params(s) / |P_k|

Optionally (constraint (1h), ``min_params_per_filter`` = ρ > 0) a student needs at least ρ
parameters per filter of P_k to learn it, and acc saturates there (:func:`accuracy_proxy`):
among students that fully learn the partition the fastest wins.

with t_d of :mod:`mqttinfer.planner.latency` (the slowest member, so the weight holds whichever
replicas survive). Kuhn–Munkres (``scipy.optimize.linear_sum_assignment``) then finds the
one-to-one pairing of groups and partitions with the largest total weight.

When there are many groups but at most two distinct partition sizes (equal-size partitions
differ by at most one filter), partitions of one size are interchangeable and the matching is
solved exactly by sorting groups on their weight difference — ``linear_sum_assignment`` on
thousands of tied columns is needlessly slow (22 s for 5,000 groups here).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from mqttinfer.errors import PlanningError
from mqttinfer.planner.catalog import InputShape, StudentCost, student_cost
from mqttinfer.planner.inventory import Fleet
from mqttinfer.planner.latency import device_latencies
from mqttinfer.units import format_bytes

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
# Up to this many groups we always run Kuhn–Munkres on the full matrix.
_FULL_MATRIX_LIMIT = 512


@dataclass(frozen=True, slots=True)
class Choice:
    """The best student for one (group, partition size): eq. (5)'s maximiser."""

    cost: StudentCost
    weight: float
    delay_s: float  # slowest member's latency


@dataclass(frozen=True, slots=True)
class GroupTable:
    """Per-member arrays of a fleet split into groups, for vectorised latency sums."""

    order: npt.NDArray[np.int64]  # fleet indices sorted by group
    starts: npt.NDArray[np.int64]  # first position of each group in ``order``
    min_memory: FloatArray  # smallest member memory per group

    @classmethod
    def build(cls, fleet: Fleet, groups: Sequence[Sequence[int]]) -> GroupTable:
        order = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        memory = fleet.column("memory")[order]
        return cls(order, starts, np.minimum.reduceat(memory, starts))


def choose_students(
    fleet: Fleet,
    groups: Sequence[Sequence[int]],
    partition_size: int,
    candidates: Sequence[str],
    input_shape: InputShape,
    *,
    min_params_per_filter: float = 0.0,
    table: GroupTable | None = None,
    costs: Sequence[StudentCost] | None = None,
) -> list[Choice | None]:
    """Eq. (5)'s best student per group for one partition size (None: nothing fits).

    ``costs`` replaces the catalog look-up of ``candidates`` (a bundle's fixed student).
    """
    table = table or GroupTable.build(fleet, groups)
    flops = fleet.column("flops")[table.order]
    rate = fleet.column("rate")[table.order]
    best_weight = np.full(len(groups), -np.inf)
    best: list[Choice | None] = [None] * len(groups)
    if costs is None:
        costs = [student_cost(name, input_shape, partition_size) for name in candidates]
    for cost in costs:
        if cost.params < min_params_per_filter * partition_size:
            continue
        latencies = device_latencies(cost.macs, partition_size, flops, rate)
        delay = np.maximum.reduceat(latencies, table.starts)
        weight = accuracy_proxy(cost.params, partition_size, min_params_per_filter) / delay
        weight[table.min_memory < cost.memory_bytes] = -np.inf
        better = np.flatnonzero(weight > best_weight)
        best_weight[better] = weight[better]
        for index in better:
            best[int(index)] = Choice(cost, float(weight[index]), float(delay[index]))
    return best


def accuracy_proxy(params: int, partition_size: int, params_per_filter: float = 0.0) -> float:
    """Eq. (5)'s accuracy term: student size per partition filter.

    With ``params_per_filter`` ρ > 0 the proxy saturates at 1 once the student has ρ
    parameters per filter — it has then "fully learned" the partition (constraint (1h)) and
    a bigger student buys nothing but delay, so eq. (5) picks the fastest such student.
    With ρ = 0 the proxy is the plain ratio params / |P| of the paper.
    """
    if params_per_filter > 0:
        return min(1.0, params / (params_per_filter * partition_size))
    return params / partition_size


def largest_common_student(
    fleet: Fleet,
    partition_size: int,
    candidates: Sequence[str],
    input_shape: InputShape,
    *,
    min_params_per_filter: float = 0.0,
) -> StudentCost:
    """NoNN: the student with the most parameters that fits every device's memory."""
    smallest = int(fleet.column("memory").min())
    fitting = [
        cost
        for cost in (student_cost(name, input_shape, partition_size) for name in candidates)
        if cost.memory_bytes <= smallest and cost.params >= min_params_per_filter * partition_size
    ]
    if not fitting:
        raise _nothing_fits(
            fleet,
            list(range(len(fleet))),
            partition_size=partition_size,
            costs=[student_cost(name, input_shape, partition_size) for name in candidates],
            min_params_per_filter=min_params_per_filter,
        )
    return max(fitting, key=lambda cost: (cost.params, -cost.macs, cost.arch))


def match(
    fleet: Fleet,
    groups: Sequence[Sequence[int]],
    partition_sizes: Sequence[int],
    candidates: Sequence[str],
    input_shape: InputShape,
    *,
    min_params_per_filter: float = 0.0,
    use_km: bool = True,
    fixed_costs: Sequence[StudentCost] | None = None,
) -> list[tuple[int, Choice]]:
    """Pair every group with a partition (index into ``partition_sizes``) and a student.

    ``use_km=False`` keeps group i on partition i (the baselines' fixed pairing).
    ``fixed_costs`` gives every partition its one possible student (a bundle's). Raises
    PlanningError when some group has no feasible student at all.
    """
    if len(groups) != len(partition_sizes):
        raise ValueError(f"{len(groups)} groups but {len(partition_sizes)} partitions")
    table = GroupTable.build(fleet, groups)
    # Columns of the weight matrix: one per distinct partition size (partitions of one size
    # are interchangeable), or one per partition when each has its own fixed student.
    if fixed_costs is None:
        sizes = sorted({int(size) for size in partition_sizes})
        column_of = np.array([sizes.index(int(size)) for size in partition_sizes])
        costs_of: list[Sequence[StudentCost] | None] = [None] * len(sizes)
    else:
        sizes = [int(size) for size in partition_sizes]
        column_of = np.arange(len(sizes))
        costs_of = [[cost] for cost in fixed_costs]
    choices = [
        choose_students(
            fleet,
            groups,
            size,
            candidates,
            input_shape,
            min_params_per_filter=0.0 if fixed_costs else min_params_per_filter,
            table=table,
            costs=costs,
        )
        for size, costs in zip(sizes, costs_of, strict=True)
    ]

    def failure(group: int, column: int) -> PlanningError:
        costs = costs_of[column] or [
            student_cost(name, input_shape, sizes[column]) for name in candidates
        ]
        return _nothing_fits(
            fleet,
            groups[group],
            partition_size=sizes[column],
            costs=costs,
            min_params_per_filter=min_params_per_filter,
        )

    for group in range(len(groups)):
        if all(column[group] is None for column in choices):
            raise failure(group, int(np.argmax(sizes)))
    weights = np.array([[_weight(column[g]) for column in choices] for g in range(len(groups))])
    pairing = _assign(weights, column_of) if use_km else np.arange(len(groups))
    result: list[tuple[int, Choice]] = []
    for group, partition in enumerate(pairing):
        choice = choices[int(column_of[partition])][group]
        if choice is None:
            raise failure(group, int(column_of[partition]))
        result.append((int(partition), choice))
    return result


def _weight(choice: Choice | None) -> float:
    return -np.inf if choice is None else choice.weight


def _assign(class_weights: FloatArray, column_of: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Max-weight perfect matching; returns the partition index of every group."""
    n_groups, n_classes = class_weights.shape
    if n_groups <= _FULL_MATRIX_LIMIT or n_classes > 2:
        return _kuhn_munkres(class_weights[:, column_of])
    partitions_of = [np.flatnonzero(column_of == c) for c in range(n_classes)]
    if n_classes == 1:
        return partitions_of[0].astype(np.int64)
    # Two sizes: the groups with the largest advantage for class 0 take its slots.
    finite = np.where(np.isfinite(class_weights), class_weights, -1e300)
    advantage = finite[:, 0] - finite[:, 1]
    ranked = np.argsort(-advantage, kind="stable")
    pairing = np.empty(n_groups, dtype=np.int64)
    first = partitions_of[0].size
    pairing[ranked[:first]] = partitions_of[0]
    pairing[ranked[first:]] = partitions_of[1]
    if not np.all(np.isfinite(class_weights[np.arange(n_groups), column_of[pairing]])):
        return _kuhn_munkres(class_weights[:, column_of])
    return pairing


def _kuhn_munkres(weights: FloatArray) -> npt.NDArray[np.int64]:
    # Infeasible pairs get a weight far below any feasible total so they are avoided when
    # any perfect matching of feasible pairs exists.
    finite = np.isfinite(weights)
    floor = (weights[finite].min() if finite.any() else 0.0) - 1.0
    penalty = floor - abs(floor) * weights.shape[0] - 1e6
    matrix = np.where(finite, weights, penalty)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    pairing = np.empty(weights.shape[0], dtype=np.int64)
    pairing[rows] = cols
    return pairing


def _nothing_fits(
    fleet: Fleet,
    members: Sequence[int],
    *,
    partition_size: int,
    costs: Sequence[StudentCost],
    min_params_per_filter: float,
) -> PlanningError:
    devices = tuple(fleet.devices[i].id for i in members)
    smallest = min(fleet.devices[i].memory for i in members)
    leanest = min(costs, key=lambda cost: cost.memory_bytes)
    extra = ""
    if min_params_per_filter > 0:
        extra = (
            f" and has at least {min_params_per_filter:g} parameters per filter "
            f"({min_params_per_filter * partition_size:.0f} for {partition_size} filters)"
        )
    return PlanningError(
        f"constraint (1g) memory: no candidate student fits every device of group "
        f"{list(devices)} (smallest memory {format_bytes(smallest)}){extra}; the leanest "
        f"candidate, {leanest.arch}, needs {format_bytes(leanest.memory_bytes)} "
        f"(fix: add a smaller architecture to --candidates, e.g. wrn-10-0.5, or give these "
        f"devices more memory)",
        constraint="memory",
        devices=devices,
    )
