"""Monte-Carlo simulation of a plan under random device failures.

Per simulated frame every device independently fails (its result never arrives) with its
outage probability; every other device answers after its planned latency
(:mod:`mqttinfer.planner.latency`). A partition is answered by its fastest live replica and
the frame completes when every partition is answered. The exact prediction in the plan and
this simulation draw the same model, so they agree up to sampling error — a check of both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mqttinfer.planner.latency import FramePrediction
from mqttinfer.planner.plan import Plan

# Random draws per chunk (trials × devices), to bound memory on large plans.
_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """What ``trials`` simulated frames looked like."""

    trials: int
    seed: int
    completion_rate: float
    mean_latency_s: float  # over completed frames (nan when none completed)
    p50_latency_s: float
    p99_latency_s: float
    partition_availability: dict[str, float]  # group id → fraction of frames it answered
    predicted: FramePrediction


def simulate_plan(plan: Plan, trials: int = 10_000, seed: int = 0) -> SimulationResult:
    """Simulate ``trials`` frames with a seeded ``numpy.random.Generator``."""
    if trials < 1:
        raise ValueError(f"trials must be at least 1; got {trials}")
    rng = np.random.default_rng(seed)
    latency = np.array([m.latency_s for g in plan.groups for m in g.members])
    outage = np.array([m.outage for g in plan.groups for m in g.members])
    sizes = [len(g.members) for g in plan.groups]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    frames: list[npt.NDArray[np.float64]] = []
    answered = np.zeros(len(plan.groups))
    chunk = max(1, _CHUNK_ELEMENTS // latency.size)
    for begin in range(0, trials, chunk):
        count = min(chunk, trials - begin)
        alive = rng.random((count, latency.size)) >= outage
        times = np.where(alive, latency, np.inf)
        per_group = np.minimum.reduceat(times, starts, axis=1)
        answered += np.isfinite(per_group).sum(axis=0)
        frames.append(per_group.max(axis=1))
    frame = np.concatenate(frames)
    completed = frame[np.isfinite(frame)]
    return SimulationResult(
        trials=trials,
        seed=seed,
        completion_rate=completed.size / trials,
        mean_latency_s=float(completed.mean()) if completed.size else math.nan,
        p50_latency_s=_quantile(completed, 0.5),
        p99_latency_s=_quantile(completed, 0.99),
        partition_availability={
            group.id: float(answered[index] / trials) for index, group in enumerate(plan.groups)
        },
        predicted=plan.predicted,
    )


def _quantile(values: npt.NDArray[np.float64], q: float) -> float:
    return float(np.quantile(values, q)) if values.size else math.nan


def single_points_of_failure(plan: Plan) -> list[str]:
    """Devices whose failure alone leaves some partition with no live replica."""
    return [group.members[0].device for group in plan.groups if len(group.members) == 1]


def survives_single_failures(plan: Plan) -> bool:
    """True when every partition keeps a live replica whichever single device fails."""
    return not single_points_of_failure(plan)
