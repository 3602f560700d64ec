"""``mqttinfer plan apply`` and ``mqttinfer devices profile|list``: deploying to a fleet.

``apply`` is a command function (the lead mounts it on the ``plan`` group) and ``devices_app``
a typer group with ``profile`` and ``list``. ``python -m mqttinfer.runtime.deploy_cli`` runs
them on their own. Exit codes: 0 done, 1 some devices did not ack (apply) or no profile was
found (list), 2 a configuration or broker error.

``--broker`` and ``--deployment`` also come from ``MQTTINFER_BROKER``/``_DEPLOYMENT``, and the
credentials from broker init's env files (``runtime.cli.BrokerOption``). Under broker init's ACL
``apply`` and ``list`` must run as the ``apply`` identity: their node id defaults to the MQTT
username.
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
from mqttinfer.errors import BrokerError, ConfigError, MqttInferError
from mqttinfer.planner.inventory import save_inventory
from mqttinfer.planner.plan import Plan, load_plan
from mqttinfer.runtime.bus import BrokerConfig, Bus
from mqttinfer.runtime.cli import (
    DEFAULT_BROKER,
    DEPLOYMENT_ENV,
    BrokerOption,
    DeploymentOption,
)
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
from mqttinfer.runtime.profile import (
    LinkSettings,
    Profile,
    available_memory,
    build_profile,
    bundle_model,
    collect_profiles,
    default_model,
    measure_compute,
    measure_link,
    profiler_node,
    publish_profile,
)
from mqttinfer.topics import DEFAULT_DEPLOYMENT, Topics, check_id
from mqttinfer.units import format_bit_rate, format_bytes, format_flops, parse_bytes

log = logging.getLogger(__name__)

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
    broker: BrokerOption = DEFAULT_BROKER,
    deployment: Annotated[
        str | None,
        typer.Option(envvar=DEPLOYMENT_ENV, help="Deployment (topic prefix); default: the plan's."),
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
    node_id: Annotated[
        str | None,
        typer.Option(
            "--id", help="This tool's node id (default: the MQTT username, else plan-apply)."
        ),
    ] = None,
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
            timeout_s=timeout,
            force=force,
            prune=prune,
            chunk_size=_bytes(chunk_size, "--chunk-size"),
        )
        bus = Bus(
            broker,
            node=tool_node_id(node_id, broker, "plan-apply"),
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


def tool_node_id(given: str | None, broker: BrokerConfig, fallback: str) -> str:
    """An operator tool's node id: ``--id``, else its MQTT username, else ``fallback``.

    Under broker init's ACL a node may only write its own status/<username>, so a tool that
    logs in as ``apply`` must also be node ``apply``.
    """
    return check_id(given or broker.username or fallback, "--id")


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


@devices_app.callback()
def _devices_group() -> None:
    """Measure devices and collect the fleet's profiles into an inventory."""


@devices_app.command("profile")
def profile(
    *,
    node_id: Annotated[str, typer.Option("--id", help="The device's id (run this on the device).")],
    broker: BrokerOption = DEFAULT_BROKER,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    publish: Annotated[
        bool, typer.Option(help="Retain the profile on profile/<id> for 'devices list'.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
    bundle: Annotated[
        Path | None,
        typer.Option(
            help="Time this bundle's largest student (default: the demo bundle if installed, "
            "else a built-in 3x3-conv network)."
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime threads (as the device runs).")] = 1,
    compute_seconds: Annotated[float, typer.Option(help="Seconds of timed inferences.")] = 2.0,
    pings: Annotated[int, typer.Option(help="Pings through the broker (outage, RTT).")] = 20,
    ping_timeout: Annotated[float, typer.Option(help="Seconds before a ping is lost.")] = 1.0,
    burst: Annotated[str, typer.Option(help="Bytes echoed to measure the rate.")] = "1MiB",
    label: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE label for the inventory (repeatable).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    """Measure this device's FLOP/s, free memory, link rate and outage (and publish them)."""
    _setup_logging(log_level)
    try:
        device = check_id(node_id, "--id")
        labels = _parse_labels(label or [])
        link_settings = LinkSettings(
            pings=max(1, pings), ping_timeout_s=ping_timeout, burst_bytes=_bytes(burst, "--burst")
        )
        model = bundle_model(bundle) if bundle is not None else default_model()
        if model is None:
            raise ConfigError(
                "its bundle.json gives no MAC counts", source=str(bundle), fix="omit --bundle"
            )
        compute = measure_compute(model, threads=threads, budget_s=compute_seconds)
        memory = available_memory()
        bus = Bus(
            broker,
            node=profiler_node(device),
            kind="profiler",
            topics=Topics(deployment),
        )
        with bus:
            if not bus.wait_connected(30):
                raise BrokerError(f"could not connect to {bus.config.url} within 30 s")
            link = measure_link(bus, link_settings, owner=device)
            result = build_profile(device, compute, memory, link, labels=labels, threads=threads)
            if publish:
                publish_profile(bus, result)
    except MqttInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_output:
        typer.echo(json.dumps(json.loads(result.encode()), indent=2))
    else:
        Console().print(_profile_table([result]))
        if publish:
            typer.echo(f"published on {Topics(deployment).profile(device)} (retained)")


@devices_app.command("list")
def list_devices(
    *,
    broker: BrokerOption = DEFAULT_BROKER,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    out: Annotated[
        Path | None, typer.Option(help="Write the planner's inventory (devices/<fleet>.yaml).")
    ] = None,
    description: Annotated[str, typer.Option(help="Description line of the inventory.")] = "",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the profiles as JSON.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 10.0,
    node_id: Annotated[
        str | None,
        typer.Option(
            "--id", help="This tool's node id (default: the MQTT username, else devices-list)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    """Collect the profiles retained on profile/+ (and write them as an inventory)."""
    _setup_logging(log_level)
    try:
        bus = Bus(
            broker,
            node=tool_node_id(node_id, broker, "devices-list"),
            kind="monitor",
            topics=Topics(deployment),
        )
        with bus:
            profiles = collect_profiles(bus, timeout)
        if profiles and out is not None:
            if out.parent != Path():
                out.parent.mkdir(parents=True, exist_ok=True)
            save_inventory([p.inventory_device() for p in profiles], out, description)
    except MqttInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_output:
        typer.echo(json.dumps([json.loads(p.encode()) for p in profiles], indent=2))
    elif profiles:
        Console().print(_profile_table(profiles))
    if not profiles:
        typer.echo(f"no device profile is retained under {Topics(deployment).prefix}", err=True)
        raise typer.Exit(1)
    if out is not None and not json_output:
        typer.echo(f"wrote {len(profiles)} devices to {out}")


def _profile_table(profiles: list[Profile]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("device", "flops", "memory", "rate", "outage", "rtt p50", "measured with"):
        table.add_column(column)
    for p in profiles:
        table.add_row(
            p.device,
            format_flops(p.flops),
            format_bytes(p.memory),
            format_bit_rate(p.rate),
            f"{p.outage:.3g}",
            f"{p.measured.get('rtt_ms_p50', '?')} ms",
            str(p.measured.get("model", "?")),
        )
    return table


def _parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r} is not KEY=VALUE", field="--label", fix="e.g. room=lab")
        labels[key] = value
    return labels


def _bytes(text: str, option: str) -> int:
    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise ConfigError(str(exc), field=option, fix="write e.g. 256KiB") from exc
    if size < 1:
        raise ConfigError("must be at least 1 byte", field=option, fix="e.g. 256KiB")
    return size


cli = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
plan_group = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
plan_group.command("apply")(apply)
cli.add_typer(plan_group, name="plan")
cli.add_typer(devices_app, name="devices")

if __name__ == "__main__":
    cli()
