"""``mqttinfer plan …``: make, show and simulate plans; reproduce the paper's figures.

``app`` (a typer group) is mounted as ``plan`` by ``mqttinfer/cli.py``;
``python -m mqttinfer.planner.cli make ...`` works on its own too. Every error prints one
``error: …`` line naming the file, field and fix, and exits with status 2 — no traceback.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import numpy.typing as npt
import typer

from mqttinfer.errors import ConfigError, MqttInferError
from mqttinfer.planner.bundle_source import BundleSpec, load_bundle_spec
from mqttinfer.planner.catalog import (
    DEFAULT_CANDIDATES,
    DEFAULT_INPUT_SHAPE,
    load_candidates,
    parse_input_shape,
)
from mqttinfer.planner.grouping import DEFAULT_DELTA
from mqttinfer.planner.inventory import load_inventory
from mqttinfer.planner.plan import STRATEGIES, Plan, load_plan, plan_document, save_plan
from mqttinfer.planner.simulate import simulate_plan, single_points_of_failure
from mqttinfer.planner.strategies import PlanRequest, make_plan
from mqttinfer.topics import check_id
from mqttinfer.units import format_bytes, format_si

log = logging.getLogger(__name__)

app = typer.Typer(
    name="plan",
    help="Plan a deployment: group devices, partition the teacher, pick students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Run a command body; turn our errors into one line on stderr and exit status 2."""
    try:
        return action()
    except (MqttInferError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --------------------------------------------------------------------------- make


@app.command("make")
def make_command(  # noqa: PLR0917 - typer maps every option to a parameter
    devices: Annotated[Path, typer.Option("--devices", help="Device inventory YAML.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the plan YAML.")],
    strategy: Annotated[
        str, typer.Option("--strategy", help=f"One of {', '.join(STRATEGIES)}.")
    ] = "rocoin",
    epsilon: Annotated[
        float, typer.Option("--epsilon", help="Max cumulative failure probability per group.")
    ] = 0.05,
    delta: Annotated[
        float, typer.Option("--delta", help="Capacity similarity threshold (rocoin).")
    ] = DEFAULT_DELTA,
    activations: Annotated[
        Path | None, typer.Option("--activations", help="Teacher activations, N×C .npy.")
    ] = None,
    channels: Annotated[
        int | None, typer.Option("--channels", help="Teacher filters C (without activations).")
    ] = None,
    candidates: Annotated[
        Path | None, typer.Option("--candidates", help="YAML with 'candidates: [...]'.")
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="Student input C,H,W [3,32,32].")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Plan name (default: the --out file stem).")
    ] = None,
    deployment: Annotated[str, typer.Option("--deployment", help="MQTT deployment.")] = "default",
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", help="Bundle directory: its partitions and students are used."),
    ] = None,
    rule: Annotated[str, typer.Option("--rule", help="Activation network rule: ah or ca.")] = "ah",
    min_replicas: Annotated[
        int, typer.Option("--min-replicas", help="At least this many devices per group.")
    ] = 1,
    params_per_filter: Annotated[
        float,
        typer.Option("--params-per-filter", help="ρ: student params per filter (0: off)."),
    ] = 0.0,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail instead of merging unreliable groups.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the partitioning.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    """Make a plan for a fleet and write it to --out."""
    _setup_logging(verbose)

    def body() -> Plan:
        if strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {strategy!r}",
                source="--strategy",
                fix=f"use one of {', '.join(STRATEGIES)}",
            )
        if rule not in ("ah", "ca"):
            raise ConfigError(f"unknown rule {rule!r}", source="--rule", fix="use ah or ca")
        spec = None if bundle is None else load_bundle_spec(bundle)
        shape = DEFAULT_INPUT_SHAPE if input_shape is None else parse_input_shape(input_shape)
        if spec is not None:
            _check_against_bundle(spec, activations, channels, input_shape, shape)
            shape = spec.input_shape
        elif activations is None and channels is None:
            raise ConfigError(
                "the number of teacher filters is unknown",
                source="--channels",
                fix="pass --activations acts.npy, --channels C or --bundle DIR",
            )
        if channels is not None and channels < 1:
            raise ConfigError(
                f"{channels} is not a filter count",
                source="--channels",
                fix="pass a positive integer",
            )
        if min_replicas < 1:
            raise ConfigError("must be at least 1", source="--min-replicas", fix="pass 1 or more")
        if not (math.isfinite(params_per_filter) and params_per_filter >= 0):
            raise ConfigError("must be ≥ 0", source="--params-per-filter", fix="pass e.g. 10000")
        plan_name = check_id(name or out.stem, "--name")
        request = PlanRequest(
            fleet=load_inventory(devices),
            strategy=strategy,
            epsilon=epsilon,
            delta=delta,
            channels=channels,
            activations=None if activations is None else _load_activations(activations),
            activations_path=None if activations is None else str(activations),
            rule="ca" if rule == "ca" else "ah",
            candidates=DEFAULT_CANDIDATES if candidates is None else load_candidates(candidates),
            input_shape=shape,
            name=plan_name,
            deployment=check_id(deployment, "--deployment"),
            bundle_spec=spec,
            min_params_per_filter=params_per_filter,
            min_replicas=min_replicas,
            strict=strict,
            seed=seed,
        )
        plan = make_plan(request)
        save_plan(plan, out)
        return plan

    plan = _run(body)
    if as_json:
        typer.echo(json.dumps(plan_document(plan), indent=2, ensure_ascii=False))
        return
    predicted = plan.predicted
    typer.echo(
        f"wrote {out}: {plan.strategy}, {len(plan.groups)} groups over {len(plan.devices)} "
        f"devices, predicted latency {predicted.latency_s:.4g} s, completion probability "
        f"{predicted.completion_probability:.4g}"
    )
    for note in plan.notes:
        typer.echo(f"note: {note}")


def _check_against_bundle(
    spec: BundleSpec,
    activations: Path | None,
    channels: int | None,
    input_shape: str | None,
    shape: tuple[int, int, int],
) -> None:
    if activations is not None:
        raise ConfigError(
            "a bundle fixes the partitions; activations cannot be used with it",
            source="--activations",
            fix="drop --activations (or --bundle)",
        )
    if channels is not None and channels != spec.channels:
        raise ConfigError(
            f"{channels} differs from the bundle's {spec.channels} teacher filters",
            source="--channels",
            fix="drop --channels when planning for a bundle",
        )
    if input_shape is not None and shape != spec.input_shape:
        raise ConfigError(
            f"{list(shape)} differs from the bundle's input shape {list(spec.input_shape)}",
            source="--input-shape",
            fix="drop --input-shape when planning for a bundle",
        )


def _load_activations(path: Path) -> npt.NDArray[np.float32]:
    source = str(path)
    try:
        matrix = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(
            "file not found",
            source=source,
            fix="run 'mqttinfer train activations' or pass --channels C",
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"not a readable .npy array ({err})",
            source=source,
            fix="pass the activations.npy written by 'mqttinfer train activations'",
        ) from None
    if matrix.ndim != 2 or min(matrix.shape) < 1 or not np.issubdtype(matrix.dtype, np.number):
        raise ConfigError(
            f"expected a numeric N×C matrix, got shape {matrix.shape} of {matrix.dtype}",
            source=source,
            fix="pass per-image spatial means of the final conv, N×C",
        )
    as_float: npt.NDArray[np.float32] = matrix.astype(np.float32, copy=False)
    return as_float


# --------------------------------------------------------------------------- show


@app.command("show")
def show_command(
    plan_path: Annotated[Path, typer.Argument(help="Plan YAML.", metavar="PLAN")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show a plan: groups, partitions, students, members and predictions."""
    plan = _run(lambda: load_plan(plan_path))
    if as_json:
        typer.echo(json.dumps(plan_document(plan), indent=2, ensure_ascii=False))
        return
    _print_plan(plan, str(plan_path))


def _print_plan(plan: Plan, source: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped output: do not squeeze the table into 80 columns.
        console = Console(width=160)
    predicted = plan.predicted
    table = Table(
        title=escape(
            f"{source}: {plan.strategy}, ε = {plan.epsilon:g}, {plan.channels} filters, "
            f"deployment {plan.deployment}"
        )
    )
    for header in (
        "group",
        "filters",
        "student",
        "params",
        "MACs",
        "memory",
        "members",
        "P(fail)",
        "latency s",
        "worst s",
    ):
        table.add_column(
            header, justify="left" if header in ("group", "student", "members") else "right"
        )
    for group in plan.groups:
        table.add_row(
            group.id,
            str(len(group.filters)),
            group.student.arch,
            format_si(group.student.params),
            format_si(group.student.macs),
            format_bytes(group.student.memory),
            ", ".join(m.device for m in group.members),
            f"{group.failure_probability:.3g}",
            f"{group.latency_s:.4g}",
            f"{group.worst_latency_s:.4g}",
        )
    console.print(table)
    console.print(
        f"predicted: latency {predicted.latency_s:.4g} s "
        f"(all up {predicted.all_up_latency_s:.4g} s, "
        f"worst case {predicted.worst_case_latency_s:.4g} s), completion probability "
        f"{predicted.completion_probability:.4g}; ε met: {'yes' if plan.meets_epsilon() else 'no'}"
    )
    fragile = single_points_of_failure(plan)
    if fragile:
        console.print(f"single points of failure: {', '.join(fragile)}", markup=False)
    for note in plan.notes:
        # Notes list devices in [brackets], which rich would take for markup.
        console.print(f"note: {note}", markup=False)


# --------------------------------------------------------------------------- simulate


@app.command("simulate")
def simulate_command(
    plan_path: Annotated[Path, typer.Argument(help="Plan YAML.", metavar="PLAN")],
    trials: Annotated[int, typer.Option("--trials", help="Frames to simulate.")] = 10_000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Monte-Carlo frames with random device failures; compare with the prediction."""

    def body() -> dict[str, Any]:
        if trials < 1:
            raise ConfigError(f"{trials} trials", source="--trials", fix="pass 1 or more")
        plan = load_plan(plan_path)
        result = simulate_plan(plan, trials, seed)
        document = asdict(result)
        document["predicted"] = asdict(result.predicted)
        document["plan"] = str(plan_path)
        return document

    document = _run(body)
    if as_json:
        typer.echo(json.dumps(document, indent=2, default=_json_number))
        return
    predicted = document["predicted"]
    typer.echo(
        f"{document['plan']}: {trials} frames (seed {seed}): completed "
        f"{document['completion_rate']:.4f} (predicted {predicted['completion_probability']:.4f}); "
        f"latency of completed frames mean {document['mean_latency_s']:.4g} s "
        f"(predicted {predicted['latency_s']:.4g} s), p50 {document['p50_latency_s']:.4g} s, "
        f"p99 {document['p99_latency_s']:.4g} s"
    )
    for group, share in document["partition_availability"].items():
        typer.echo(f"  {group}: answered {share:.4f} of frames")


def _json_number(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# --------------------------------------------------------------------------- experiment


@app.command("experiment")
def experiment_command(
    figure: Annotated[str, typer.Argument(help="fig7 or fig3.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the CSV and PNG.")] = Path(
        "out/planner"
    ),
    draws: Annotated[int, typer.Option("--draws", help="Random fleets per point.")] = 30,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
) -> None:
    """Reproduce RoCoIn Fig. 7 (latency vs heterogeneity) or Fig. 3(a) (latency vs ε)."""
    from mqttinfer.planner.experiments import run_experiment

    def body() -> list[Path]:
        if figure not in ("fig7", "fig3"):
            raise ConfigError(f"unknown figure {figure!r}", source="FIGURE", fix="use fig7 or fig3")
        if draws < 1:
            raise ConfigError(f"{draws} draws", source="--draws", fix="pass 1 or more")
        return run_experiment(figure, out, draws=draws, seed=seed)

    for path in _run(body):
        typer.echo(f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
