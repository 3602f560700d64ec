"""The ``mqttinfer`` command line (typer). Sub-commands live next to the code they drive."""

from __future__ import annotations

import typer

from mqttinfer import __version__
from mqttinfer.bench.cli import bench_app
from mqttinfer.demo import demo
from mqttinfer.runtime.monitor import monitor

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


app.command("demo")(demo)
app.command("monitor")(monitor)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()
