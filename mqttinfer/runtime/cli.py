"""``mqttinfer device run`` and ``mqttinfer source``: the device agent and the camera-side CLI.

``device_app`` (a typer group with ``run``) and ``source`` (a command function) are mounted by
``mqttinfer/cli.py``; ``python -m mqttinfer.runtime.cli device run ...`` works on its own too.

Also what every connecting command shares: ``BrokerOption`` and ``DeploymentOption`` (read
``MQTTINFER_BROKER``/``_DEPLOYMENT`` and the credentials of broker init's env files, as the
systemd units pass them) and ``NodeService`` (signals, sd_notify readiness and watchdog, and
stopping with the launcher under ``MQTTINFER_EXIT_WITH_PARENT=1``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, TypeVar

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
from mqttinfer.runtime.sdnotify import (
    WatchdogPinger,
    notify_ready,
    notify_status,
    notify_stopping,
    watchdog_timeout_s,
)
from mqttinfer.runtime.source import Source, format_report, stream
from mqttinfer.topics import DEFAULT_DEPLOYMENT, Topics, check_id
from mqttinfer.units import parse_bit_rate

log = logging.getLogger(__name__)

# Set by the local cluster: a node whose launcher died (e.g. SIGKILLed) stops instead of
# running on as an orphan.
EXIT_WITH_PARENT_ENV = "MQTTINFER_EXIT_WITH_PARENT"
# What the systemd units and broker init's env files set (credentials: bus.BrokerConfig.with_env).
BROKER_ENV = "MQTTINFER_BROKER"
DEPLOYMENT_ENV = "MQTTINFER_DEPLOYMENT"
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
BROKER_HELP = (
    "Broker URL: mqtt:// or mqtts://[user@]host[:port][?ca=F&cert=F&key=F&keepalive=S]. "
    "What it leaves out comes from MQTTINFER_USERNAME, _PASSWORD, _CA_FILE, _CERT_FILE and "
    "_KEY_FILE (broker init's env files), so the password stays off the command line."
)
DEFAULT_BROKER = BrokerConfig.from_url(DEFAULT_BROKER_URL)
# How often a node's main thread looks for its launcher and updates systemd's STATUS line.
_SERVICE_POLL_S = 0.5
_STOP_CHECK_S = 0.1


def parse_broker(value: str | BrokerConfig) -> BrokerConfig:
    """``--broker``'s parser: the URL plus the credentials of the environment."""
    try:
        config = value if isinstance(value, BrokerConfig) else BrokerConfig.from_url(value)
        return config.with_env()
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


# The --broker and --deployment of every command that connects (one definition for all).
BrokerOption = Annotated[
    BrokerConfig,
    typer.Option(
        "--broker",
        envvar=BROKER_ENV,
        parser=parse_broker,
        metavar="URL",
        show_default=DEFAULT_BROKER_URL,
        help=BROKER_HELP,
    ),
]
DeploymentOption = Annotated[
    str, typer.Option("--deployment", envvar=DEPLOYMENT_ENV, help="Deployment (topic prefix).")
]


class NodeService:
    """What a long-running node owes its supervisor (systemd, or the local cluster).

    Created in the main thread before the node starts: SIGTERM and SIGINT then make ``wait``
    return. ``ready`` sends READY=1 and, under ``WatchdogSec``, starts pinging the watchdog
    while ``healthy(WatchdogSec)`` is true (the node's worker ticked within that time).
    ``wait`` also returns when the launcher is gone, if ``MQTTINFER_EXIT_WITH_PARENT=1``.
    """

    def __init__(self) -> None:
        # Set only by the signal handler, which runs between two bytecodes of the main thread,
        # possibly while that thread holds a lock: it must take none (an Event.set() there
        # deadlocks when the signal lands inside Event.wait). SimpleQueue.put is reentrant
        # (documented, implemented in C), so the handler may wake ``wait`` through it.
        self._stop_requested = False
        self._wakeups: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._why = ""
        self._parent = os.getppid()
        self._watch_parent = os.environ.get(EXIT_WITH_PARENT_ENV) == "1"
        self._pinger: WatchdogPinger | None = None
        self._status = ""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._why = signal.Signals(signum).name
        self._stop_requested = True
        self._wakeups.put(self._why)

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def wait_for(self, wait: Callable[[float], bool], timeout_s: float) -> bool:
        """Call ``wait(step_s)`` in short steps until it returns True (then True), or until
        ``timeout_s`` passed or a stop was asked for (then False): a SIGTERM that arrives
        while the node waits for its broker is acted on at once."""
        deadline = time.monotonic() + timeout_s
        while not self._stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if wait(min(left, _STOP_CHECK_S)):
                return True
        return False

    def ready(self, status: str, healthy: Callable[[float], bool]) -> None:
        """Tell systemd the node is up; ping its watchdog while ``healthy(timeout_s)``."""
        self._status = status
        notify_ready(status)
        timeout_s = watchdog_timeout_s()
        if timeout_s is not None and self._pinger is None:
            self._pinger = WatchdogPinger(healthy=lambda: healthy(timeout_s))
            self._pinger.start()

    def wait(self, status: Callable[[], str] | None = None) -> str:
        """Block until a signal arrives or the launcher is gone; returns why.

        ``status`` (optional) is polled, and systemd's STATUS line updated when it changes.
        """
        while not self._stop_requested and not self._woken(_SERVICE_POLL_S):
            if self._watch_parent and os.getppid() != self._parent:
                self._why = f"parent process {self._parent} is gone"
                log.warning("%s: stopping", self._why)
                return self._why
            if status is not None:
                self._set_status(status())
        log.info("%s: stopping", self._why)
        return self._why

    def _woken(self, timeout_s: float) -> bool:
        """True when the signal handler woke this wait within ``timeout_s``."""
        try:
            self._wakeups.get(timeout=timeout_s)
        except queue.Empty:
            return False
        return True

    def stopping(self) -> None:
        """STOPPING=1 and no more watchdog pings: the node is shutting down on purpose."""
        notify_stopping(f"stopping ({self._why or 'done'})")
        if self._pinger is not None:
            self._pinger.stop()

    def _set_status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            notify_status(text)


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
    broker: BrokerOption = DEFAULT_BROKER,
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
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
    inline_max_ms: Annotated[
        float,
        typer.Option(
            help="Handle a frame on the network thread when idle and the student computes "
            "within this many ms (skips two thread hand-offs); 0 turns it off."
        ),
    ] = 5.0,
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
            inline_max_ms=inline_max_ms,
            slowdown=slowdown,
            link_rate_bps=None if link_rate is None else parse_bit_rate(link_rate),
        )
        provider = _role_provider(settings, role, bundle, partition, group) or PlanRoleProvider(
            node_id,
            cache=ModelCache(state_dir or default_state_dir()),
            settings=PlanClientSettings(fetch_timeout_s=fetch_timeout),
        )
        bus = Bus(broker, node=node_id, kind="device", topics=Topics(deployment))
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


def serve_device(device: Device, connect_wait_s: float = 10.0) -> None:
    """Run ``device`` until SIGTERM or SIGINT (installs the handlers; main thread only).

    READY=1 goes out once connected, or after ``connect_wait_s`` without a broker: a device
    whose broker is down is started all the same and keeps retrying in the background.
    """
    service = NodeService()
    device.start()
    connected = service.wait_for(device.bus.wait_connected, connect_wait_s)
    if not connected and not service.stop_requested:
        log.warning("not connected to %s yet; retrying in the background", device.bus.config.url)
    service.ready(device_status(device), device.healthy)
    service.wait(lambda: device_status(device))
    service.stopping()
    device.stop()


def device_status(device: Device) -> str:
    """The one-line state ``systemctl status`` shows for a device."""
    role = device.role
    serving = (
        "waiting for a role"
        if role is None
        else f"serving partition {role.partition} (group {role.group}, plan {role.plan} "
        f"v{role.plan_version})"
    )
    if device.bus.connected:
        return serving
    return f"{serving}; connecting to {device.bus.config.url}"


def source(
    *,
    broker: BrokerOption = DEFAULT_BROKER,
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
    deployment: DeploymentOption = DEFAULT_DEPLOYMENT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    """Stream frames to a deployment and print accuracy and latency (exit 1: no result came)."""
    setup_logging(log_level)
    pinger: WatchdogPinger | None = None
    try:
        frames, classes = _frames(npz, folder, fashion_mnist)
        with Source(
            broker,
            source_id=source_id,
            deployment=deployment,
            deadline_ms=deadline_ms,
            classes=classes,
        ) as camera:
            notify_ready(f"streaming to deployment {deployment} as {source_id}")
            progress = _Progress()
            # Healthy while frames keep being taken: between two, the stream sleeps at most
            # 1/rate, or waits for one result (rate 0), and at the end for the stragglers.
            gap_s = (1.0 / rate if rate > 0 else 0.0) + camera.result_timeout_s
            allowed_s = max(gap_s, watchdog_timeout_s() or 0.0)
            pinger = WatchdogPinger(healthy=lambda: progress.age_s() <= allowed_s)
            pinger.start()
            report = stream(camera, progress.track(frames), rate=rate, count=count)
    except (MqttInferError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        notify_stopping()
        if pinger is not None:
            pinger.stop()
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if report["sent"] and not report["counters"]["results"]:
        raise typer.Exit(1)


_T = TypeVar("_T")


class _Progress:
    """When the stream last took a frame (the source's watchdog health)."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self._last

    def track(self, items: Iterable[_T]) -> Iterator[_T]:
        for item in items:
            self._last = time.monotonic()
            yield item
        self._last = time.monotonic()  # then only the final wait for results is left


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
