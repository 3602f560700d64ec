"""Planning time for large fleets (not a test): ``.venv/bin/python benchmarks/bench_planner.py``.

Builds Table IV level-5 fleets (mean outage 0.2, ε = 0.05) of 1,000 and 10,000 devices and
times ``make_plan`` for every strategy: grouping, partitioning (contiguous filter ranges;
``--channels`` must exceed the number of groups, so 16,384 here), Kuhn–Munkres matching and
the exact latency prediction. Prints the median of ``--repeat`` runs. Targets: < 1 s for
1,000 devices and < 10 s for 10,000 (docs/planner.md records what was measured).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from mqttinfer.planner.plan import STRATEGIES
from mqttinfer.planner.strategies import PlanRequest, make_plan
from mqttinfer.planner.synthetic import heterogeneous_fleet

TARGET_S = {1_000: 1.0, 10_000: 10.0}


def time_plan(request: PlanRequest, repeat: int) -> tuple[float, float, int]:
    """Median wall and CPU time of ``repeat`` plans, and the number of groups.

    CPU time is reported too because the development machine is shared: wall time grows with
    other people's load, this process's CPU time much less.
    """
    walls, cpus = [], []
    groups = 0
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        plan = make_plan(request)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        groups = len(plan.groups)
    return statistics.median(walls), statistics.median(cpus), groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels", type=int, default=16_384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {os.cpu_count()} CPUs, load average {load:.2f} at start")
    print(
        f"{'devices':>8} {'strategy':>9} {'groups':>7} {'wall s':>8} {'cpu s':>8} {'target s':>9}"
    )
    for count in args.devices:
        fleet = heterogeneous_fleet(count, 5, np.random.default_rng(args.seed))
        for strategy in args.strategies:
            request = PlanRequest(fleet, strategy, 0.05, channels=args.channels)
            wall, cpu, groups = time_plan(request, args.repeat)
            target = TARGET_S.get(count)
            shown = f"{target:9.1f}" if target else f"{'-':>9}"
            print(f"{count:>8} {strategy:>9} {groups:>7} {wall:>8.3f} {cpu:>8.3f} {shown}")


if __name__ == "__main__":
    main()
