"""``mqttinfer bench …``: benchmarks on the real runtime (typer object: ``bench_app``).

Each command writes its results under ``--out`` (JSON, CSV, PNG) and prints rich tables, or
the JSON with ``--json``. ``python -m mqttinfer.bench.cli`` runs them without the main CLI.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mqttinfer.bench.report import DEFAULT_OUT, ResultsDir
from mqttinfer.bundle import Bundle
from mqttinfer.errors import ConfigError, MqttInferError

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks: latency/bytes/throughput, failures, aggregator, heterogeneity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@bench_app.callback()
def _group() -> None:
    """Benchmarks: latency/bytes/throughput, failures, aggregator, heterogeneity."""


OutOpt = Annotated[Path, typer.Option("--out", help="Folder for JSON, CSV and PNG results.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report instead of tables.")]
LogOpt = Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")]


def _setup(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _finish(tables: list[Any], out: ResultsDir, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(json.loads(out.path(".json").read_text()), indent=1))
        return
    console = Console()
    for table in tables:
        console.print(table)
    for path in out.written:
        console.print(f"wrote {path}")


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


@bench_app.command("latency")
def latency(
    *,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Bundle to run (default: the shipped demo bundle)."),
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames per contender (floor, e2e, teacher).")] = 400,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds the frames are split into.")] = 40,
    warmup: Annotated[int, typer.Option(help="Warm-up frames per contender.")] = 30,
    window: Annotated[int, typer.Option(help="Frames in flight in the throughput phase.")] = 8,
    throughput_s: Annotated[float, typer.Option(help="Seconds of the throughput phase.")] = 5.0,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw the PNG.")] = True,
    mqtt_version: Annotated[
        str,
        typer.Option(
            help="MQTT version of every client, the floor's too: auto (5, else 3.1.1), 5 or "
            "3.1.1 (measure both: paho's MQTT 5 property handling costs per message)."
        ),
    ] = "auto",
    out: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False,
    log_level: LogOpt = "WARNING",
) -> None:
    """Floor vs mqttinfer vs teacher latency, wire bytes and throughput, in one run."""
    from mqttinfer.bench.latency import LatencySettings, check_bundle_dir, render, run_latency

    _setup(log_level)
    settings = LatencySettings(
        frames=frames,
        rounds=rounds,
        warmup=warmup,
        window=window,
        throughput_s=throughput_s,
        mqtt_version=mqtt_version,
    )
    results = ResultsDir(out, "latency")
    try:
        report = run_latency(check_bundle_dir(bundle), settings, results, plots=plots)
    except (MqttInferError, ValueError) as exc:
        raise _fail(exc) from exc
    _finish(render(report), results, as_json)


@bench_app.command("aggregator")
def aggregator(
    *,
    frames: Annotated[int, typer.Option(help="Frames fed through the state machine.")] = 20_000,
    partitions: Annotated[
        str, typer.Option(help="Partition widths, comma-separated (default: the demo bundle's).")
    ] = "22,21,21",
    replicas: Annotated[int, typer.Option(help="Partials per partition per frame.")] = 1,
    open_frames: Annotated[int, typer.Option(help="Slots held open for the memory pass.")] = 2000,
    repeats: Annotated[int, typer.Option(help="Passes; the best counts.")] = 3,
    out: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False,
) -> None:
    """Partials per second of the pure aggregation state machine, and memory per open frame."""
    from mqttinfer.bench.aggregator import AggregatorSettings, render, run_aggregator

    try:
        widths = tuple(int(w) for w in partitions.split(",") if w.strip())
        settings = AggregatorSettings(
            partitions=widths,
            frames=frames,
            replicas=replicas,
            open_frames=open_frames,
            repeats=repeats,
        )
    except ValueError as exc:
        raise _fail(ValueError(f"--partitions must be integers like 22,21,21 ({exc})")) from exc
    results = ResultsDir(out, "aggregator")
    report = run_aggregator(settings, results)
    _finish(render(report), results, as_json)


@bench_app.command("failures")
def failures(
    *,
    bundles: Annotated[
        Path,
        typer.Option(
            help="Folder with <strategy>/plan.yaml and <strategy>/bundle per strategy "
            "(benchmarks/train_failure_bundles.py writes it)."
        ),
    ] = Path("bench-results/failure-bundles"),
    fleet: Annotated[
        Path, typer.Option(help="Fleet for the fallback (RoCoIn on the demo bundle).")
    ] = Path("devices/example-fleet.yaml"),
    images: Annotated[int, typer.Option(help="Fashion-MNIST test images (the first N).")] = 2000,
    trials: Annotated[int, typer.Option(help="Random device sets per failure count.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the device draws.")] = 0,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw the PNG.")] = True,
    out: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False,
    log_level: LogOpt = "WARNING",
) -> None:
    """Accuracy vs number of failed devices per strategy, dropout vs plain head (RoCoIn Fig. 5)."""
    from mqttinfer.bench import failures as bench

    _setup(log_level)
    settings = bench.FailureSettings(images=images, trials=trials, seed=seed)
    results = ResultsDir(out, "failures")
    try:
        cases = bench.cases_from_dir(bundles)
        note = None
        if not cases:
            cases = [bench.demo_case(fleet)]
            note = (
                f"no strategy bundles under {bundles}: ran RoCoIn on the shipped demo bundle only "
                "(train them with 'python benchmarks/train_failure_bundles.py')"
            )
            typer.echo(f"note: {note}", err=True)
        shape = Bundle.load(cases[0].bundle).input.shape
        frames, labels = bench.load_test_set(images, shape)
        report = bench.run_failures(
            cases, frames, labels, settings, results, plots=plots, note=note
        )
    except MqttInferError as exc:
        raise _fail(exc) from exc
    _finish(bench.render(report), results, as_json)


@bench_app.command("heterogeneity")
def heterogeneity(
    *,
    bundles: Annotated[
        Path,
        typer.Option(help="Folder with <strategy>/bundle per strategy (the failure bundles)."),
    ] = Path("bench-results/failure-bundles"),
    fleet: Annotated[
        Path | None,
        typer.Option(help="Inventory to emulate (default: a six-device halving ladder)."),
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames per strategy, one at a time.")] = 60,
    margin: Annotated[
        float, typer.Option(help="Slowdown of the relatively fastest device (>= 1).")
    ] = 10.0,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw the PNG.")] = True,
    out: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False,
    log_level: LogOpt = "WARNING",
) -> None:
    """Plans per strategy on an emulated heterogeneous fleet: predicted vs measured latency."""
    from mqttinfer.bench import heterogeneity as bench
    from mqttinfer.planner.inventory import load_inventory

    _setup(log_level)
    settings = bench.HeterogeneitySettings(frames=frames, margin=margin)
    results = ResultsDir(out, "heterogeneity")
    cases = [
        (s, bundles / s / "bundle")
        for s in bench.STRATEGY_ORDER
        if (bundles / s / "bundle" / "bundle.json").is_file()
    ]
    try:
        if not cases:
            raise ConfigError(
                f"no <strategy>/bundle under {bundles}",
                field="--bundles",
                fix="run 'python benchmarks/train_failure_bundles.py' first",
            )
        inventory = load_inventory(fleet) if fleet is not None else bench.ladder_fleet()
        report = bench.run_heterogeneity(cases, inventory, settings, results, plots=plots)
    except MqttInferError as exc:
        raise _fail(exc) from exc
    _finish(bench.render(report), results, as_json)


if __name__ == "__main__":
    sys.exit(bench_app())
