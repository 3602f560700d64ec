"""Planning strategies behind one interface: ``make_plan(PlanRequest) -> Plan``.

==========  ===========================  ============================  =====================
strategy    device groups                partitions (K = groups)       students
==========  ===========================  ============================  =====================
rocoin      follow-the-leader (ε, δ)     equal sizes: balanced Ncut    eq. (5) per group,
                                         (or contiguous ranges)        Kuhn–Munkres pairing
rocoin-g    consecutive devices (ε)      as rocoin                     as rocoin
nonn        one device each              equal: Louvain merged into K  one type for all: the
                                         (or contiguous ranges)        largest fitting every
                                                                       device
hetnonn     one device each              ∝ device FLOP/s: sized Ncut   eq. (5) per device
                                         (or contiguous ranges)
==========  ===========================  ============================  =====================

With an activation matrix (N×C) the partitions come from the filter activation network
(:mod:`mqttinfer.partition`); without, from contiguous filter ranges of ``channels`` filters.
With a bundle (:mod:`mqttinfer.planner.bundle_source`) its partitions, students and input
shape are fixed: devices are grouped into exactly as many groups as it has partitions (nonn and
hetnonn need one device per partition) and groups are matched to partitions by eq. (5).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from mqttinfer import partition as partition_lib
from mqttinfer.errors import PlanningError
from mqttinfer.planner.assignment import Choice, largest_common_student, match
from mqttinfer.planner.bundle_source import BundleSpec
from mqttinfer.planner.catalog import (
    DEFAULT_CANDIDATES,
    DEFAULT_INPUT_SHAPE,
    InputShape,
    StudentCost,
    student_cost,
)
from mqttinfer.planner.grouping import (
    DEFAULT_DELTA,
    Grouping,
    check_epsilon,
    fit_group_count,
    follow_the_leader,
    heuristic_groups,
    singleton_groups,
)
from mqttinfer.planner.inventory import Fleet
from mqttinfer.planner.latency import device_latency
from mqttinfer.planner.plan import GroupPlan, Member, Plan, Student, check_plan

log = logging.getLogger(__name__)

IdArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PlanRequest:
    """Everything a strategy needs. Give either ``activations`` (N×C) or ``channels``."""

    fleet: Fleet
    strategy: str = "rocoin"
    epsilon: float = 0.05
    delta: float = DEFAULT_DELTA
    channels: int | None = None
    activations: npt.NDArray[np.floating] | None = None
    activations_path: str | None = None
    rule: partition_lib.Rule = "ah"
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    input_shape: InputShape = DEFAULT_INPUT_SHAPE
    name: str = "plan"
    deployment: str = "default"
    bundle: str | None = None
    min_params_per_filter: float = 0.0
    min_replicas: int = 1
    strict: bool = False
    seed: int = 0
    weights: npt.NDArray[np.float64] | None = field(default=None, repr=False)
    bundle_spec: BundleSpec | None = field(default=None, repr=False)

    @property
    def shape(self) -> InputShape:
        return self.bundle_spec.input_shape if self.bundle_spec else self.input_shape

    @property
    def n_filters(self) -> int:
        if self.bundle_spec is not None:
            return self.bundle_spec.channels
        if self.activations is not None:
            return int(np.asarray(self.activations).shape[1])
        if self.channels is None:
            raise PlanningError(
                "the number of filters is unknown: give an activation matrix or the channel "
                "count (fix: --activations acts.npy or --channels C)",
                constraint="channels",
            )
        return int(self.channels)


Strategy = Callable[[PlanRequest], Plan]


def make_plan(request: PlanRequest) -> Plan:
    """Run the request's strategy and return a validated plan."""
    strategy = STRATEGIES.get(request.strategy)
    if strategy is None:
        raise PlanningError(
            f"unknown strategy {request.strategy!r} (fix: use one of {', '.join(STRATEGIES)})",
            constraint="strategy",
        )
    check_epsilon(request.epsilon)
    if request.bundle_spec is not None and request.activations is not None:
        raise PlanningError(
            "a bundle fixes the partitions, so activations cannot be used with it "
            "(fix: drop --activations or --bundle)",
            constraint="partitions",
        )
    if request.channels is not None and request.activations is not None:
        columns = int(np.asarray(request.activations).shape[1])
        if columns != request.channels:
            raise PlanningError(
                f"--channels {request.channels} disagrees with the activation matrix's "
                f"{columns} columns (fix: drop --channels or pass the matching activations)",
                constraint="channels",
            )
    plan = strategy(request)
    check_plan(plan, source=f"<{request.strategy} plan>")  # the strategies' own invariants
    log.info(
        "%s: %d groups over %d devices, predicted latency %.4g s, completion %.4g",
        request.strategy,
        len(plan.groups),
        len(request.fleet),
        plan.predicted.latency_s,
        plan.predicted.completion_probability,
    )
    return plan


# --------------------------------------------------------------------------- strategies


def plan_rocoin(request: PlanRequest) -> Plan:
    grouping = follow_the_leader(
        request.fleet,
        request.epsilon,
        request.delta,
        strict=request.strict,
        min_replicas=request.min_replicas,
    )
    return _replicated_plan(request, grouping)


def plan_rocoin_g(request: PlanRequest) -> Plan:
    grouping = heuristic_groups(request.fleet, request.epsilon, min_replicas=request.min_replicas)
    return _replicated_plan(request, grouping)


def _replicated_plan(request: PlanRequest, grouping: Grouping) -> Plan:
    spec = request.bundle_spec
    if spec is not None:
        grouping = fit_group_count(
            request.fleet,
            grouping,
            len(spec.partitions),
            request.epsilon,
            min_replicas=request.min_replicas,
        )
    k = len(grouping.groups)
    _check_group_count(request, k)
    if spec is not None:
        parts: list[IdArray] = list(spec.partitions)
        method = "bundle"
    elif request.activations is not None:
        parts = partition_lib.normalized_cut(_weights(request), k, request.seed, balance=True)
        method = "normalized-cut"
    else:
        parts = _contiguous(request.n_filters, [1.0] * k)
        method = "contiguous"
    pairs = match(
        request.fleet,
        grouping.groups,
        [part.size for part in parts],
        request.candidates,
        request.shape,
        min_params_per_filter=request.min_params_per_filter,
        fixed_costs=spec.students if spec else None,
    )
    return _build(request, grouping, parts, pairs, method)


def _contiguous(n_filters: int, shares: Sequence[float]) -> list[IdArray]:
    sizes = partition_lib.proportional_sizes(n_filters, shares)
    return partition_lib.contiguous_partitions(n_filters, sizes)


def plan_nonn(request: PlanRequest) -> Plan:
    grouping = singleton_groups(request.fleet)
    k = len(grouping.groups)
    _check_group_count(request, k)
    spec = request.bundle_spec
    if spec is not None:
        _check_bundle_devices(request, spec)
        parts: list[IdArray] = list(spec.partitions)
        pairs = match(
            request.fleet,
            grouping.groups,
            [part.size for part in parts],
            request.candidates,
            request.shape,
            fixed_costs=spec.students,
        )
        return _build(request, grouping, parts, pairs, "bundle")
    if request.activations is not None:
        weights = _weights(request)
        communities = partition_lib.louvain_communities(weights, seed=request.seed)
        parts = partition_lib.merge_into_k(communities, k, weights)
        method = "louvain"
    else:
        parts = _contiguous(request.n_filters, [1.0] * k)
        method = "contiguous"
    student = largest_common_student(
        request.fleet,
        max(part.size for part in parts),
        request.candidates,
        request.shape,
        min_params_per_filter=request.min_params_per_filter,
    )
    pairs = [(index, _fixed_choice(student)) for index in range(k)]
    return _build(request, grouping, parts, pairs, method)


def plan_hetnonn(request: PlanRequest) -> Plan:
    grouping = singleton_groups(request.fleet)
    k = len(grouping.groups)
    _check_group_count(request, k)
    spec = request.bundle_spec
    flops = request.fleet.column("flops")
    if spec is not None:
        _check_bundle_devices(request, spec)
        # The bundle fixes the partitions; the fastest devices take the largest ones.
        parts: list[IdArray] = list(spec.partitions)
        by_size = sorted(range(k), key=lambda i: (-parts[i].size, i))
        by_speed = sorted(range(k), key=lambda i: (-flops[i], i))
        order = [0] * k
        for device, partition in zip(by_speed, by_size, strict=True):
            order[device] = partition
        parts = [parts[order[device]] for device in range(k)]
        costs = [spec.students[order[device]] for device in range(k)]
        pairs = match(
            request.fleet,
            grouping.groups,
            [part.size for part in parts],
            request.candidates,
            request.shape,
            use_km=False,
            fixed_costs=costs,
        )
        return _build(request, grouping, parts, pairs, "bundle")
    sizes = partition_lib.proportional_sizes(request.n_filters, list(flops))
    if request.activations is not None:
        cut = partition_lib.normalized_cut(_weights(request), k, request.seed, sizes=sizes)
        parts = _order_by_wanted_sizes(cut, sizes)
        method = "normalized-cut"
    else:
        parts = partition_lib.contiguous_partitions(request.n_filters, sizes)
        method = "proportional"
    pairs = match(
        request.fleet,
        grouping.groups,
        [part.size for part in parts],
        request.candidates,
        request.shape,
        min_params_per_filter=request.min_params_per_filter,
        use_km=False,
    )
    return _build(request, grouping, parts, pairs, method)


def _check_bundle_devices(request: PlanRequest, spec: BundleSpec) -> None:
    if len(request.fleet) != len(spec.partitions):
        raise PlanningError(
            f"{request.strategy} runs one device per partition, but the bundle has "
            f"{len(spec.partitions)} partitions and the fleet {len(request.fleet)} devices "
            "(fix: use rocoin, which groups devices, or a bundle trained with "
            f"--k {len(request.fleet)})",
            constraint="partitions",
            devices=request.fleet.ids,
        )


STRATEGIES: dict[str, Strategy] = {
    "rocoin": plan_rocoin,
    "rocoin-g": plan_rocoin_g,
    "nonn": plan_nonn,
    "hetnonn": plan_hetnonn,
}


# --------------------------------------------------------------------------- helpers


def _check_group_count(request: PlanRequest, k: int) -> None:
    if k > request.n_filters:
        raise PlanningError(
            f"{k} device groups need {k} partitions but the teacher has only "
            f"{request.n_filters} filters (fix: raise ε or use rocoin so devices share "
            "partitions, plan for fewer devices, or use a teacher with more filters)",
            constraint="partitions",
            devices=request.fleet.ids,
        )


def _weights(request: PlanRequest) -> npt.NDArray[np.float64]:
    if request.weights is not None:
        return request.weights
    assert request.activations is not None
    return partition_lib.activation_network(request.activations, request.rule)


def _order_by_wanted_sizes(parts: Sequence[IdArray], sizes: Sequence[int]) -> list[IdArray]:
    """Give part i the size sizes[i]: the sized cut returns parts ordered by smallest id."""
    pool = sorted(parts, key=lambda part: (part.size, int(part[0])))
    ranked = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    ordered: list[IdArray] = [np.zeros(0, dtype=np.int64)] * len(sizes)
    for index, part in zip(ranked, pool, strict=True):
        ordered[index] = part
    return ordered


def _fixed_choice(cost: StudentCost) -> Choice:
    return Choice(cost, weight=0.0, delay_s=0.0)


def _build(
    request: PlanRequest,
    grouping: Grouping,
    parts: Sequence[IdArray],
    pairs: Sequence[tuple[int, Choice]],
    method: str,
) -> Plan:
    fleet = request.fleet
    # Partitions are numbered in filter order; group ids follow their partition.
    numbering = sorted(range(len(parts)), key=lambda i: int(parts[i][0]))
    number_of = {original: new for new, original in enumerate(numbering)}
    groups: list[GroupPlan] = []
    for members, (partition, choice) in zip(grouping.groups, pairs, strict=True):
        filters = parts[partition]
        cost = choice.cost
        if cost.output_channels != filters.size:
            # NoNN's one architecture costs slightly more or less at another output width.
            cost = student_cost(cost.arch, request.shape, int(filters.size))
        number = number_of[partition]
        groups.append(
            GroupPlan(
                id=f"g{number}",
                partition=number,
                filters=tuple(int(f) for f in filters),
                student=Student(cost.arch, cost.params, cost.macs, cost.memory_bytes),
                members=tuple(
                    Member(
                        fleet.devices[i].id,
                        fleet.devices[i].outage,
                        device_latency(
                            cost.macs, filters.size, fleet.devices[i].flops, fleet.devices[i].rate
                        ),
                    )
                    for i in members
                ),
            )
        )
    groups.sort(key=lambda group: group.partition)
    return Plan(
        name=request.name,
        strategy=request.strategy,
        epsilon=request.epsilon,
        delta=request.delta if request.strategy == "rocoin" else None,
        channels=request.n_filters,
        input_shape=request.shape,
        groups=tuple(groups),
        deployment=request.deployment,
        partitioning=method,
        activations=request.activations_path,
        bundle=request.bundle_spec.path if request.bundle_spec else request.bundle,
        dropped_filters=request.bundle_spec.dropped_filters if request.bundle_spec else (),
        notes=grouping.notes,
    )
