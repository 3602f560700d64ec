"""Device grouping: which devices replicate the same student (RoCoIn §IV-B.1, Algorithm 1).

A group's cumulative failure probability is the product of its members' outage
probabilities: the chance that *every* replica loses a frame. RoCoIn's constraint (1f) asks
for it to be ≤ ε for every group.

:func:`follow_the_leader` is RoCoIn's modified follow-the-leader clustering on the capacity
similarity distance (eq. (2): Euclidean distance between devices' normalised FLOP/s, memory
and rate). A leader opens a group; the unassigned device nearest to the group's centroid joins
while it is within δ of the centroid and the group is still not reliable enough (failure
probability > ε); the centroid is recomputed after each admission. Devices that fit no group
open a new one. Deviations from the paper, and why:

- The paper picks leaders at random; we take the slowest unassigned device (lowest FLOP/s,
  then rate, memory, id), so plans are reproducible and the slowest devices — the latency
  bottleneck — get the first pick of similar partners.
- The paper says nothing about groups that end below the reliability target because no
  similar device is left. We repair them (unless ``strict``): each such group is merged into
  the group with the nearest centroid, which only lowers that group's failure probability.
  Short groups are merged with each other first (nearest first), then into the nearest
  reliable group. Merges are logged and returned as notes. If even the whole fleet in one
  group misses ε, or ``strict`` is set, :class:`~mqttinfer.errors.PlanningError` names the
  constraint and the devices.
- ``min_replicas`` (default 1, i.e. off) additionally keeps admitting until a group has that
  many members — ``2`` guarantees every partition survives any single-device failure even when
  some device's outage probability alone is below ε.

:func:`heuristic_groups` is the RoCoIn-G baseline: consecutive devices in inventory order until
the group is reliable, ignoring capacity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mqttinfer.errors import PlanningError
from mqttinfer.planner.inventory import Fleet

log = logging.getLogger(__name__)

DEFAULT_DELTA = 0.3
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Grouping:
    """Device groups (tuples of indices into the fleet) and what the grouping had to repair."""

    groups: tuple[tuple[int, ...], ...]
    notes: tuple[str, ...] = ()


def failure_probability(outages: Sequence[float] | FloatArray) -> float:
    """Probability that every member loses the frame: the product of outage probabilities."""
    return float(np.prod(np.asarray(outages, dtype=np.float64)))


def capacity_features(fleet: Fleet) -> FloatArray:
    """n×3 matrix of FLOP/s, memory and rate, each min-max scaled to [0, 1] over the fleet."""
    raw = np.stack([fleet.column("flops"), fleet.column("memory"), fleet.column("rate")], axis=1)
    low, high = raw.min(axis=0), raw.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    scaled: FloatArray = (raw - low) / span
    return scaled


def check_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float)) and 0.0 < epsilon < 1.0):
        raise PlanningError(
            f"ε = {epsilon!r} is not a probability in (0, 1); the cumulative failure "
            "probability threshold must be, e.g. 0.05",
            constraint="epsilon",
        )


def follow_the_leader(
    fleet: Fleet,
    epsilon: float,
    delta: float = DEFAULT_DELTA,
    *,
    strict: bool = False,
    min_replicas: int = 1,
) -> Grouping:
    """Group similar devices until each group's failure probability is ≤ ``epsilon``."""
    check_epsilon(epsilon)
    if not (math.isfinite(delta) and delta >= 0.0):
        raise PlanningError(f"δ = {delta!r} must be a non-negative distance", constraint="delta")
    features = capacity_features(fleet)
    outages = fleet.column("outage")
    pool = _Pool(features)
    groups: list[list[int]] = []
    for leader in _leader_order(fleet):
        if not pool.contains(leader):
            continue
        pool.remove(leader)
        members = [leader]
        centroid = features[leader].copy()
        failing = float(outages[leader])
        while (failing > epsilon or len(members) < min_replicas) and pool.size:
            chosen, distance = pool.nearest(centroid)
            if distance > delta:
                break
            pool.remove(chosen)
            members.append(chosen)
            failing *= float(outages[chosen])
            centroid = features[members].mean(axis=0)
        groups.append(members)
    return _repair(fleet, groups, features, epsilon, min_replicas, strict=strict)


class _Pool:
    """Unassigned devices in a compact array, so each nearest-device query is one O(n)
    vectorised pass and a removal is O(1) (swap with the last)."""

    def __init__(self, features: FloatArray) -> None:
        self.features = features.copy()
        self.ids = np.arange(features.shape[0])
        self.position = np.arange(features.shape[0])
        self.size = features.shape[0]

    def contains(self, device: int) -> bool:
        return bool(self.position[device] < self.size)

    def nearest(self, point: FloatArray) -> tuple[int, float]:
        squared = ((self.features[: self.size] - point) ** 2).sum(axis=1)
        index = int(np.argmin(squared))
        return int(self.ids[index]), math.sqrt(float(squared[index]))

    def remove(self, device: int) -> None:
        index, last = int(self.position[device]), self.size - 1
        moved = int(self.ids[last])
        self.ids[index], self.ids[last] = moved, device
        self.features[[index, last]] = self.features[[last, index]]
        self.position[moved], self.position[device] = index, last
        self.size -= 1


def _leader_order(fleet: Fleet) -> list[int]:
    keys = [(d.flops, d.rate, d.memory, d.id) for d in fleet.devices]
    return sorted(range(len(fleet)), key=lambda index: keys[index])


def _is_short(
    members: Sequence[int], outages: FloatArray, epsilon: float, min_replicas: int
) -> bool:
    return failure_probability(outages[list(members)]) > epsilon or len(members) < min_replicas


def _repair(
    fleet: Fleet,
    groups: list[list[int]],
    features: FloatArray,
    epsilon: float,
    min_replicas: int,
    *,
    strict: bool,
) -> Grouping:
    outages = fleet.column("outage")
    short = [g for g in groups if _is_short(g, outages, epsilon, min_replicas)]
    if short and strict:
        raise _unreliable_error(fleet, short, epsilon, min_replicas, strict=True)
    notes: list[str] = []
    while len(groups) > 1:
        index = next(
            (i for i, g in enumerate(groups) if _is_short(g, outages, epsilon, min_replicas)),
            None,
        )
        if index is None:
            break
        weak = groups.pop(index)
        target = _merge_target(
            groups,
            weak,
            features=features,
            outages=outages,
            epsilon=epsilon,
            min_replicas=min_replicas,
        )
        note = (
            f"merged {_ids(fleet, weak)} (failure probability "
            f"{failure_probability(outages[weak]):.3g} > ε = {epsilon:g}) into the nearest "
            f"group {_ids(fleet, groups[target])}"
        )
        log.info("grouping: %s", note)
        notes.append(note)
        groups[target] = groups[target] + weak
    if _is_short(groups[0], outages, epsilon, min_replicas) and len(groups) == 1:
        raise _unreliable_error(fleet, groups, epsilon, min_replicas, strict=False)
    ordered = sorted((tuple(sorted(g)) for g in groups), key=lambda g: g[0])
    return Grouping(tuple(ordered), tuple(notes))


def _merge_target(
    groups: list[list[int]],
    weak: list[int],
    *,
    features: FloatArray,
    outages: FloatArray,
    epsilon: float,
    min_replicas: int,
) -> int:
    """Nearest group by centroid, preferring groups that are short themselves: two leftover
    groups merged often make one reliable group instead of inflating a healthy one."""
    short = [i for i, g in enumerate(groups) if _is_short(g, outages, epsilon, min_replicas)]
    pool = short or list(range(len(groups)))
    centroids = np.stack([features[groups[i]].mean(axis=0) for i in pool])
    distance = np.linalg.norm(centroids - features[weak].mean(axis=0), axis=1)
    return pool[int(np.argmin(distance))]


def _ids(fleet: Fleet, members: Sequence[int]) -> str:
    return "[" + ", ".join(fleet.devices[i].id for i in sorted(members)) + "]"


def _unreliable_error(
    fleet: Fleet,
    groups: Sequence[Sequence[int]],
    epsilon: float,
    min_replicas: int,
    *,
    strict: bool,
) -> PlanningError:
    outages = fleet.column("outage")
    described = "; ".join(
        f"{_ids(fleet, g)} failure probability {failure_probability(outages[list(g)]):.3g}"
        for g in groups
    )
    if strict:
        fix = "raise δ (--delta) so similar-enough devices can join, raise ε, or drop --strict"
    else:
        fix = "raise ε, add devices, or improve the devices' outage probabilities"
    replicas = f" and at least {min_replicas} members" if min_replicas > 1 else ""
    message = (
        f"constraint (1f) violated: these groups cannot reach a cumulative failure probability "
        f"≤ ε = {epsilon:g}{replicas}: {described} (fix: {fix})"
    )
    devices = tuple(fleet.devices[i].id for g in groups for i in g)
    return PlanningError(message, constraint="epsilon", devices=devices)


def heuristic_groups(fleet: Fleet, epsilon: float, *, min_replicas: int = 1) -> Grouping:
    """RoCoIn-G: consecutive devices in inventory order until the group is reliable."""
    check_epsilon(epsilon)
    outages = fleet.column("outage")
    groups: list[list[int]] = []
    current: list[int] = []
    for index in range(len(fleet)):
        current.append(index)
        if not _is_short(current, outages, epsilon, min_replicas):
            groups.append(current)
            current = []
    notes: list[str] = []
    if current:
        if not groups:
            raise _unreliable_error(fleet, [current], epsilon, min_replicas, strict=False)
        notes.append(f"appended the leftover devices {_ids(fleet, current)} to the last group")
        groups[-1] = groups[-1] + current
    return Grouping(tuple(tuple(g) for g in groups), tuple(notes))


def singleton_groups(fleet: Fleet) -> Grouping:
    """NoNN / HetNoNN: every device alone (no replicas)."""
    return Grouping(tuple((index,) for index in range(len(fleet))))


def fit_group_count(
    fleet: Fleet, grouping: Grouping, k: int, epsilon: float, *, min_replicas: int = 1
) -> Grouping:
    """Reshape a grouping into exactly ``k`` groups (a bundle's partition count).

    Too many groups: merge the two with the nearest centroids (merging only lowers failure
    probabilities). Too few: split a group into two halves of similar capacity when both
    halves still meet ε; PlanningError when no group can be split.
    """
    features = capacity_features(fleet)
    outages = fleet.column("outage")
    groups = [list(g) for g in grouping.groups]
    notes = list(grouping.notes)
    while len(groups) > k:
        centroids = np.stack([features[g].mean(axis=0) for g in groups])
        distance = np.linalg.norm(centroids[:, None, :] - centroids[None, :, :], axis=2)
        np.fill_diagonal(distance, np.inf)
        first, second = np.unravel_index(int(np.argmin(distance)), distance.shape)
        notes.append(
            f"merged {_ids(fleet, groups[first])} and {_ids(fleet, groups[second])} to match "
            f"the bundle's {k} partitions"
        )
        groups[first] = groups[first] + groups[second]
        del groups[second]
    while len(groups) < k:
        split = _best_split(groups, features, outages, epsilon, min_replicas)
        if split is None:
            devices = tuple(fleet.ids)
            raise PlanningError(
                f"constraint (1f): the bundle has {k} partitions but these {len(fleet)} devices "
                f"form only {len(groups)} groups with failure probability ≤ ε = {epsilon:g} "
                f"(fix: raise ε, add devices, or train a bundle with --k {len(groups)})",
                constraint="epsilon",
                devices=devices,
            )
        index, left, right = split
        notes.append(
            f"split {_ids(fleet, groups[index])} into {_ids(fleet, left)} and "
            f"{_ids(fleet, right)} to match the bundle's {k} partitions"
        )
        groups[index : index + 1] = [left, right]
    ordered = sorted((tuple(sorted(g)) for g in groups), key=lambda g: g[0])
    return Grouping(tuple(ordered), tuple(notes))


def _best_split(
    groups: list[list[int]],
    features: FloatArray,
    outages: FloatArray,
    epsilon: float,
    min_replicas: int,
) -> tuple[int, list[int], list[int]] | None:
    """The largest group that splits (in capacity order) into two reliable halves."""
    for index in sorted(range(len(groups)), key=lambda i: -len(groups[i])):
        members = sorted(groups[index], key=lambda m: tuple(features[m]))
        for cut in sorted(range(1, len(members)), key=lambda c: abs(2 * c - len(members))):
            left, right = members[:cut], members[cut:]
            if not (
                _is_short(left, outages, epsilon, min_replicas)
                or _is_short(right, outages, epsilon, min_replicas)
            ):
                return index, left, right
    return None
