"""The ``streambroker`` command-line tool."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import DEFAULT_DATA_DIR
from .embedded import EmbeddedServer
from .errors import BrokerError

__all__ = ["app", "main"]

app = typer.Typer(
    help="Durable events on Redis Streams.", no_args_is_help=True, add_completion=False
)
server_app = typer.Typer(help="The embedded server.", no_args_is_help=True)
app.add_typer(server_app, name="server")

# soft_wrap: a long path is printed on one line, not folded at the terminal's width.
console = Console(soft_wrap=True)

DataDir = Annotated[Path, typer.Option("--data-dir", help="Data directory of the embedded server.")]


@app.command()
def demo(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    events: Annotated[int, typer.Option(min=1, help="Events published to each stream.")] = 1000,
) -> None:
    """Run the seed example (three streams, three groups) on the embedded server."""
    from .demo import run_demo

    console.print(
        f"Embedded server in [bold]{escape(str(data_dir))}[/] (stop it: streambroker server stop)"
    )
    result = run_demo(data_dir, events)
    table = Table(title="streambroker demo")
    table.add_column("group")
    table.add_column("stream")
    table.add_column("published", justify="right")
    table.add_column("handled", justify="right")
    for group, per_stream in result.handled.items():
        for stream, handled in sorted(per_stream.items()):
            table.add_row(group, stream, str(result.published[stream]), str(handled))
    console.print(table)
    for stream, length in result.lengths.items():
        console.print(f"{stream}: {length} events stored")


@server_app.command("start")
def server_start(data_dir: DataDir = Path(DEFAULT_DATA_DIR)) -> None:
    """Start the embedded server (or find it running)."""
    socket = EmbeddedServer(data_dir).start()
    console.print(f"running on unix socket {escape(socket)}")


@server_app.command("stop")
def server_stop(data_dir: DataDir = Path(DEFAULT_DATA_DIR)) -> None:
    """Stop the embedded server; it saves its data first."""
    stopped = EmbeddedServer(data_dir).stop()
    console.print("stopped" if stopped else "not running")


@server_app.command("status")
def server_status(data_dir: DataDir = Path(DEFAULT_DATA_DIR)) -> None:
    """Tell whether the embedded server runs (exit code 0) or not (3)."""
    server = EmbeddedServer(data_dir)
    if server.is_running():
        console.print(f"running on unix socket {escape(server.socket_path)}")
    else:
        console.print("not running")
        raise typer.Exit(3)


def main() -> None:
    """Run the tool; a broker error is one line on stderr and exit code 1."""
    try:
        app()
    except BrokerError as exc:
        print(f"streambroker: error: {exc}", file=sys.stderr)
        sys.exit(1)
