"""``mqttinfer broker ...``: set up the MQTT broker of a deployment (typer ``broker_app``).

Also runnable as ``python -m mqttinfer.broker_cli init ...``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from mqttinfer.broker_files import NODE_ETC
from mqttinfer.broker_init import (
    DEFAULT_AGGREGATOR,
    DEFAULT_SOURCE,
    InitOptions,
    InitReport,
    init_broker,
)
from mqttinfer.errors import MqttInferError
from mqttinfer.topics import DEFAULT_DEPLOYMENT

broker_app = typer.Typer(
    name="broker",
    help="Set up the MQTT broker of a deployment (credentials, ACL, TLS, mosquitto.conf).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@broker_app.callback()
def _group() -> None:
    """Set up the MQTT broker of a deployment (credentials, ACL, TLS, mosquitto.conf)."""


@broker_app.command("init")
def init(
    *,
    fleet: Annotated[
        Path, typer.Option(help="Device inventory YAML: a top-level 'devices:' list with 'id'.")
    ],
    out: Annotated[
        Path,
        typer.Option(help="Directory to write (e.g. /etc/mosquitto/mqttinfer, run with sudo)."),
    ],
    deployment: Annotated[str, typer.Option(help="Deployment name (topic prefix).")] = (
        DEFAULT_DEPLOYMENT
    ),
    tls: Annotated[
        bool, typer.Option("--tls", help="Create a CA and a server certificate; listen on TLS.")
    ] = False,
    hostname: Annotated[
        str | None,
        typer.Option(help="Name or IP nodes use to reach the broker (default: this host's FQDN)."),
    ] = None,
    aggregator_id: Annotated[
        str, typer.Option(help="Node id (and MQTT username) of the aggregator.")
    ] = DEFAULT_AGGREGATOR,
    source: Annotated[
        list[str] | None,
        typer.Option(help="Source id (camera app) allowed to publish frames; repeatable."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Broker port (default: 8883 with --tls, else 1883).")
    ] = None,
    local_port: Annotated[
        int | None,
        typer.Option(help="With --tls: plain listener on 127.0.0.1 (default: 1883; 0 = none)."),
    ] = None,
    client_certs: Annotated[
        bool,
        typer.Option("--client-certs", help="With --tls: also require a client certificate."),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Update a non-empty --out (keeps its CA and existing passwords)."
        ),
    ] = False,
) -> None:
    """Write passwords, ACL, TLS material and mosquitto.conf for a fleet's identities."""
    options = InitOptions(
        fleet=fleet,
        out=out,
        deployment=deployment,
        tls=tls,
        hostname=hostname or socket.getfqdn(),
        aggregator_id=aggregator_id,
        sources=tuple(source or (DEFAULT_SOURCE,)),
        port=port,
        local_port=local_port,
        client_certs=client_certs,
        force=force,
    )
    try:
        report = init_broker(options)
    except MqttInferError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(summary(report))


def summary(report: InitReport) -> str:
    """What was written, and what to do next (printed after a successful init)."""
    counts = f"{len(report.created)} new"
    if report.kept:
        counts += f", {len(report.kept)} kept"
    if report.removed:
        counts += f", {len(report.removed)} removed ({', '.join(report.removed)})"
    lines = [
        f"broker configuration written to {report.out}",
        f"  broker URL   {report.url}",
        f"  identities   {', '.join(i.name for i in report.identities)} ({counts})",
        f"  credentials  {report.out / 'credentials'}/<identity>.env (secret, mode 0600)",
        "next:",
        f"  broker host: sudo cp {report.conf} /etc/mosquitto/conf.d/mqttinfer.conf"
        " && sudo systemctl restart mosquitto",
        f"  each node:   install its credentials/<identity>.env in {NODE_ETC}/ (root, 0600)",
    ]
    if report.tls:
        lines.append(f"               and {report.out / 'tls' / 'ca.crt'} as {NODE_ETC}/ca.crt")
    if not report.shared_with_broker_group:
        lines.append(
            "note: files are readable by this user only; Mosquitto started as root reads them "
            "as user 'mosquitto': run broker init with sudo, or "
            f"sudo chgrp -R mosquitto {report.out} and chmod g+rX the files it reads"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    broker_app()
