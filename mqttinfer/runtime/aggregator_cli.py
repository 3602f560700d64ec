"""``mqttinfer aggregator run``: the aggregator as a long-running process.

Runs until SIGTERM or SIGINT, then announces ``offline`` (clean) and exits 0. Also runnable as
``python -m mqttinfer.runtime.aggregator_cli run ...``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from mqttinfer.bundle import Bundle, demo_bundle_path
from mqttinfer.errors import BrokerError, MqttInferError
from mqttinfer.runtime.aggregator import Aggregator, AggregatorSettings, HeadWeights
from mqttinfer.runtime.bus import BrokerConfig, Bus
from mqttinfer.runtime.cli import DEFAULT_BROKER, BrokerOption, DeploymentOption, NodeService
from mqttinfer.topics import DEFAULT_DEPLOYMENT, Topics

log = logging.getLogger(__name__)

aggregator_app = typer.Typer(
    name="aggregator",
    help="Join partial features into results (one aggregator per deployment).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _default_bundle() -> Path | None:
    path = demo_bundle_path()
    return path if (path / "bundle.json").is_file() else None


def build_aggregator(bundle: Bundle, bus: Bus, settings: AggregatorSettings) -> Aggregator:
    """An aggregator for ``bundle``'s partitions and head, on ``bus``."""
    head = bundle.head
    widths = dict(enumerate(bundle.partition_sizes()))
    return Aggregator(
        bus, widths=widths, head=HeadWeights(head.weight, head.bias), settings=settings
    )


@aggregator_app.callback()
def _group() -> None:
    """Join partial features into results (one aggregator per deployment)."""


@aggregator_app.command("run")
def run(
    *,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Bundle directory (default: the shipped demo bundle)."),
    ] = None,
    broker: BrokerOption = DEFAULT_BROKER,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    node_id: Annotated[str, typer.Option("--id", help="This aggregator's node id.")] = "aggregator",
    max_open: Annotated[int, typer.Option(help="Most frames held open at once.")] = 256,
    deadline_ms: Annotated[
        int, typer.Option(help="Deadline of a frame whose header has not arrived yet.")
    ] = 1000,
    stats_interval: Annotated[float, typer.Option(help="Seconds between stats messages.")] = 2.0,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 30.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the aggregator until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        _serve(
            bundle,
            broker,
            AggregatorSettings(
                node=node_id,
                deployment=deployment,
                max_open=max_open,
                default_deadline_ms=deadline_ms,
                stats_interval_s=stats_interval,
            ),
            connect_timeout,
        )
    except MqttInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _serve(
    bundle_dir: Path | None,
    broker: BrokerConfig,
    settings: AggregatorSettings,
    connect_timeout: float,
) -> None:
    bundle_dir = bundle_dir or _default_bundle()
    if bundle_dir is None:
        raise MqttInferError(
            "no --bundle given and the demo bundle is not installed; pass --bundle DIR"
        )
    bundle = Bundle.load(bundle_dir)
    bus = Bus(
        broker,
        node=settings.node,
        kind="aggregator",
        topics=Topics(settings.deployment),
    )
    aggregator = build_aggregator(bundle, bus, settings)
    service = NodeService()  # SIGTERM/SIGINT, sd_notify, MQTTINFER_EXIT_WITH_PARENT
    aggregator.start()
    bus.start()
    if not bus.wait_connected(connect_timeout):
        aggregator.stop()
        bus.stop()
        raise BrokerError(f"could not connect to {bus.config.url} within {connect_timeout:.0f} s")
    bus.update_status(serving="ready")
    log.info(
        "aggregator %s ready: bundle %s, %d partitions, deployment %s",
        settings.node,
        bundle.name,
        bundle.num_partitions,
        settings.deployment,
    )
    service.ready(
        f"serving bundle {bundle.name} ({bundle.num_partitions} partitions)", aggregator.healthy
    )
    service.wait()
    service.stopping()
    aggregator.stop()
    bus.stop()


if __name__ == "__main__":
    aggregator_app()
