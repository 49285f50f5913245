"""The ``streambroker`` command-line tool.

Commands read the YAML configuration named by ``--config`` (before or after the
command), else ``$STREAMBROKER_CONFIG``, else ``./streambroker.yaml``. Errors are
one line on stderr (a configuration with several problems lists them indented
below it) and exit code 1; ``--debug`` shows the traceback instead, and debug logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc as collector
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, RenderableType
from rich.console import Group as RichGroup
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from ..async_broker import AsyncBroker
from ..broker import Broker
from ..config.registry import DEFAULT_DATA_DIR, Registry, ValidatedRegistry
from ..core.deadletters import DeadLetter
from ..core.stats import StreamStats, holding_back_warning
from ..errors import (
    BrokerError,
    ConfigError,
    InvalidArgumentError,
    UnknownStreamError,
)
from ..io.embedded import EmbeddedServer
from ..wire.events import Event
from .text import counted, duration, event_record, event_time, safe, stats_rates
from .worker import AsyncWorker, Worker, default_name_prefix, load_app

__all__ = [
    "app",
    "error_lines",
    "event_line",
    "event_record",
    "event_time",
    "load_config",
    "main",
    "stats_rates",
    "stats_table",
]

DEFAULT_CONFIG = "streambroker.yaml"
CONFIG_ENV = "STREAMBROKER_CONFIG"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Events sent per pipeline when publishing lines from standard input, and the longest a
#: line read waits before it is sent (seconds).
STDIN_BATCH = 1000
STDIN_LINGER = 0.1
#: The longest a read-only ``tail`` waits in one read (seconds), and the events it reads at once.
TAIL_BLOCK = 1.0
TAIL_COUNT = 100

log = logging.getLogger("streambroker.apps.cli")


def _cell(text: object, style: str = "") -> Text:
    """``text`` escaped, as a table cell whose Rich markup is not interpreted."""
    return Text(safe(text), style=style)


class _Group(TyperGroup):
    """Turns an error of any command into one clear message and exit code 1, and a usage
    error into one line and exit code 2."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        def run() -> Any:
            return super(_Group, self).main(
                args, prog_name, complete_var, False, windows_expand_args, **extra
            )

        if not standalone_mode:
            return run()
        try:
            code = run()
        except NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except UsageError as exc:
            where = f" (see {exc.ctx.command_path} -h)" if exc.ctx is not None else ""
            message = " ".join(exc.format_message().split()).rstrip(".")
            print(safe(f"streambroker: error: {message}{where}"), file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("streambroker: error: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (``streambroker tail … | head``): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(1) from None
        except Exception as exc:
            # Typer's own exceptions (usage errors, exits) carry an exit code.
            if isinstance(exc, typer.Abort) or hasattr(exc, "exit_code"):
                raise
            if ctx.params.get("debug"):
                raise
            for line in error_lines(exc):
                print(line, file=sys.stderr)
            raise typer.Exit(1) from None


def error_lines(exc: BaseException) -> list[str]:
    """The message of ``exc`` for stderr: one line, or for a configuration with several
    problems, a line then each problem indented."""
    if isinstance(exc, ConfigError) and len(exc.problems) > 1:
        lines = [f"the configuration has {len(exc.problems)} problems:"]
        lines += [f"  {problem}" for problem in exc.problems]
    else:
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, BrokerError | OSError):
            text = f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
        first, *rest = text.splitlines() or [text]
        lines = [first, *(f"  {line}" for line in rest)]
    return [safe(f"streambroker: error: {lines[0]}"), *map(safe, lines[1:])]


# Plain help (no boxes, no <bool> beside flags), -h as well as --help on every command.
app = typer.Typer(
    cls=_Group,
    help="Durable events on Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # --debug: a plain traceback, without locals
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
server_app = typer.Typer(help="The embedded server.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(server_app, name="server")
scripts_app = typer.Typer(
    help="The broker's server-side scripts.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(scripts_app, name="scripts")


group_app = typer.Typer(
    help="Move or delete a consumer group.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(group_app, name="group")


def _console() -> Console:
    """The console of standard output, as wide as the terminal (or ``$COLUMNS``) is now.

    soft_wrap: a long path is printed on one line, not folded at the terminal's width.
    """
    return Console(soft_wrap=True)


DataDir = Annotated[Path, typer.Option("--data-dir", help="Data directory of the embedded server.")]
ConfigPath = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"The YAML configuration (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG}).",
        show_default=False,
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
Interval = Annotated[
    float, typer.Option("--interval", min=0.01, help="Seconds between two refreshes.")
]
# Hidden: ends a --watch by itself after N refreshes (for scripts and tests).
Iterations = Annotated[int | None, typer.Option("--iterations", min=1, hidden=True)]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
Streams = Annotated[
    list[str] | None,
    typer.Argument(help="The streams (default: every registered stream).", show_default=False),
]


@dataclasses.dataclass
class _Options:
    """The options given before the command."""

    config: Path | None = None


def _show_version(value: bool) -> None:
    if value:
        print(f"streambroker {package_version('streambroker')}")
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar=CONFIG_ENV,
            help=f"The YAML configuration (default: ./{DEFAULT_CONFIG}).",
            show_default=False,
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of errors, and debug logs.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    ctx.obj = _Options(config)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format=LOG_FORMAT)


def load_config(ctx: typer.Context, config: Path | None) -> tuple[Path, ValidatedRegistry]:
    """The configuration file the options name, and its validated registry."""
    options = ctx.find_object(_Options)
    path = config or (options.config if options else None) or Path(DEFAULT_CONFIG)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found (pass --config FILE or set {CONFIG_ENV})")
    return path, Registry.from_yaml(path).validate()


def _broker(ctx: typer.Context, config: Path | None) -> Broker:
    return load_config(ctx, config)[1].broker()


def _print_json(value: object, *, compact: bool = False) -> None:
    # json.dumps escapes C0 controls in strings but leaves DEL, C1 and the rest raw; its
    # only raw newlines are those of the indentation, so each line is escaped alone.
    text = json.dumps(value, indent=None if compact else 2, ensure_ascii=False)
    print("\n".join(map(safe, text.split("\n"))), flush=True)


# -- validate -------------------------------------------------------------------------


@app.command()
def validate(ctx: typer.Context, config: ConfigPath = None) -> None:
    """Check the configuration; exit code 0 when it is valid, 1 with its problems."""
    path, registry = load_config(ctx, config)
    _console().print(
        _cell(
            f"{path}: valid: {counted(len(registry.pools), 'pool')}, "
            f"{counted(len(registry.streams), 'stream')}, "
            f"{counted(len(registry.groups), 'consumer group')}"
        )
    )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("stream", no_wrap=True)
    table.add_column("pool", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("consumer groups")
    for stream in registry.streams.values():
        address = registry.pools[stream.pool].display_address
        table.add_row(
            _cell(stream.name), _cell(stream.pool), _cell(address), _cell(", ".join(stream.groups))
        )
    _console().print(table)


# -- stats ----------------------------------------------------------------------------


def stats_table(
    streams: Sequence[StreamStats],
    caption: str | None = None,
    rates: Mapping[str | tuple[str, str], float] | None = None,
) -> Table:
    """A table of streams, their groups and the groups' consumers, one row each.

    With ``rates`` (see :func:`stats_rates`), a column more, ``per s``: the events
    published per second to each stream, and acknowledged per second by each group.
    """
    table = Table(box=box.SIMPLE_HEAD, caption=caption, show_edge=False, collapse_padding=True)
    table.add_column("stream/group/consumer", no_wrap=True)
    for header in ("length", "oldest", "lag", "pending", "dead", "idle"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("alive", no_wrap=True)
    if rates is not None:
        table.add_column("per s", justify="right", no_wrap=True)

    def rate(key: str | tuple[str, str]) -> str:
        value = None if rates is None else rates.get(key)
        return "-" if value is None else f"{value:.1f}"

    for stream in streams:
        extra = [""] * 5 + [rate(stream.stream)] if rates is not None else []
        table.add_row(
            _cell(f"{stream.stream} ({stream.pool})", style="bold"),
            str(stream.length),
            duration(stream.oldest_event_age),
            *extra,
        )
        for group in stream.groups:
            extra = ["", "", rate((stream.stream, group.group))] if rates is not None else []
            table.add_row(
                _cell(f"  {group.group}" + ("" if group.created else " (not created yet)")),
                "",
                "",
                str(group.lag),
                str(group.pending),
                str(group.dead_letters),
                *extra,
            )
            for consumer in group.consumers:
                table.add_row(
                    _cell(f"    {consumer.name}", style="dim"),
                    "",
                    "",
                    "",
                    str(consumer.pending),
                    "",
                    duration(consumer.idle),
                    "yes" if consumer.alive else "no",
                )
        for orphan in stream.orphan_groups:
            table.add_row(_cell(f"  {orphan} (not registered)", style="dim"))
    return table


#: Wider than any table: measuring within it finds the width a table needs.
_UNBOUNDED = 100_000


def _print_whole(console: Console, table: Table) -> None:
    """Print ``table`` as wide as it needs: no figure or name is ever cut short (on a
    narrower terminal, its lines wrap)."""
    # Measured within more than the console's width, which would cap the measurement;
    # printed on a console made that wide (print(width=...) is capped the same way).
    unbounded = console.options.update_width(_UNBOUNDED)
    needed = console.measure(table, options=unbounded).maximum
    width = console.width
    console.width = max(width, needed)
    try:
        console.print(table)
    finally:
        console.width = width


def _warnings(streams: Sequence[StreamStats]) -> list[Text]:
    """A line for each group that holds a stream back with no consumer running."""
    return [
        Text(safe(f"warning: {holding_back_warning(stream, group)}"), style="bold yellow")
        for stream in streams
        for group in stream.held_back_by
    ]


def _stats_json(streams: Sequence[StreamStats]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(stream) for stream in streams]


def _repeat(action: Callable[[], object], interval: float, iterations: int | None) -> None:
    """Call ``action`` now and every ``interval`` seconds, ``iterations`` times (default:
    until Ctrl-C, which ends it without an error)."""
    done = 0
    try:
        while True:
            action()
            done += 1
            if iterations is not None and done >= iterations:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


def _watch_table(render: Callable[[], RenderableType], interval: float, iters: int | None) -> None:
    """Show ``render()`` refreshed in place on a terminal; printed again and again else."""
    console = _console()
    if not console.is_terminal:
        _repeat(lambda: console.print(render()), interval, iters)
        return
    with Live(console=console, auto_refresh=False) as live:
        _repeat(lambda: live.update(render(), refresh=True), interval, iters)


@app.command()
def stats(
    ctx: typer.Context,
    streams: Streams = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Interval = 2.0,
    json_output: JsonOutput = False,
    iterations: Iterations = None,
    config: ConfigPath = None,
) -> None:
    """Show the streams, their consumer groups and the groups' consumers.

    For each stream its length and the age of its oldest event; for each group its lag
    (events not yet delivered), pending events and dead letters; for each consumer its
    pending events, how long it has been idle and whether it runs.
    """
    names = streams or []
    with _broker(ctx, config) as broker:
        if json_output:
            if watch:
                _repeat(
                    lambda: _print_json(_stats_json(broker.stats(*names)), compact=True),
                    interval,
                    iterations,
                )
            else:
                _print_json(_stats_json(broker.stats(*names)))
        elif watch:
            previous: list[tuple[float, list[StreamStats]]] = []

            def render() -> RenderableType:
                now, figures = time.monotonic(), broker.stats(*names)
                rates = {}
                if previous:
                    (then, before), *_ = previous
                    rates = stats_rates(before, figures, max(now - then, 1e-3))
                previous[:] = [(now, figures)]
                header = Text(
                    f"{datetime.now():%H:%M:%S}, every {interval:g} s; per s: events published "
                    "(streams) and acknowledged (groups) per second since the previous refresh"
                )
                return RichGroup(header, stats_table(figures, rates=rates), *_warnings(figures))

            _watch_table(render, interval, iterations)
        else:
            figures = broker.stats(*names)
            _print_whole(_console(), stats_table(figures))
            for warning in _warnings(figures):
                _console().print(warning)


# -- publish --------------------------------------------------------------------------


def _parse_meta(items: Iterable[str]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        meta[key] = value
    return meta


def _parse_body(text: str, as_json: bool, where: str) -> Any:
    if not as_json:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{where} is not valid JSON: {exc}") from None


@app.command()
def publish(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream to publish to.")],
    body: Annotated[
        str | None,
        typer.Argument(
            help="The body; without it, each line of standard input is one event.",
            show_default=False,
        ),
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", "-m", help="A meta tag KEY=VALUE (repeatable).", show_default=False),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Parse the body (each line) as JSON.")
    ] = False,
    config: ConfigPath = None,
) -> None:
    """Publish events and print their ids, one per line.

    Lines of standard input are sent in batches (one round trip per batch) of up to 1000
    lines, or of the lines read in 100 ms when they come slower, so that a pipe that
    stays open is published as it goes; empty lines are skipped. The ids printed are
    those of the events published. A line that cannot be published stops it, after
    the lines before it were.
    """
    tags = _parse_meta(meta or [])
    with _broker(ctx, config) as broker:
        if body is not None:
            print(safe(broker.publish(stream, _parse_body(body, as_json, "the body"), tags)))
            return
        if stream not in broker.registry.streams:
            raise UnknownStreamError(stream)
        batch = broker.batch()
        published = 0

        def flush() -> None:
            nonlocal published
            if len(batch):
                ids = batch.flush()
                published += len(ids)
                print("\n".join(map(safe, ids)), flush=True)

        for lines in _stdin_batches(STDIN_BATCH, STDIN_LINGER):
            for number, line in lines:
                text = line.rstrip("\r\n")
                if not text:
                    continue
                try:
                    value = _parse_body(text, as_json, f"line {number}")
                    try:
                        batch.publish(stream, value, tags)
                    except BrokerError as exc:
                        raise InvalidArgumentError(f"line {number}: {exc}") from None
                except BrokerError as exc:
                    flush()
                    before = counted(published, "event")
                    raise InvalidArgumentError(
                        f"{exc}; stopped: {before} published from the lines before it"
                    ) from None
            flush()


def _stdin_batches(size: int, linger: float) -> Iterator[list[tuple[int, str]]]:
    """The numbered lines of standard input, in lists of at most ``size``: a list ends
    when it is full, or ``linger`` seconds after its first line was read."""
    lines: queue.Queue[tuple[int, str] | None] = queue.Queue(maxsize=4 * size)

    def read() -> None:
        for number, line in enumerate(sys.stdin, start=1):
            lines.put((number, line))
        lines.put(None)

    threading.Thread(target=read, name="streambroker-stdin", daemon=True).start()
    batch: list[tuple[int, str]] = []
    deadline = 0.0
    while True:
        try:
            item = lines.get(timeout=max(0.0, deadline - time.monotonic()) if batch else None)
        except queue.Empty:
            yield batch
            batch = []
            continue
        if item is None:
            break
        if not batch:
            deadline = time.monotonic() + linger
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- tail -----------------------------------------------------------------------------


def _content(record: dict[str, Any]) -> str:
    """The meta tags (``key=value``) and the body (as JSON) of an event record."""
    if "error" in record:
        return safe(f"<cannot decode: {record['error']}>")
    tags = [f"{key}={value}" for key, value in record["meta"].items()]
    return safe(" ".join([*tags, json.dumps(record["body"], ensure_ascii=False)]))


def event_line(event: Event, as_json: bool = False) -> str:
    """One event as a line: ``stream id time key=value … body`` (the time of the id, the
    body as JSON), or as the JSON object of :func:`event_record`; control characters are
    escaped."""
    record = event_record(event)
    if as_json:
        return safe(json.dumps(record, ensure_ascii=False))
    return safe(f"{event.stream} {event.id} {record['time']} ") + _content(record)


#: The highest sequence number of an event id.
_MAX_SEQUENCE = 2**64 - 1
_AGE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_AGE_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_EVENT_ID = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")


def _read_after(start: str) -> str:
    """The id to read after for ``tail --from START``: ``0`` (every event), an event id
    (that event and those after it), or an age such as ``30s``, ``5m``, ``2h``, ``1d``."""
    age = _AGE.fullmatch(start)
    if age:
        first = int(time.time() * 1000 - float(age[1]) * _AGE_UNITS[age[2]])
    else:
        event_id = _EVENT_ID.fullmatch(start)
        if event_id is None or int(event_id[1]) >= 2**64:
            raise typer.BadParameter(
                f"{start!r} is not 0, an event id or an age such as 30s, 5m, 2h",
                param_hint="--from",
            )
        first, sequence = int(event_id[1]), int(event_id[2] or 0)
        if sequence:
            return f"{first}-{sequence - 1}"
    return f"{first - 1}-{_MAX_SEQUENCE}" if first > 0 else "0"


def _tail_read_only(
    broker: Broker,
    stream: str,
    start: str | None,
    last: int | None,
    limit: int | None,
    as_json: bool,
) -> None:
    after = broker.stream_stats(stream).last_id if start is None else _read_after(start)
    print(safe(f"tailing {stream} (read-only); Ctrl-C to stop"), file=sys.stderr, flush=True)
    printed = 0
    try:
        if last is not None:
            for event in broker.latest(stream, last if limit is None else min(last, limit)):
                after = event.id
                print(event_line(event, as_json), flush=True)
                printed += 1
        while limit is None or printed < limit:
            for event in broker.read(stream, after, count=TAIL_COUNT, block=TAIL_BLOCK):
                after = event.id
                print(event_line(event, as_json), flush=True)
                printed += 1
                if limit is not None and printed >= limit:
                    return
    except KeyboardInterrupt:
        return


class _CountReachedError(Exception):
    """Ends a ``tail --group --count``: the events read beyond the count stay pending."""


def _tail_group(broker: Broker, group: str, name: str, limit: int | None, as_json: bool) -> None:
    # An event it cannot decode is failed, not acknowledged, and never buried: it stays
    # pending (delivered to it again now and then, printed once) for another consumer.
    consumer = broker.consumer(group, name, max_deliveries=1 << 30)
    undecodable: set[tuple[str, str]] = set()
    streams = ", ".join(broker.registry.groups[group])
    print(
        safe(f"tailing {streams} as consumer {name} of group {group}; Ctrl-C to stop"),
        file=sys.stderr,
        flush=True,
    )
    left = limit

    def show(events: list[Event]) -> None:
        nonlocal left
        fresh = [event for event in events if (event.key, event.id) not in undecodable]
        for event in events:
            if (event.key, event.id) in undecodable:
                event.fail("cannot be decoded")
        shown = fresh if left is None else fresh[:left]
        for event in shown:
            record = event_record(event)
            print(event_line(event, as_json), flush=True)
            if "error" not in record:
                event.ack()
                continue
            event.fail(record["error"])
            undecodable.add((event.key, event.id))
            print(
                safe(
                    f"event {event.id} of {event.stream} cannot be decoded: not acknowledged, "
                    f"it stays pending in group {group}"
                ),
                file=sys.stderr,
                flush=True,
            )
        if left is not None:
            left -= len(shown)
            if left == 0:
                consumer.stop()
            if len(shown) < len(fresh):
                raise _CountReachedError

    try:
        consumer.consume(show, count=min(10, limit or 10))
    except _CountReachedError:
        print(
            safe(
                f"the events consumer {name} read beyond --count stay pending: they are "
                "delivered again, to it when it runs again or to another consumer of the group"
            ),
            file=sys.stderr,
        )
        return
    try:
        broker.remove_consumer(group, name)
    except BrokerError as exc:
        log.warning("consumer %s stays in group %s: %s", name, group, exc)


@app.command()
def tail(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream to follow.")],
    group: Annotated[
        str | None,
        typer.Option(
            "--group",
            "-g",
            help="Read as a consumer of this group (every stream of the group), acknowledging "
            "what is printed; it leaves the group when it stops. Without it, events are only "
            "read: nothing is acknowledged.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="The consumer name with --group (default: <hostname>-<pid>-tail).",
            show_default=False,
        ),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="0|ID|AGE",
            help="Start at the first event (0), at an event id, or this long ago (30s, 5m, "
            "2h, 1d) instead of now. Without --group.",
            show_default=False,
        ),
    ] = None,
    last: Annotated[
        int | None,
        typer.Option(
            "--last",
            "-n",
            min=1,
            help="Print the last K events first, then follow. Without --group.",
            show_default=False,
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option("--count", min=1, help="Stop after this many events.", show_default=False),
    ] = None,
    json_output: JsonOutput = False,
    config: ConfigPath = None,
) -> None:
    """Print events as they arrive, one per line, until Ctrl-C.

    Each line is the stream, the event id, its time (UTC), the meta tags and the body.
    With --group, an event that cannot be decoded is printed but not acknowledged: it
    stays pending.
    """
    if start is not None and last is not None:
        raise typer.BadParameter("give --from or -n, not both", param_hint="--from")
    if group is not None and (start is not None or last is not None):
        raise typer.BadParameter(
            "a group reads from its own position: --from and -n read without --group",
            param_hint="--group",
        )
    if start is not None:
        _read_after(start)
    with _broker(ctx, config) as broker:
        spec = broker.registry.streams.get(stream)
        if spec is None:
            raise UnknownStreamError(stream)
        if group is None:
            _tail_read_only(broker, stream, start, last, count, json_output)
        else:
            if group not in spec.groups:
                raise InvalidArgumentError(
                    f"consumer group {group!r} does not read stream {stream!r}"
                )
            consumer_name = name or f"{default_name_prefix()}-tail"
            _tail_group(broker, group, consumer_name, count, json_output)


# -- worker ---------------------------------------------------------------------------


@app.command()
def worker(
    app_spec: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:APP",
            help="The broker whose @broker.handler functions to run, e.g. myapp.events:broker.",
        ),
    ],
    groups: Annotated[
        list[str] | None,
        typer.Option(
            "--group",
            "-g",
            help="Run only this group's handler (repeatable; default: every handler).",
            show_default=False,
        ),
    ] = None,
    consumers: Annotated[
        int, typer.Option("--consumers", "-n", min=1, help="Consumers per group, each a thread.")
    ] = 1,
    name_prefix: Annotated[
        str | None,
        typer.Option(
            "--name-prefix",
            help="Consumers are named PREFIX-1, PREFIX-2, … (default: <hostname>-<pid>).",
            show_default=False,
        ),
    ] = None,
    summary_interval: Annotated[
        float,
        typer.Option("--summary-interval", min=0.01, help="Seconds between two summaries."),
    ] = 60.0,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format", help="text, or json: one JSON object per line (for log shippers)."
        ),
    ] = "text",
    cwd: Annotated[
        bool,
        typer.Option(
            "--cwd/--no-cwd",
            help="Look MODULE up in the current directory first (put it first on sys.path).",
        ),
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="Serve /metrics, /healthz and /readyz on this port.",
            show_default=False,
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option("--metrics-host", help="Address to serve them on (0.0.0.0: every interface)."),
    ] = "127.0.0.1",
) -> None:
    """Run the handlers registered on a broker until SIGTERM or Ctrl-C.

    Imports MODULE (from the current directory first, unless --no-cwd) and runs the
    handlers registered on APP with @broker.handler(group): N consumers per group. On
    SIGTERM or SIGINT it stops every consumer once its batch in hand is handled, and exits.
    """
    level = logging.getLevelNamesMapping().get(log_level.upper())
    if level is None:
        raise typer.BadParameter(f"{log_level!r} is not a log level", param_hint="--log-level")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger().setLevel(level)
    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"{log_format!r} is not text or json", param_hint="--log-format")
    if log_format == "json":
        from ..logs import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    broker = load_app(app_spec, cwd=cwd)
    settings: dict[str, Any] = {
        "groups": groups or [],
        "consumers": consumers,
        "name_prefix": name_prefix,
        "summary_interval": summary_interval,
    }
    serve = None if metrics_port is None else _metrics_server(broker, metrics_host, metrics_port)
    # What start-up made (modules, the app, its broker) lives as long as the process: out
    # of the collector's reach, each full collection walks only what handling made since
    # (with a batch of 1,000 events alive at a time, they come every few dozen batches).
    collector.collect()
    collector.freeze()
    if isinstance(broker, AsyncBroker):
        asyncio.run(_run_async_worker(broker, settings, serve))
        return
    with broker:
        runner = Worker(broker, **settings)
        with serve(runner.readiness) if serve else contextlib.nullcontext():
            runner.run()


async def _run_async_worker(
    broker: AsyncBroker, settings: dict[str, Any], serve: _Serve | None
) -> None:
    async with broker:
        runner = AsyncWorker(broker, **settings)
        with serve(runner.readiness) if serve else contextlib.nullcontext():
            await runner.run()


_Serve = Callable[[Callable[[], str | None]], contextlib.AbstractContextManager[None]]


def _metrics_server(broker: Broker | AsyncBroker, host: str, port: int) -> _Serve:
    """Count what ``broker`` does; what serves it, with a worker's readiness, while open."""
    from ..metrics import Metrics
    from .serving import OpsServer

    metrics = Metrics()
    metrics.instrument(broker)

    @contextlib.contextmanager
    def serving(ready: Callable[[], str | None]) -> Iterator[None]:
        server = OpsServer(metrics.exposition, ready, host, port).start()
        try:
            yield
        finally:
            server.close()

    return serving


# -- metrics --------------------------------------------------------------------------


@app.command()
def exporter(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to serve.")],
    host: Annotated[
        str, typer.Option("--host", help="Address to serve on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    cache: Annotated[
        float,
        typer.Option("--cache", min=0.0, help="Seconds a reading of the statistics is reused."),
    ] = 2.0,
    config: ConfigPath = None,
) -> None:
    """Serve the stream and group figures of the configuration to Prometheus, without
    running consumers: /metrics, /healthz, /readyz, until SIGTERM or Ctrl-C."""
    from ..metrics import Metrics
    from .serving import OpsServer

    _, registry = load_config(ctx, config)
    metrics = Metrics()
    collector = metrics.watch(registry, cache_seconds=cache)

    def ready() -> str | None:
        try:
            collector.read()
        except BrokerError as exc:
            return str(exc)
        return None

    server = OpsServer(metrics.exposition, ready, host, port).start()
    bound_host, bound_port = server.address
    _console().print(Text(f"serving metrics on http://{bound_host}:{bound_port}/metrics"))
    try:
        _wait_for_signal()
    finally:
        server.close()
        metrics.close()


@app.command()
def dashboard(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to serve.")],
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to serve on (0.0.0.0: every interface; logs a warning)."
        ),
    ] = "127.0.0.1",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="STREAMBROKER_DASHBOARD_TOKEN",
            help="Require this token: ?token=T once (kept in a cookie) or Authorization: Bearer T.",
            show_default=False,
        ),
    ] = None,
    config: ConfigPath = None,
) -> None:
    """Serve a web dashboard of the configuration's streams, until SIGTERM or Ctrl-C: live
    figures, the recent events of each stream, and each group's dead letters to replay."""
    from .dashboard import serve

    _, registry = load_config(ctx, config)
    serve(
        registry,
        host,
        port,
        token or None,
        announce=lambda url: print(safe(f"serving the dashboard on {url}"), flush=True),
    )


def _wait_for_signal() -> None:
    """Sleep until SIGTERM or SIGINT."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# -- gc, claim, dead letters ----------------------------------------------------------


@app.command()
def gc(
    ctx: typer.Context,
    streams: Streams = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Collect again every interval until Ctrl-C.")
    ] = False,
    interval: Interval = 5.0,
    json_output: JsonOutput = False,
    iterations: Iterations = None,
    config: ConfigPath = None,
) -> None:
    """Remove the events every registered group acknowledged, and print how many.

    With --watch, a line is printed each time something was removed (with --json,
    one JSON object per round).
    """
    names = streams or []
    with _broker(ctx, config) as broker:

        def collect(always: bool) -> None:
            removed = broker.collect_garbage(*names)
            if json_output:
                _print_json(removed, compact=watch)
            elif always or any(removed.values()):
                when = f"{datetime.now():%H:%M:%S} " if watch else ""
                total = sum(removed.values())
                detail = ", ".join(f"{stream} {n}" for stream, n in removed.items())
                print(safe(f"{when}removed {counted(total, 'event')}: {detail}"), flush=True)

        if watch:
            _repeat(lambda: collect(always=False), interval, iterations)
        else:
            collect(always=True)


@app.command()
def claim(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(help="The consumer group.")],
    from_name: Annotated[str, typer.Argument(metavar="FROM", help="The consumer to take from.")],
    to_name: Annotated[str, typer.Argument(metavar="TO", help="The consumer to give to.")],
    force: Annotated[
        bool, typer.Option("--force", help="Even while FROM runs (its work may be done twice).")
    ] = False,
    config: ConfigPath = None,
) -> None:
    """Move every pending event of consumer FROM to consumer TO (when scaling down)."""
    if from_name == to_name:
        raise typer.BadParameter(
            safe(f"consumer {from_name!r} cannot claim from itself: name two consumers"),
            param_hint="TO",
        )
    with _broker(ctx, config) as broker:
        members = {
            consumer.name
            for stream in broker.registry.groups.get(group, ())
            for consumer in broker.group_stats(stream, group).consumers
        }
        if group in broker.registry.groups and from_name not in members:
            raise InvalidArgumentError(
                f"consumer group {group!r} has no consumer {from_name!r} (its consumers: "
                f"{', '.join(map(safe, sorted(members))) or 'none'})"
            )
        moved = broker.consumer(group).claim(from_name, to_name, force=force)
    events = counted(moved, "pending event")
    print(safe(f"moved {events} of group {group} from {from_name} to {to_name}"))


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    event = event_record(letter.event)
    return {
        "id": letter.id,
        "stream": letter.stream,
        "group": letter.group,
        "event_id": letter.event.id,
        "error": letter.error,
        "deliveries": letter.deliveries,
        "meta": event.get("meta"),
        "body": event.get("body"),
        "decode_error": event.get("error"),
    }


#: The dead letters looked through for the one holding a given event id.
LETTER_SCAN = 10_000


def _one_letter(
    broker: Broker, action: Callable[[str, str, str], bool], stream: str, group: str, given: str
) -> None:
    """Apply ``action`` to the dead letter whose id, or whose event's id, is ``given``."""
    letters = broker.dead_letters(stream, group, LETTER_SCAN)
    by_event = {letter.event.id: letter.id for letter in reversed(letters)}
    letter_id = given if any(letter.id == given for letter in letters) else by_event.get(given)
    if letter_id is None or not action(stream, group, letter_id):
        raise InvalidArgumentError(
            f"stream {stream!r}, group {group!r}: no dead letter {given!r} (replayed or "
            "deleted already?)"
        )


@app.command("dead-letters")
def dead_letters(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream.")],
    group: Annotated[str, typer.Argument(help="The consumer group that set them aside.")],
    replay: Annotated[
        str | None,
        typer.Option(
            "--replay",
            metavar="ID|all",
            help="Deliver the dead letter ID (its event id, or its own id of --json), or all "
            "of them, again, to this group only.",
            show_default=False,
        ),
    ] = None,
    delete: Annotated[
        str | None,
        typer.Option(
            "--delete",
            metavar="ID",
            help="Delete the dead letter ID (its event id, or its own id) for good.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="List at most this many.")] = 100,
    json_output: JsonOutput = False,
    config: ConfigPath = None,
) -> None:
    """List the events a group set aside after they failed too often; replay or delete
    one, or replay them all."""
    if replay is not None and delete is not None:
        raise typer.BadParameter("give --replay or --delete, not both", param_hint="--delete")
    with _broker(ctx, config) as broker:
        if replay == "all":
            replayed = broker.replay_dead_letters(stream, group)
            if json_output:
                _print_json({"replayed": replayed})
            else:
                letters_of = f"{counted(replayed, 'dead letter')} of {stream}"
                print(safe(f"replayed {letters_of} to group {group}"))
            return
        if replay is not None or delete is not None:
            letter_id = replay or delete or ""
            verb = "replayed" if replay is not None else "deleted"
            action = broker.replay_dead_letter if replay is not None else broker.delete_dead_letter
            _one_letter(broker, action, stream, group, letter_id)
            if json_output:
                _print_json({verb: letter_id})
            else:
                print(safe(f"{verb} dead letter {letter_id} of {stream} in group {group}"))
            return
        letters = broker.dead_letters(stream, group, limit)
    if json_output:
        _print_json([_letter_json(letter) for letter in letters])
        return
    if not letters:
        print(safe(f"no dead letters of {stream} in group {group}"))
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("event id", "deliveries", "error", "event"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        content = _content(event_record(letter.event))
        table.add_row(
            _cell(letter.event.id), str(letter.deliveries), _cell(letter.error), Text(content)
        )
    _console().print(table)


# -- scripts --------------------------------------------------------------------------


@scripts_app.command("load")
def scripts_load(ctx: typer.Context, config: ConfigPath = None) -> None:
    """Load the broker's scripts on every pool (SCRIPT LOAD), for users allowed EVALSHA
    but not EVAL; again after each restart of a server or SCRIPT FLUSH."""
    with _broker(ctx, config) as broker:
        loaded = broker.load_scripts()
    for pool, count in loaded.items():
        print(safe(f"loaded {count} scripts on pool {pool}"))


# -- group, purge ---------------------------------------------------------------------


def _confirm(question: str, yes: bool) -> None:
    """Ask ``question`` on stderr unless ``yes``; a no ends the command with exit code 1."""
    if yes:
        return
    print(f"{safe(question)} [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        print("streambroker: nothing changed", file=sys.stderr)
        raise typer.Exit(1)


@group_app.command("reset")
def group_reset(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream.")],
    group: Annotated[str, typer.Argument(help="The consumer group.")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="ID|0|$",
            help="Deliver the events after ID next; 0: every event again; $: only new ones.",
        ),
    ],
    force: Annotated[
        bool,
        typer.Option("--force", help="Even while consumers hold pending events (they stay)."),
    ] = False,
    config: ConfigPath = None,
) -> None:
    """Move a consumer group's position on a stream (XGROUP SETID)."""
    with _broker(ctx, config) as broker:
        figures = broker.group_stats(stream, group)
        # Names from the server, escaped here: an error message may span lines, a name not.
        holders = [safe(consumer.name) for consumer in figures.consumers if consumer.pending]
        if figures.pending and not force:
            pending = counted(figures.pending, "pending event")
            held = (
                f"{counted(len(holders), 'consumer')} ({', '.join(holders)}) "
                f"{'holds' if len(holders) == 1 else 'hold'} {pending}"
                if holders
                else f"it has {pending}"
            )
            raise InvalidArgumentError(
                f"consumer group {group!r} of stream {stream!r}: {held}: stop them and let "
                "them settle, or reset anyway with --force (the pending events stay pending)"
            )
        broker.reset_group(stream, group, to)
    after = {"0": "every event of the stream", "$": "only the events published from now"}
    print(safe(f"group {group} of {stream} now reads {after.get(to, f'the events after {to}')}"))


@group_app.command("delete")
def group_delete(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream.")],
    group: Annotated[str, typer.Argument(help="The consumer group, not registered any more.")],
    yes: Yes = False,
    config: ConfigPath = None,
) -> None:
    """Delete a consumer group that is not registered (an orphan group of stats), with its
    pending events, replay stream and dead letters."""
    with _broker(ctx, config) as broker:
        _confirm(
            f"Delete consumer group {group} of stream {stream}, with its pending events and "
            "dead letters?",
            yes,
        )
        if not broker.delete_group(stream, group):
            raise InvalidArgumentError(f"stream {stream!r} has no consumer group {group!r}")
    print(safe(f"deleted consumer group {group} of {stream}"))


@app.command()
def purge(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream to empty.")],
    yes: Yes = False,
    config: ConfigPath = None,
) -> None:
    """Delete every event of a stream (its groups and dead letters stay)."""
    with _broker(ctx, config) as broker:
        length = broker.stream_stats(stream).length
        _confirm(f"Delete every event of stream {stream} ({counted(length, 'event')})?", yes)
        removed = broker.purge(stream)
    print(safe(f"deleted {counted(removed, 'event')} of {stream}"))


# -- demo and the embedded server -----------------------------------------------------


@app.command()
def demo(
    data_dir: DataDir = Path(DEFAULT_DATA_DIR),
    events: Annotated[int, typer.Option(min=1, help="Events published to each stream.")] = 1000,
) -> None:
    """Run the seed example on the embedded server: publish, consume with workers for
    every group, collect the garbage, show the statistics."""
    from .demo import run_demo

    console = _console()
    console.print(Text(f"Embedded server in {data_dir} (stop it: streambroker server stop)"))
    progress = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    result = run_demo(data_dir, events, progress=progress)
    table = Table(title="events per group", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("group")
    table.add_column("stream")
    table.add_column("published", justify="right")
    table.add_column("handled", justify="right")
    for group, per_stream in result.handled.items():
        for stream, handled in sorted(per_stream.items()):
            table.add_row(group, stream, str(result.published[stream]), str(handled))
    console.print(table)
    _print_whole(console, stats_table(result.stats, "after the workers stopped"))
    for stream, length in result.lengths.items():
        console.print(f"{stream}: {counted(length, 'event')} left")


ServerDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data directory of the embedded server (default: the configuration's embedded "
        f"pools, else {DEFAULT_DATA_DIR}).",
        show_default=False,
    ),
]


def _server_dirs(ctx: typer.Context, config: Path | None, data_dir: Path | None) -> list[Path]:
    """The data directories a ``server`` command acts on: ``--data-dir``, else those of
    the configuration's embedded pools, else the default one."""
    if data_dir is not None:
        return [data_dir]
    options = ctx.find_object(_Options)
    named = config or (options.config if options else None)
    if named is None and not Path(DEFAULT_CONFIG).exists():
        return [Path(DEFAULT_DATA_DIR)]
    path, registry = load_config(ctx, named)
    dirs = [
        Path(spec.data_dir)
        for spec in registry.pools.values()
        if spec.kind == "embedded" and spec.data_dir is not None
    ]
    if not dirs:
        raise ConfigError(f"{path}: no pool uses the embedded server")
    return list(dict.fromkeys(dirs))


@server_app.command("start")
def server_start(ctx: typer.Context, config: ConfigPath = None, data_dir: ServerDir = None) -> None:
    """Start the embedded server (or find it running)."""
    for directory in _server_dirs(ctx, config, data_dir):
        server = EmbeddedServer(directory)
        running = server.is_running()
        socket = server.start()
        verb = "already running" if running else "started"
        _console().print(Text(f"{server.data_dir}: {verb} on unix socket {socket}"))


@server_app.command("stop")
def server_stop(ctx: typer.Context, config: ConfigPath = None, data_dir: ServerDir = None) -> None:
    """Stop the embedded server; it saves its data first."""
    for directory in _server_dirs(ctx, config, data_dir):
        server = EmbeddedServer(directory)
        stopped = server.stop()
        _console().print(Text(f"{server.data_dir}: {'stopped' if stopped else 'not running'}"))


@server_app.command("status")
def server_status(
    ctx: typer.Context, config: ConfigPath = None, data_dir: ServerDir = None
) -> None:
    """Tell whether the embedded servers run (exit code 0) or not (3)."""
    stopped = False
    for directory in _server_dirs(ctx, config, data_dir):
        server = EmbeddedServer(directory)
        if server.is_running():
            _console().print(
                Text(f"{server.data_dir}: running on unix socket {server.socket_path}")
            )
        else:
            _console().print(Text(f"{server.data_dir}: not running"))
            stopped = True
    if stopped:
        raise typer.Exit(3)


def main() -> None:
    """Run the tool (the ``streambroker`` console script and ``python -m streambroker``)."""
    app(prog_name="streambroker")
