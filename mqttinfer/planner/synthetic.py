"""Synthetic fleets for experiments, tests and benchmarks (RoCoIn §V-A, Table IV).

Table IV defines heterogeneity levels 0–5 by the *range* over which devices' FLOP/s and
link rates are drawn: 0, 10, 15, 20, 25, 30 MFLOP/s and 0, 100, 200, 300, 400, 500 kbit/s.
The paper does not say where the ranges are centred; we centre them on 20 MFLOP/s and
300 kbit/s (so level 5 spans 5–35 MFLOP/s and 50–550 kbit/s). Memory is the same for every
device (Table IV does not vary it) and large enough for every default candidate. Outage
probabilities are drawn uniformly within ±``outage_spread`` of the mean outage (the paper's
"average success probability" is 1 − mean outage).
"""

from __future__ import annotations

import numpy as np

from mqttinfer.planner.inventory import Device, Fleet

FLOPS_RANGE_M = (0.0, 10.0, 15.0, 20.0, 25.0, 30.0)
RATE_RANGE_KBIT = (0.0, 100.0, 200.0, 300.0, 400.0, 500.0)
FLOPS_CENTRE = 20e6
RATE_CENTRE = 300e3
MEMORY = 64 * 2**20
LEVELS = tuple(range(len(FLOPS_RANGE_M)))


def heterogeneous_fleet(
    n_devices: int,
    level: int,
    rng: np.random.Generator,
    *,
    mean_outage: float = 0.2,
    outage_spread: float = 0.1,
    memory: int = MEMORY,
    prefix: str = "dev",
) -> Fleet:
    """``n_devices`` devices at Table IV heterogeneity ``level`` (0 = identical devices)."""
    if level not in LEVELS:
        raise ValueError(f"heterogeneity level must be one of {list(LEVELS)}; got {level}")
    if n_devices < 1:
        raise ValueError(f"need at least one device; got {n_devices}")
    low = max(0.0, mean_outage - outage_spread)
    high = min(0.99, mean_outage + outage_spread)
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"mean outage {mean_outage} ± {outage_spread} is not a probability range")
    flops = FLOPS_CENTRE + rng.uniform(-0.5, 0.5, n_devices) * FLOPS_RANGE_M[level] * 1e6
    rate = RATE_CENTRE + rng.uniform(-0.5, 0.5, n_devices) * RATE_RANGE_KBIT[level] * 1e3
    outage = rng.uniform(low, high, n_devices)
    width = len(str(n_devices - 1))
    devices = tuple(
        Device(
            id=f"{prefix}-{index:0{width}d}",
            flops=float(round(flops[index], -3)),
            memory=int(memory),
            rate=float(round(rate[index])),
            outage=float(round(outage[index], 4)),
        )
        for index in range(n_devices)
    )
    return Fleet(devices, source=f"<synthetic level {level}>")
