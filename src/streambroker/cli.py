"""The ``streambroker`` command-line tool.

Commands read the YAML configuration named by ``--config`` (before or after the
command), else ``$STREAMBROKER_CONFIG``, else ``./streambroker.yaml``. Errors are
one line on stderr (a configuration with several problems lists them indented
below it) and exit code 1; ``--debug`` shows the traceback instead, and debug logs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich import box
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from .async_broker import AsyncBroker
from .broker import Broker
from .config import DEFAULT_DATA_DIR, Registry, ValidatedRegistry
from .deadletters import DeadLetter
from .embedded import EmbeddedServer
from .errors import (
    BrokerError,
    ConfigError,
    DecodeError,
    InvalidArgumentError,
    UnknownStreamError,
)
from .events import Event
from .runner import AsyncWorker, Worker, default_name_prefix, load_app
from .stats import StreamStats

__all__ = ["app", "error_lines", "event_line", "event_record", "load_config", "main", "stats_table"]

DEFAULT_CONFIG = "streambroker.yaml"
CONFIG_ENV = "STREAMBROKER_CONFIG"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Events sent per pipeline when publishing lines from standard input.
STDIN_BATCH = 1000
#: The longest a read-only ``tail`` waits in one read (seconds), and the events it reads at once.
TAIL_BLOCK = 1.0
TAIL_COUNT = 100

log = logging.getLogger("streambroker.cli")

# Characters a terminal may act on instead of showing: C0 and C1 controls and DEL (escape
# sequences, bells, carriage returns, newlines), line and paragraph separators, and the
# bidirectional controls that reorder what is shown.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _safe(text: object) -> str:
    """``text`` with each character a terminal could act on written as an escape
    (``\\n``, ``\\r``, ``\\t``, else ``\\u001b`` and the like).

    Every string that came from a server or an event goes through it before it is
    printed. The escapes are those of JSON strings, so JSON text stays valid JSON.
    """
    return _UNSAFE.sub(lambda match: _ESCAPES.get(match[0]) or f"\\u{ord(match[0]):04x}", str(text))


def _cell(text: object, style: str = "") -> Text:
    """``text`` escaped, as a table cell whose Rich markup is not interpreted."""
    return Text(_safe(text), style=style)


class _Group(TyperGroup):
    """Turns an error of any command into one clear message and exit code 1."""

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
    return [_safe(f"streambroker: error: {lines[0]}"), *map(_safe, lines[1:])]


app = typer.Typer(
    cls=_Group,
    help="Durable events on Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # --debug: a plain traceback, without locals
)
server_app = typer.Typer(help="The embedded server.", no_args_is_help=True)
app.add_typer(server_app, name="server")


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
Streams = Annotated[
    list[str] | None,
    typer.Argument(help="The streams (default: every registered stream).", show_default=False),
]


@dataclasses.dataclass
class _Options:
    """The options given before the command."""

    config: Path | None = None


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
    print("\n".join(map(_safe, text.split("\n"))), flush=True)


def _plain(value: Any) -> Any:
    """``value`` as JSON-compatible built-ins (bytes as base64, odd types as repr)."""
    return msgspec.to_builtins(value, str_keys=True, enc_hook=repr)


# -- validate -------------------------------------------------------------------------


@app.command()
def validate(ctx: typer.Context, config: ConfigPath = None) -> None:
    """Check the configuration; exit code 0 when it is valid, 1 with its problems."""
    path, registry = load_config(ctx, config)
    _console().print(
        _cell(
            f"{path}: valid: {len(registry.pools)} pools, {len(registry.streams)} streams, "
            f"{len(registry.groups)} consumer groups"
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


def _duration(seconds: float | None) -> str:
    """A short human duration: ``850ms``, ``12.5s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def stats_table(streams: Sequence[StreamStats], caption: str | None = None) -> Table:
    """A table of streams, their groups and the groups' consumers, one row each."""
    table = Table(box=box.SIMPLE_HEAD, caption=caption, show_edge=False, collapse_padding=True)
    table.add_column("stream / group / consumer", no_wrap=True)
    table.add_column("length", justify="right")
    table.add_column("oldest", justify="right")
    table.add_column("lag", justify="right")
    table.add_column("pending", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("idle", justify="right")
    table.add_column("alive")
    for stream in streams:
        table.add_row(
            _cell(f"{stream.stream} ({stream.pool})", style="bold"),
            str(stream.length),
            _duration(stream.oldest_event_age),
        )
        for group in stream.groups:
            table.add_row(
                _cell(f"  {group.group}" + ("" if group.created else " (not created yet)")),
                "",
                "",
                str(group.lag),
                str(group.pending),
                str(group.dead_letters),
            )
            for consumer in group.consumers:
                table.add_row(
                    _cell(f"    {consumer.name}", style="dim"),
                    "",
                    "",
                    "",
                    str(consumer.pending),
                    "",
                    _duration(consumer.idle),
                    "yes" if consumer.alive else "no",
                )
        for orphan in stream.orphan_groups:
            table.add_row(_cell(f"  {orphan} (not registered)", style="dim"))
    return table


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
            _watch_table(
                lambda: stats_table(broker.stats(*names), f"{datetime.now():%H:%M:%S}"),
                interval,
                iterations,
            )
        else:
            _console().print(stats_table(broker.stats(*names)))


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

    Lines of standard input are sent in batches of 1000 (one round trip per batch);
    empty lines are skipped. The ids printed are those of the events published.
    """
    tags = _parse_meta(meta or [])
    with _broker(ctx, config) as broker:
        if body is not None:
            print(_safe(broker.publish(stream, _parse_body(body, as_json, "the body"), tags)))
            return
        batch = broker.batch()
        for number, line in enumerate(sys.stdin, start=1):
            text = line.rstrip("\r\n")
            if not text:
                continue
            batch.publish(stream, _parse_body(text, as_json, f"line {number}"), tags)
            if len(batch) >= STDIN_BATCH:
                print("\n".join(map(_safe, batch.flush())), flush=True)
        if len(batch):
            print("\n".join(map(_safe, batch.flush())), flush=True)


# -- tail -----------------------------------------------------------------------------


def event_record(event: Event) -> dict[str, Any]:
    """An event as JSON-compatible values: ``stream``, ``id``, ``meta`` and ``body``, or
    ``error`` instead of the last two when the entry cannot be decoded."""
    record: dict[str, Any] = {"stream": event.stream, "id": event.id}
    try:
        record.update(meta=dict(event.meta), body=_plain(event.body))
    except DecodeError as exc:
        record["error"] = str(exc)
    return record


def _content(record: dict[str, Any]) -> str:
    """The meta tags (``key=value``) and the body (as JSON) of an event record."""
    if "error" in record:
        return _safe(f"<cannot decode: {record['error']}>")
    tags = [f"{key}={value}" for key, value in record["meta"].items()]
    return _safe(" ".join([*tags, json.dumps(record["body"], ensure_ascii=False)]))


def event_line(event: Event, as_json: bool = False) -> str:
    """One event as a line: ``stream id key=value … body`` (the body as JSON), or as
    the JSON object of :func:`event_record`; control characters are escaped."""
    record = event_record(event)
    if as_json:
        return _safe(json.dumps(record, ensure_ascii=False))
    return _safe(f"{event.stream} {event.id} ") + _content(record)


def _tail_read_only(broker: Broker, stream: str, limit: int | None, as_json: bool) -> None:
    after = broker.stream_stats(stream).last_id
    print(_safe(f"tailing {stream} (read-only); Ctrl-C to stop"), file=sys.stderr, flush=True)
    printed = 0
    try:
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
    consumer = broker.consumer(group, name)
    streams = ", ".join(broker.registry.groups[group])
    print(
        _safe(f"tailing {streams} as consumer {name} of group {group}; Ctrl-C to stop"),
        file=sys.stderr,
        flush=True,
    )
    left = limit

    def show(events: list[Event]) -> None:
        nonlocal left
        shown = events if left is None else events[:left]
        for event in shown:
            print(event_line(event, as_json), flush=True)
            event.ack()
        if left is not None:
            left -= len(shown)
            if left == 0:
                consumer.stop()
            if len(shown) < len(events):
                raise _CountReachedError

    try:
        consumer.consume(show, count=min(10, limit or 10))
    except _CountReachedError:
        print(
            _safe(
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
    count: Annotated[
        int | None,
        typer.Option(
            "--count", "-n", min=1, help="Stop after this many events.", show_default=False
        ),
    ] = None,
    json_output: JsonOutput = False,
    config: ConfigPath = None,
) -> None:
    """Print events as they arrive, one per line, until Ctrl-C."""
    with _broker(ctx, config) as broker:
        spec = broker.registry.streams.get(stream)
        if spec is None:
            raise UnknownStreamError(stream)
        if group is None:
            _tail_read_only(broker, stream, count, json_output)
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
    cwd: Annotated[
        bool,
        typer.Option(
            "--cwd/--no-cwd",
            help="Look MODULE up in the current directory first (put it first on sys.path).",
        ),
    ] = True,
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
    broker = load_app(app_spec, cwd=cwd)
    settings: dict[str, Any] = {
        "groups": groups or [],
        "consumers": consumers,
        "name_prefix": name_prefix,
        "summary_interval": summary_interval,
    }
    if isinstance(broker, AsyncBroker):
        asyncio.run(_run_async_worker(broker, settings))
        return
    with broker:
        Worker(broker, **settings).run()


async def _run_async_worker(broker: AsyncBroker, settings: dict[str, Any]) -> None:
    async with broker:
        await AsyncWorker(broker, **settings).run()


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
                print(_safe(f"{when}removed {total} events: {detail}"), flush=True)

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
    with _broker(ctx, config) as broker:
        moved = broker.consumer(group).claim(from_name, to_name, force=force)
    print(_safe(f"moved {moved} pending events of group {group} from {from_name} to {to_name}"))


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


@app.command("dead-letters")
def dead_letters(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream.")],
    group: Annotated[str, typer.Argument(help="The consumer group that set them aside.")],
    replay: Annotated[
        bool, typer.Option("--replay", help="Deliver them again, to this group only.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="List at most this many.")] = 100,
    json_output: JsonOutput = False,
    config: ConfigPath = None,
) -> None:
    """List the events a group set aside after they failed too often, or replay them."""
    with _broker(ctx, config) as broker:
        if replay:
            replayed = broker.replay_dead_letters(stream, group)
            if json_output:
                _print_json({"replayed": replayed})
            else:
                print(_safe(f"replayed {replayed} dead letters of {stream} to group {group}"))
            return
        letters = broker.dead_letters(stream, group, limit)
    if json_output:
        _print_json([_letter_json(letter) for letter in letters])
        return
    if not letters:
        print(_safe(f"no dead letters of {stream} in group {group}"))
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
    console.print(stats_table(result.stats, "after the workers stopped"))
    for stream, length in result.lengths.items():
        console.print(f"{stream}: {length} events left")


@server_app.command("start")
def server_start(data_dir: DataDir = Path(DEFAULT_DATA_DIR)) -> None:
    """Start the embedded server (or find it running)."""
    socket = EmbeddedServer(data_dir).start()
    _console().print(Text(f"running on unix socket {socket}"))


@server_app.command("stop")
def server_stop(data_dir: DataDir = Path(DEFAULT_DATA_DIR)) -> None:
    """Stop the embedded server; it saves its data first."""
    stopped = EmbeddedServer(data_dir).stop()
    _console().print("stopped" if stopped else "not running")


@server_app.command("status")
def server_status(data_dir: DataDir = Path(DEFAULT_DATA_DIR)) -> None:
    """Tell whether the embedded server runs (exit code 0) or not (3)."""
    server = EmbeddedServer(data_dir)
    if server.is_running():
        _console().print(Text(f"running on unix socket {server.socket_path}"))
    else:
        _console().print("not running")
        raise typer.Exit(3)


def main() -> None:
    """Run the tool (the ``streambroker`` console script and ``python -m streambroker``)."""
    app(prog_name="streambroker")
