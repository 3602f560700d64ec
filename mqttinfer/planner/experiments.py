"""Reproductions of RoCoIn's planner figures under our latency model.

- :func:`fig7`: predicted latency of the four strategies against the heterogeneity levels of
  Table IV (N = 20 devices, several random fleets per level).
- :func:`fig3`: RoCoIn's predicted latency against the devices' average success probability,
  one curve per threshold ε (Fig. 3(a)).

Each writes ``<name>.csv`` and ``<name>.png`` into a folder. The numbers are predictions of
the planner's analytic model (:mod:`mqttinfer.planner.latency`), not measurements; see
docs/planner.md for how they compare with the paper. matplotlib is imported only when a PNG is
drawn (it is in the ``plots`` and ``dev`` extras).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mqttinfer.errors import DependencyError, PlanningError
from mqttinfer.planner.plan import STRATEGIES
from mqttinfer.planner.strategies import PlanRequest, make_plan
from mqttinfer.planner.synthetic import LEVELS, heterogeneous_fleet

log = logging.getLogger(__name__)

FIG7_DEVICES = 20
FIG7_EPSILON = 0.05
FIG_CHANNELS = 256  # WRN-16-4 teacher (RoCoIn's CIFAR-10 teacher): 64·4 final-conv filters
FIG3_EPSILONS = (0.01, 0.05, 0.1, 0.2)
FIG3_SUCCESS = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
FIG3_LEVEL = 3
# ρ for the coupled variant of Fig. 3: RoCoIn's Table II has WRN-22-1 (0.27 M parameters)
# students on ≈ 26-filter partitions and NoNN WRN-16-1 (0.18 M) on ≈ 13, about 10 k each.
FIG3_COUPLED_PARAMS_PER_FILTER = 10_000.0


@dataclass(frozen=True, slots=True)
class Row:
    """One point of a figure: the mean over ``draws`` random fleets."""

    figure: str
    strategy: str
    level: int
    mean_success: float
    epsilon: float
    params_per_filter: float
    draws: int
    feasible_draws: int
    mean_latency_s: float
    std_latency_s: float
    mean_completion_probability: float
    mean_groups: float


def fig7(*, draws: int = 30, seed: int = 0, devices: int = FIG7_DEVICES) -> list[Row]:
    """Latency vs heterogeneity level (Table IV) for rocoin, rocoin-g, nonn and hetnonn."""
    rng = np.random.default_rng(seed)
    rows = []
    for level in LEVELS:
        fleets = [heterogeneous_fleet(devices, level, rng) for _ in range(draws)]
        for strategy in STRATEGIES:
            plans = [_try_plan(fleet, strategy, FIG7_EPSILON) for fleet in fleets]
            rows.append(
                _row(
                    "fig7",
                    strategy,
                    level=level,
                    success=0.8,
                    epsilon=FIG7_EPSILON,
                    rho=0.0,
                    plans=plans,
                )
            )
    return rows


def fig3(
    *,
    draws: int = 30,
    seed: int = 0,
    devices: int = FIG7_DEVICES,
    epsilons: Sequence[float] = FIG3_EPSILONS,
    successes: Sequence[float] = FIG3_SUCCESS,
    params_per_filter: Sequence[float] = (0.0, FIG3_COUPLED_PARAMS_PER_FILTER),
) -> list[Row]:
    """RoCoIn's latency vs average success probability, one series per ε and ρ.

    ρ = 0 is eq. (5) as written (student choice independent of partition size); ρ > 0 makes
    students scale with their partitions (:func:`~mqttinfer.planner.assignment.accuracy_proxy`).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for success in successes:
        fleets = [
            heterogeneous_fleet(devices, FIG3_LEVEL, rng, mean_outage=1.0 - success)
            for _ in range(draws)
        ]
        for rho in params_per_filter:
            for epsilon in epsilons:
                plans = [_try_plan(fleet, "rocoin", epsilon, rho) for fleet in fleets]
                rows.append(
                    _row(
                        "fig3",
                        "rocoin",
                        level=FIG3_LEVEL,
                        success=success,
                        epsilon=epsilon,
                        rho=rho,
                        plans=plans,
                    )
                )
    return rows


def _try_plan(
    fleet: Any, strategy: str, epsilon: float, params_per_filter: float = 0.0
) -> tuple[float, float, int] | None:
    request = PlanRequest(
        fleet, strategy, epsilon, channels=FIG_CHANNELS, min_params_per_filter=params_per_filter
    )
    try:
        plan = make_plan(request)
    except PlanningError as err:
        log.debug("%s infeasible: %s", strategy, err)
        return None
    predicted = plan.predicted
    return predicted.latency_s, predicted.completion_probability, len(plan.groups)


def _row(
    figure: str,
    strategy: str,
    *,
    level: int,
    success: float,
    epsilon: float,
    rho: float,
    plans: Sequence[tuple[float, float, int] | None],
) -> Row:
    feasible = np.array([plan for plan in plans if plan is not None], dtype=np.float64)
    if feasible.size == 0:
        nan = math.nan
        return Row(
            figure, strategy, level, success, epsilon, rho, len(plans), 0, nan, nan, nan, nan
        )
    return Row(
        figure,
        strategy,
        level,
        success,
        epsilon,
        rho,
        len(plans),
        int(feasible.shape[0]),
        float(feasible[:, 0].mean()),
        float(feasible[:, 0].std()),
        float(feasible[:, 1].mean()),
        float(feasible[:, 2].mean()),
    )


# --------------------------------------------------------------------------- output


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in asdict(row).items()})


def _csv_value(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise DependencyError(
            "drawing figures needs matplotlib (fix: pip install 'mqttinfer[plots]' or "
            ".venv/bin/pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fig7(rows: Sequence[Row], path: str | Path) -> None:
    plt = _pyplot()
    figure, (latency_ax, completion_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy in STRATEGIES:
        series = [row for row in rows if row.strategy == strategy]
        levels = [row.level for row in series]
        latency_ax.plot(levels, [r.mean_latency_s for r in series], marker="o", label=strategy)
        completion_ax.plot(
            levels, [r.mean_completion_probability for r in series], marker="o", label=strategy
        )
    latency_ax.set(
        xlabel="heterogeneity level (Table IV)",
        ylabel="expected latency of a completed frame (s)",
        title=f"Fig. 7: N = {FIG7_DEVICES}, ε = {FIG7_EPSILON}",
    )
    completion_ax.set(
        xlabel="heterogeneity level (Table IV)",
        ylabel="P(frame complete)",
        title="completion probability",
        yscale="log",
    )
    for axis in (latency_ax, completion_ax):
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_fig3(rows: Sequence[Row], path: str | Path) -> None:
    plt = _pyplot()
    rhos = sorted({row.params_per_filter for row in rows})
    figure, axes = plt.subplots(1, len(rhos) + 1, figsize=(5 * (len(rhos) + 1), 4))
    completion_ax = axes[-1]
    for rho, latency_ax in zip(rhos, axes, strict=False):
        for epsilon in sorted({row.epsilon for row in rows}):
            series = [r for r in rows if r.epsilon == epsilon and r.params_per_filter == rho]
            success = [r.mean_success for r in series]
            latency_ax.plot(
                success, [r.mean_latency_s for r in series], marker="o", label=f"ε = {epsilon:g}"
            )
            if rho == rhos[0]:
                completion_ax.plot(
                    success,
                    [r.mean_completion_probability for r in series],
                    marker="o",
                    label=f"ε = {epsilon:g}",
                )
        title = "eq. (5) as written" if rho == 0 else f"students scale with |P| (ρ = {rho:g})"
        latency_ax.set(
            xlabel="average success probability (1 − mean outage)",
            ylabel="expected latency of a completed frame (s)",
            title=f"Fig. 3(a), RoCoIn: {title}",
        )
    completion_ax.set(
        xlabel="average success probability",
        ylabel="P(frame complete)",
        title="completion probability",
    )
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_experiment(name: str, out_dir: str | Path, draws: int = 30, seed: int = 0) -> list[Path]:
    """Compute figure ``name`` (fig7 or fig3), write its CSV and PNG, return their paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if name == "fig7":
        rows = fig7(draws=draws, seed=seed)
        plot = plot_fig7
    elif name == "fig3":
        rows = fig3(draws=draws, seed=seed)
        plot = plot_fig3
    else:
        raise ValueError(f"unknown experiment {name!r}; use fig7 or fig3")
    csv_path, png_path = folder / f"{name}.csv", folder / f"{name}.png"
    write_csv(rows, csv_path)
    plot(rows, png_path)
    return [csv_path, png_path]
