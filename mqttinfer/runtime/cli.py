"""``mqttinfer device run`` and ``mqttinfer source``: the device agent and the camera-side CLI.

``device_app`` (a typer group with ``run``) and ``source`` (a command function) are mounted by
``mqttinfer/cli.py``; ``python -m mqttinfer.runtime.cli device run ...`` works on its own too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Annotated

import numpy as np
import numpy.typing as npt
import typer

from mqttinfer.bundle import demo_bundle_path
from mqttinfer.datasets import iter_folder, load_fashion_mnist, load_npz
from mqttinfer.errors import ConfigError, MqttInferError
from mqttinfer.runtime.bus import BrokerConfig, Bus
from mqttinfer.runtime.device import Device, DeviceSettings
from mqttinfer.runtime.model_transfer import ModelCache, default_state_dir
from mqttinfer.runtime.plan_client import PlanClientSettings, PlanRoleProvider
from mqttinfer.runtime.roles import (
    RoleProvider,
    StaticRoleProvider,
    role_from_bundle,
    role_from_file,
)
from mqttinfer.runtime.source import Source, format_report, stream
from mqttinfer.topics import DEFAULT_DEPLOYMENT, Topics, check_id
from mqttinfer.units import parse_bit_rate

log = logging.getLogger(__name__)

# Set by the local cluster: a node whose launcher died (e.g. SIGKILLed) stops instead of
# running on as an orphan.
EXIT_WITH_PARENT_ENV = "MQTTINFER_EXIT_WITH_PARENT"
BROKER_HELP = (
    "Broker URL: mqtt:// or mqtts://[user[:pass]@]host[:port][?ca=F&cert=F&key=F&keepalive=S]."
)

device_app = typer.Typer(
    name="device",
    help="Run a device agent (serves one student of a bundle or plan).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@device_app.callback()
def _device_group() -> None:
    """Run a device agent (serves one student of a bundle or plan)."""


@device_app.command("run")
def device_run(
    *,
    node_id: Annotated[str, typer.Option("--id", help="This device's id (a topic level).")],
    broker: Annotated[str, typer.Option(help=BROKER_HELP)] = "mqtt://127.0.0.1:1883",
    deployment: Annotated[str, typer.Option(help="Deployment name (topic prefix).")] = (
        DEFAULT_DEPLOYMENT
    ),
    role: Annotated[
        Path | None, typer.Option(help="Role file (JSON/YAML); model.file is relative to it.")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Bundle directory to serve --partition of (default: the demo bundle)."),
    ] = None,
    partition: Annotated[int | None, typer.Option(help="Partition of --bundle to serve.")] = None,
    group: Annotated[str | None, typer.Option(help="Group id (default: g<partition>).")] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads.")] = 1,
    queue_size: Annotated[int, typer.Option(help="Frames waiting at most (oldest dropped).")] = 16,
    stats_interval: Annotated[float, typer.Option(help="Seconds between stats messages.")] = 2.0,
    slowdown: Annotated[
        float,
        typer.Option(help="EMULATION: sleep (F-1) x compute after each inference (F >= 1)."),
    ] = 1.0,
    link_rate: Annotated[
        str | None,
        typer.Option(
            help="EMULATION: a slow uplink; sleep 8 x partial bytes / RATE before each publish "
            "(bit/s; suffixes as in inventories: 250kbit/s, 2Mbit/s)."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where models fetched from the broker are cached "
            "(default: $STATE_DIRECTORY, else ~/.cache/mqttinfer)."
        ),
    ] = None,
    fetch_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a plan's model from the broker.")
    ] = 120.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Serve frames until SIGTERM/SIGINT, then announce offline (clean) and exit 0.

    Without --role or --partition the device waits for the role that 'mqttinfer plan apply'
    retains on plan/<id>, and fetches its model from the broker.
    """
    setup_logging(log_level)
    try:
        check_id(node_id, "--id")
        settings = DeviceSettings(
            node=node_id,
            deployment=deployment,
            threads=threads,
            queue_size=queue_size,
            stats_interval_s=stats_interval,
            slowdown=slowdown,
            link_rate_bps=None if link_rate is None else parse_bit_rate(link_rate),
        )
        provider = _role_provider(settings, role, bundle, partition, group) or PlanRoleProvider(
            node_id,
            cache=ModelCache(state_dir or default_state_dir()),
            settings=PlanClientSettings(fetch_timeout_s=fetch_timeout),
        )
        bus = Bus(
            BrokerConfig.from_url(broker), node=node_id, kind="device", topics=Topics(deployment)
        )
        serve_device(Device(bus, provider, settings))
    except (MqttInferError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _role_provider(
    settings: DeviceSettings,
    role: Path | None,
    bundle: Path | None,
    partition: int | None,
    group: str | None,
) -> RoleProvider | None:
    """The provider of a local role, or None when the role is to come from the plan topic."""
    if role is not None and (bundle is not None or partition is not None):
        raise ConfigError(
            "give either --role or --bundle/--partition, not both", field="--role", fix="pick one"
        )
    if role is not None:
        loaded = role_from_file(role, device=settings.node, deployment=settings.deployment)
        return StaticRoleProvider(loaded)
    if partition is None and bundle is None:
        return None
    if partition is None:
        raise ConfigError(
            "--bundle needs --partition",
            field="--partition",
            fix="pass --partition K, or neither to take the role from 'plan apply'",
        )
    bundle_dir = bundle or demo_bundle_path()
    loaded = role_from_bundle(
        bundle_dir,
        device=settings.node,
        deployment=settings.deployment,
        partition=partition,
        group=check_id(group or f"g{partition}", "--group"),
    )
    return StaticRoleProvider(loaded)


def serve_device(device: Device) -> None:
    """Run ``device`` until SIGTERM or SIGINT (installs the handlers; main thread only)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    watch_parent = os.environ.get(EXIT_WITH_PARENT_ENV) == "1"
    device.start()
    if not device.bus.wait_connected(10):
        log.warning("not connected to %s yet; retrying in the background", device.bus.config.url)
    while not stop.wait(0.5):
        if watch_parent and os.getppid() != parent:
            log.warning("parent process %d is gone: stopping", parent)
            break
    device.stop()


def source(
    *,
    broker: Annotated[str, typer.Option(help=BROKER_HELP)] = "mqtt://127.0.0.1:1883",
    npz: Annotated[
        Path | None, typer.Option(help="Frames from an .npz: x uint8 [N,C,H,W]/[N,H,W], y.")
    ] = None,
    folder: Annotated[
        Path | None,
        typer.Option(help="Frames from image files (.npy/.pgm/.ppm; others need Pillow)."),
    ] = None,
    fashion_mnist: Annotated[
        bool,
        typer.Option(
            "--fashion-mnist",
            help="The Fashion-MNIST test set (Debian package dataset-fashion-mnist).",
        ),
    ] = False,
    rate: Annotated[
        float, typer.Option(help="Frames per second; 0 sends the next once a result arrived.")
    ] = 20.0,
    count: Annotated[int | None, typer.Option(help="Send at most this many frames.")] = None,
    deadline_ms: Annotated[int, typer.Option(help="Each frame's deadline.")] = 1000,
    source_id: Annotated[str, typer.Option("--id", help="This source's id.")] = "cam1",
    deployment: Annotated[str, typer.Option(help="Deployment name (topic prefix).")] = (
        DEFAULT_DEPLOYMENT
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    """Stream frames to a deployment and print accuracy and latency (exit 1: no result came)."""
    setup_logging(log_level)
    try:
        frames, classes = _frames(npz, folder, fashion_mnist)
        with Source(
            broker,
            source_id=source_id,
            deployment=deployment,
            deadline_ms=deadline_ms,
            classes=classes,
        ) as camera:
            report = stream(camera, frames, rate=rate, count=count)
    except (MqttInferError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if report["sent"] and not report["counters"]["results"]:
        raise typer.Exit(1)


def _frames(
    npz: Path | None, folder: Path | None, fashion_mnist: bool
) -> tuple[Iterable[tuple[npt.NDArray[np.uint8], int | None]], tuple[str, ...]]:
    chosen = [name for name, given in (("--npz", npz), ("--folder", folder)) if given is not None]
    chosen += ["--fashion-mnist"] if fashion_mnist else []
    if len(chosen) != 1:
        raise ConfigError(
            f"give exactly one frame input, not {chosen or 'none'}",
            field="input",
            fix="pass one of --npz FILE, --folder DIR, --fashion-mnist",
        )
    if npz is not None:
        return load_npz(npz), ()
    if folder is not None:
        return iter_folder(folder), ()
    frames = load_fashion_mnist()
    return frames, frames.classes


cli = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
cli.add_typer(device_app, name="device")
cli.command("source")(source)

if __name__ == "__main__":
    cli()
