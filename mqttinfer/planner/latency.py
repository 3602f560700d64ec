"""The latency model shared by planning, prediction and simulation.

A device d running student s for a partition of |P| filters answers a frame after

    t(d) = FLOPS_PER_MAC · MACs(s) / flops(d)  +  8 · (2·|P| + ENVELOPE_OVERHEAD_BYTES) / rate(d)

seconds: compute, then the pooled fp16 partial (2 bytes per filter plus the msgpack envelope)
over its uplink. The frame broadcast and the aggregator's FC head are the same for every
strategy and are left out, as in RoCoIn's problem (1).

Each device independently loses a frame's result with its outage probability. The aggregator
fires as soon as one result per partition is in, so a group answers at the time of its
fastest *live* member, and a frame completes when every group has a live member. For groups
g with members (t, p):

    P(group g answered by time x) = 1 − Π_{members with t ≤ x} p
    P(frame complete by time x)   = Π_g (1 − Π_{t ≤ x} p)

which gives the completion probability (x → ∞) and the expected latency of a completed frame
exactly, in O(n log n) for n devices (:func:`frame_prediction`). The Monte-Carlo simulator
draws the same model and must agree with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# A multiply-accumulate is two floating-point operations; inventories give FLOP/s.
FLOPS_PER_MAC = 2.0
# Bytes per pooled feature (fp16) and the envelope around them (ids, timestamps, msgpack).
BYTES_PER_FEATURE = 2
ENVELOPE_OVERHEAD_BYTES = 64


def output_bytes(partition_size: int) -> int:
    """Bytes of one partial result for a partition of ``partition_size`` filters."""
    return BYTES_PER_FEATURE * partition_size + ENVELOPE_OVERHEAD_BYTES


def device_latency(macs: float, partition_size: int, flops: float, rate: float) -> float:
    """Seconds from frame to partial result on one device (compute + uplink)."""
    return FLOPS_PER_MAC * macs / flops + 8.0 * output_bytes(partition_size) / rate


def device_latencies(
    macs: float,
    partition_size: int,
    flops: npt.NDArray[np.float64],
    rate: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """:func:`device_latency` for arrays of devices."""
    result: npt.NDArray[np.float64] = FLOPS_PER_MAC * macs / flops + (
        8.0 * output_bytes(partition_size) / rate
    )
    return result


@dataclass(frozen=True, slots=True)
class FramePrediction:
    """What the latency model predicts for one frame under random device failures."""

    latency_s: float  # expected latency of a completed frame
    all_up_latency_s: float  # latency when no device fails (fastest member of each group)
    worst_case_latency_s: float  # slowest member of the slowest group
    completion_probability: float  # probability that every partition gets a result


def frame_prediction(
    latencies: Sequence[Sequence[float]], outages: Sequence[Sequence[float]]
) -> FramePrediction:
    """Exact prediction for groups of (latency, outage) members; see the module docstring."""
    if not latencies or any(len(group) == 0 for group in latencies):
        raise ValueError("every group needs at least one member")
    if [len(group) for group in latencies] != [len(group) for group in outages]:
        raise ValueError("latencies and outages must have the same shape")
    if any(not 0.0 <= float(p) < 1.0 for group in outages for p in group):
        raise ValueError("outage probabilities must lie in [0, 1)")
    all_up = max(min(group) for group in latencies)
    worst = max(max(group) for group in latencies)
    events = sorted(
        (float(time), index, float(prob))
        for index, (times, probs) in enumerate(zip(latencies, outages, strict=True))
        for time, prob in zip(times, probs, strict=True)
    )
    failing = np.ones(len(latencies))  # Π p over the members already answered, per group
    seen = np.zeros(len(latencies), dtype=bool)
    unseen = len(latencies)  # groups none of whose members can have answered yet
    log_cdf = 0.0  # Σ_g log(1 − failing_g) over the groups already seen
    previous_cdf = 0.0
    expected = 0.0
    for time, group, prob in events:
        if seen[group]:
            log_cdf -= math.log1p(-failing[group])
        else:
            seen[group] = True
            unseen -= 1
        failing[group] *= prob
        log_cdf += math.log1p(-failing[group])
        cdf = 0.0 if unseen else math.exp(log_cdf)
        expected += time * (cdf - previous_cdf)
        previous_cdf = cdf
    completion = previous_cdf
    latency = expected / completion if completion > 0 else math.inf
    return FramePrediction(latency, float(all_up), float(worst), completion)
