"""The ``mqttinfer`` command line (typer). Sub-commands live next to the code they drive.

Importing this module must not import torch: the ``train`` commands import it when they run.
"""

from __future__ import annotations

import typer

from mqttinfer import __version__
from mqttinfer.bench.cli import bench_app
from mqttinfer.broker_cli import broker_app
from mqttinfer.demo import demo
from mqttinfer.planner.cli import app as plan_app
from mqttinfer.runtime.aggregator_cli import aggregator_app
from mqttinfer.runtime.cli import device_app, source
from mqttinfer.runtime.deploy_cli import apply, devices_app
from mqttinfer.runtime.monitor import monitor
from mqttinfer.train.cli import app as train_app

app = typer.Typer(
    name="mqttinfer",
    help="Failure-resilient distributed CNN inference over MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def version() -> None:
    """Print the mqttinfer version."""
    typer.echo(__version__)


plan_app.command("apply")(apply)
app.add_typer(device_app, name="device")
app.add_typer(aggregator_app, name="aggregator")
app.command("source")(source)
app.add_typer(plan_app, name="plan", help="Plan a fleet (RoCoIn and baselines), simulate, apply.")
app.add_typer(devices_app, name="devices")
app.add_typer(broker_app, name="broker")
app.add_typer(train_app, name="train")
app.command("demo")(demo)
app.command("monitor")(monitor)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()
