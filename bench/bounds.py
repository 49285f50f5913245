"""How far the throughput cases are from what any Python client could do here.

    python -m bench.bounds [--servers valkey,redis] [--runs 5] [--events 200000]

Runs, on the same server and in the same process, the loops of the batch (2) and
consume (3) cases three ways: raw redis-py (as in the suite), **lean** (the least a
Python client can do: every command packed by hand or with ``hiredis.pack_command``
into one buffer, one write, replies read raw, nothing made per event but what the case
needs), and streambroker; the consume loop also as lean with the next read sent before
the batch is processed (**lean, read ahead**), as streambroker with the objects made
before it frozen out of the garbage collector's reach (**frozen**, as ``streambroker
worker`` does after start-up), and each consume loop with Python's garbage collector
off. Figures are medians of ``--runs`` runs (the loops take turns going first); ratios
are to raw redis-py. A target above lean's ratio cannot be met by any change to the
broker's Python: only by compiled code or less work on the server.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable
from typing import Any

import hiredis
import redis

from . import cases
from .common import (
    BODY_FIELD,
    CODEC_FIELD,
    CODEC_NAME,
    GROUP,
    STREAM,
    Filler,
    Stopwatch,
    check,
    decode_body,
    encode_body,
    raw_client,
)
from .results import console
from .servers import SERVER_KINDS, BenchServer, start_servers

Loop = Callable[[BenchServer, int, int], float]


def _lean_connection(server: BenchServer) -> tuple[redis.Redis, Any]:
    """A RESP2 client and one of its connections, for the lean loops' own writes."""
    host, _, port = server.address.rpartition(":")
    client = redis.Redis(host=host, port=int(port), protocol=2)
    return client, client.connection_pool.get_connection()


# -- batch publish ----------------------------------------------------------------


def batch_raw(server: BenchServer, n: int, size: int) -> float:
    return cases.batch_raw(server.address, n, size)


def batch_lean(server: BenchServer, n: int, size: int) -> float:
    client, connection = _lean_connection(server)
    head = hiredis.pack_command(("XADD", STREAM, "*", BODY_FIELD.decode(), "x"))
    head = b"*7" + head[2 : head.rindex(b"$1\r\nx\r\n")]
    tail = b"\r\n" + hiredis.pack_command((CODEC_FIELD, CODEC_NAME))[4:]
    with Stopwatch() as sw:
        for start in range(0, n, size):
            parts = []
            for seq in range(start, min(n, start + size)):
                body = encode_body(seq)
                parts.append(b"".join((head, b"$%d\r\n" % len(body), body, tail)))
            connection.send_packed_command([b"".join(parts)], check_health=False)
            for _ in parts:
                connection.read_response()
    client.connection_pool.release(connection)
    client.close()
    return sw.seconds


def batch_sb(server: BenchServer, n: int, size: int) -> float:
    return cases.batch_sb(server.address, n, size)


# -- consume and acknowledge ------------------------------------------------------


def consume_raw(server: BenchServer, n: int, count: int) -> float:
    return cases.consume_raw(server.address, n, count)


def _lean_consume(server: BenchServer, n: int, count: int, ahead: bool) -> float:
    client, connection = _lean_connection(server)
    client.xgroup_create(STREAM, GROUP, id="0")
    read = hiredis.pack_command(
        ("XREADGROUP", "GROUP", GROUP, "lean", "COUNT", count, "STREAMS", STREAM, ">")
    )
    send, receive = connection.send_packed_command, connection.read_response

    def ack(ids: list[bytes]) -> bytes:
        return hiredis.pack_command(("XACK", STREAM, GROUP, *ids))  # type: ignore[arg-type]

    handled = 0
    previous: list[bytes] = []  # read ahead: the batch whose ack goes with the next read
    with Stopwatch() as sw:
        send([read], check_health=False)
        reply = receive()
        while reply:
            if ahead:
                send([ack(previous), read] if previous else [read], check_health=False)
            ids = []
            for _key, entries in reply:
                for event_id, fields in entries:
                    decode_body(fields[-3])
                    ids.append(event_id)
            handled += len(ids)
            if ahead:
                if previous:
                    receive()
                reply = receive()
                previous = ids
            else:
                send([ack(ids), read], check_health=False)
                receive()
                reply = receive()
        if previous:
            send([ack(previous)], check_health=False)
            receive()
    client.connection_pool.release(connection)
    client.close()
    check(handled == n, f"lean consume: handled {handled} of {n}")
    return sw.seconds


def consume_lean(server: BenchServer, n: int, count: int) -> float:
    return _lean_consume(server, n, count, ahead=False)


def consume_lean_ahead(server: BenchServer, n: int, count: int) -> float:
    return _lean_consume(server, n, count, ahead=True)


def consume_sb(server: BenchServer, n: int, count: int) -> float:
    return cases.consume_sb(server, n, count, collect=True, metrics=False)


def _without_gc(loop: Loop) -> Loop:
    def run(server: BenchServer, n: int, size: int) -> float:
        gc.disable()
        try:
            return loop(server, n, size)
        finally:
            gc.enable()

    return run


def _frozen(loop: Loop) -> Loop:
    """``loop`` with what existed before it frozen out of the collector's reach, as
    ``streambroker worker`` freezes what its start-up made."""

    def run(server: BenchServer, n: int, size: int) -> float:
        gc.collect()
        gc.freeze()
        try:
            return loop(server, n, size)
        finally:
            gc.unfreeze()

    return run


BATCH: dict[str, Loop] = {
    "raw redis-py": batch_raw,
    "lean": batch_lean,
    "streambroker": batch_sb,
}
CONSUME: dict[str, Loop] = {
    "raw redis-py": consume_raw,
    "lean": consume_lean,
    "lean, read ahead": consume_lean_ahead,
    "streambroker": consume_sb,
    "streambroker, frozen": _frozen(consume_sb),
    "raw redis-py, no gc": _without_gc(consume_raw),
    "lean, no gc": _without_gc(consume_lean),
    "streambroker, no gc": _without_gc(consume_sb),
}


def measure(
    server: BenchServer, loops: dict[str, Loop], runs: int, n: int, size: int, fill: bool
) -> dict[str, float]:
    """Median events/s of each loop over ``runs`` runs on a flushed (and, with ``fill``,
    pre-filled) server; the loops' order rotates from run to run."""
    filler = Filler(server.address)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            server.flush()
            if fill:
                filler.fill(n)
            gc.collect()
            rates[name].append(n / loops[name](server, n, size))
            if fill:
                client = raw_client(server.address)
                check(client.xpending(STREAM, GROUP)["pending"] == 0, f"{name}: left pending")
                client.close()
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bounds", description=__doc__)
    p.add_argument("--servers", default=",".join(SERVER_KINDS), help="valkey,redis (both)")
    p.add_argument("--runs", type=int, default=5, help="runs per loop (5)")
    p.add_argument("--events", type=int, default=200_000, help="events per run (200,000)")
    p.add_argument("--size", type=int, default=1000, help="batch size and count (1,000)")
    args = p.parse_args()
    servers, missing = start_servers(args.servers.split(","))
    for kind in missing:
        console.print(f"[yellow]skipped:[/yellow] {kind} is not installed")
    try:
        for server in servers:
            for title, loops, fill in (
                (f"batch publish, batches of {args.size:,}", BATCH, False),
                (f"consume + ack, count={args.size:,}", CONSUME, True),
            ):
                found = measure(server, loops, args.runs, args.events, args.size, fill)
                raw = found["raw redis-py"]
                console.print(f"\n[bold]{server.kind} {server.version()}: {title}[/bold]")
                for name, rate in found.items():
                    console.print(f"  {name:<22} {rate:>10,.0f}/s  {rate / raw:5.2f}x raw")
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
