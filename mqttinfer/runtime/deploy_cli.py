"""``mqttinfer plan apply`` and ``mqttinfer devices profile|list``: deploying to a fleet.

``apply`` is a command function (the lead mounts it on the ``plan`` group) and ``devices_app``
a typer group with ``profile`` and ``list``. ``python -m mqttinfer.runtime.deploy_cli`` runs
them on their own. Exit codes: 0 done, 1 some devices did not ack (apply) or no profile was
found (list), 2 a configuration or broker error.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mqttinfer.bundle import Bundle
from mqttinfer.errors import ConfigError, MqttInferError
from mqttinfer.planner.plan import Plan, load_plan
from mqttinfer.runtime.bus import BrokerConfig, Bus
from mqttinfer.runtime.plan_apply import (
    DEFAULT_CHUNK_SIZE,
    ApplyReport,
    ApplySettings,
    ApplyTarget,
    DeviceProgress,
    Outcome,
    PlanApplier,
    Progress,
    build_target,
)
from mqttinfer.topics import Topics, check_id
from mqttinfer.units import format_bytes, parse_bytes

log = logging.getLogger(__name__)

BROKER_HELP = "Broker URL: mqtt:// or mqtts://[user[:pass]@]host[:port][?ca=F&cert=F&key=F]."
_STYLES = {
    Outcome.READY: "green",
    Outcome.REFUSED: "bold red",
    Outcome.OFFLINE: "red",
    Outcome.LOADING: "yellow",
    Outcome.WAITING: "dim",
}


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --------------------------------------------------------------------------- plan apply


def apply(
    plan: Annotated[Path, typer.Argument(help="The plan file (plans/<name>.yaml).")],
    *,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Bundle directory holding the plan's students (default: the plan's)."),
    ] = None,
    broker: Annotated[str, typer.Option(help=BROKER_HELP)] = "mqtt://127.0.0.1:1883",
    deployment: Annotated[
        str | None, typer.Option(help="Deployment (topic prefix); default: the plan's.")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for every device to ack the plan.")
    ] = 120.0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (no live progress).")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(help="Republish every model and role (devices that refused them retry)."),
    ] = False,
    prune: Annotated[
        bool,
        typer.Option("--prune/--keep-models", help="Delete retained models no role uses."),
    ] = True,
    chunk_size: Annotated[
        str, typer.Option(help="Largest model chunk (capped by the broker's packet limit).")
    ] = format_bytes(DEFAULT_CHUNK_SIZE).replace(" ", ""),
    node_id: Annotated[str, typer.Option("--id", help="This tool's node id.")] = "plan-apply",
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    """Push a plan to the fleet: models, then roles; wait until every device serves it.

    Re-applying the same plan changes nothing. Exits 1 listing the devices that did not ack.
    """
    _setup_logging(log_level)
    try:
        loaded = load_plan(plan)
        target = build_target(
            loaded, Bundle.load(_bundle_dir(bundle, loaded, plan)), deployment=deployment
        )
        settings = ApplySettings(
            timeout_s=timeout, force=force, prune=prune, chunk_size=_chunk_size(chunk_size)
        )
        bus = Bus(
            BrokerConfig.from_url(broker),
            node=check_id(node_id, "--id"),
            kind="apply",
            topics=Topics(target.deployment),
        )
        report = _run_apply(bus, settings, target, json_output)
    except MqttInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_output:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_summary(report)
    if not report.ok:
        _print_failures(report)
        raise typer.Exit(1)


def _bundle_dir(option: Path | None, plan: Plan, plan_path: Path) -> Path:
    if option is not None:
        return option
    if plan.bundle is None:
        raise ConfigError(
            "the plan names no bundle",
            source=str(plan_path),
            field="bundle",
            fix="pass --bundle DIR (the bundle whose students the plan deploys)",
        )
    named = Path(plan.bundle)
    beside_plan = plan_path.parent / named
    return named if named.is_absolute() or named.exists() else beside_plan


def _chunk_size(text: str) -> int:
    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise ConfigError(str(exc), field="--chunk-size", fix="write e.g. 256KiB") from exc
    if size < 1:
        raise ConfigError("must be at least 1 byte", field="--chunk-size", fix="e.g. 256KiB")
    return size


def _run_apply(bus: Bus, settings: ApplySettings, target: ApplyTarget, quiet: bool) -> ApplyReport:
    if quiet:
        return PlanApplier(bus, settings).run(target)
    console = Console(stderr=True)
    with Live(console=console, refresh_per_second=8, transient=True) as live:

        def show(progress: Progress) -> None:
            live.update(_progress_view(target.plan, progress))

        return PlanApplier(bus, settings, on_progress=show).run(target)


def _progress_view(plan: str, progress: Progress) -> Group:
    header = Text(f"plan {plan}: {progress.phase}", style="bold")
    if progress.upload_bytes:
        header.append(
            f"  models {format_bytes(progress.uploaded_bytes)} / "
            f"{format_bytes(progress.upload_bytes)}"
        )
    return Group(header, _device_table(progress.devices))


def _device_table(devices: tuple[DeviceProgress, ...]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("device", "group", "partition", "model", "state", "detail"):
        table.add_column(column)
    for d in devices:
        table.add_row(
            d.device,
            d.group,
            str(d.partition),
            d.model_sha256[:12],
            Text(d.outcome.value, style=_STYLES[d.outcome]),
            d.detail,
        )
    return table


def _print_summary(report: ApplyReport) -> None:
    console = Console()
    console.print(_device_table(report.devices))
    what = "changed" if report.changed else "unchanged (already applied)"
    ready = len(report.devices) - len(report.failed)
    console.print(
        f"plan {report.plan} v{report.version} on deployment {report.deployment}: {what}; "
        f"{ready}/{len(report.devices)} devices ready; {len(report.uploaded)} models uploaded, "
        f"{len(report.cleared)} roles withdrawn, {len(report.pruned)} models deleted "
        f"({report.elapsed_s:.1f} s)"
    )


def _print_failures(report: ApplyReport) -> None:
    """On stderr in every mode, so that a --json consumer's stdout stays one document."""
    errors = Console(stderr=True)
    errors.print(f"[bold red]{len(report.failed)} devices did not ack plan v{report.version}:[/]")
    for d in report.failed:
        errors.print(f"  {d.device}: {d.outcome.value}: {d.detail}", markup=False, soft_wrap=True)


devices_app = typer.Typer(
    name="devices",
    help="Measure devices and collect the fleet's profiles into an inventory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

cli = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
plan_group = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
plan_group.command("apply")(apply)
cli.add_typer(plan_group, name="plan")
cli.add_typer(devices_app, name="devices")

if __name__ == "__main__":
    cli()
