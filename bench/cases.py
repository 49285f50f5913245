"""The benchmarks that run in this process: publish, batch publish, consume, garbage collection.

Each one measures streambroker's public API and the equivalent raw redis-py code
on the same server, alternately, with the server flushed before every measurement.
"""

from __future__ import annotations

from typing import Any

import streambroker as sb

from .common import (
    GROUP,
    STREAM,
    WARM_STREAM,
    Filler,
    Stopwatch,
    check,
    count_round_trips,
    handle_raw,
    make_body,
    median,
    raw_client,
    raw_fields,
    registry,
    server_commands,
)
from .results import CaseResult, compare, log, throughput_result
from .servers import BenchServer

#: Targets: the least ratio streambroker / raw of each throughput case.
PUBLISH_TARGET = 0.95
BATCH_TARGET = 3.0
CONSUME_TARGET = 1.5
#: Consuming with metrics on, against the same with them off.
METRICS_TARGET = 0.97
GC_SECONDS_TARGET = 2.0


def _warm_broker(broker: sb.Broker) -> None:
    """Connect without touching STREAM's events (collecting creates nothing)."""
    broker.collect_garbage(WARM_STREAM)


def _xlen(address: str) -> int:
    client = raw_client(address)
    try:
        return int(client.xlen(STREAM))
    finally:
        client.close()


def _pending(address: str) -> int:
    client = raw_client(address)
    try:
        return int(client.xpending(STREAM, GROUP)["pending"])
    finally:
        client.close()


# -- 1. publish one event at a time ---------------------------------------------


def bench_publish(server: BenchServer, runs: int, n: int) -> CaseResult:
    """(1) ``broker.publish`` one event at a time vs ``client.xadd``."""
    config = registry(server.address)

    def sb_run(count: int) -> float:
        with config.broker() as broker:
            _warm_broker(broker)
            publish = broker.publish
            with Stopwatch() as sw:
                for seq in range(count):
                    publish(STREAM, make_body(seq))
        check(_xlen(server.address) == count, "publish: wrong stream length")
        return sw.seconds

    def raw_run(count: int) -> float:
        client = raw_client(server.address)
        try:
            client.ping()
            xadd = client.xadd
            with Stopwatch() as sw:
                for seq in range(count):
                    xadd(STREAM, raw_fields(seq))
        finally:
            client.close()
        check(_xlen(server.address) == count, "raw publish: wrong stream length")
        return sw.seconds

    sb_rates, raw_rates = compare(
        f"{server.kind} publish",
        runs,
        n,
        sb_run,
        raw_run,
        lambda _events: server.flush(),
        warmup=max(1, n // 20),
    )
    return throughput_result(
        "1",
        "publish, one event at a time",
        server.kind,
        sb_rates,
        raw_rates,
        PUBLISH_TARGET,
        {"events": n, "body_bytes": "96-100"},
    )


# -- 2. batch publish -----------------------------------------------------------


def batch_sb(address: str, count: int, batch_size: int) -> float:
    """Seconds ``count`` events take in ``broker.batch()`` blocks of ``batch_size``."""
    with registry(address).broker() as broker:
        _warm_broker(broker)
        with Stopwatch() as sw:
            for start in range(0, count, batch_size):
                with broker.batch() as batch:
                    publish = batch.publish
                    for seq in range(start, min(count, start + batch_size)):
                        publish(STREAM, make_body(seq))
    check(_xlen(address) == count, "batch: wrong stream length")
    return sw.seconds


def batch_raw(address: str, count: int, batch_size: int) -> float:
    """Seconds ``count`` events take in redis-py pipelines of ``batch_size`` ``xadd``."""
    client = raw_client(address)
    try:
        client.ping()
        with Stopwatch() as sw:
            for start in range(0, count, batch_size):
                pipe = client.pipeline(transaction=False)
                for seq in range(start, min(count, start + batch_size)):
                    pipe.xadd(STREAM, raw_fields(seq))
                pipe.execute()
    finally:
        client.close()
    check(_xlen(address) == count, "raw batch: wrong stream length")
    return sw.seconds


def bench_batch(server: BenchServer, runs: int, n: int, batch_size: int) -> CaseResult:
    """(2) ``broker.batch()`` of ``batch_size`` events vs a non-transactional pipeline."""

    def sb_run(count: int) -> float:
        return batch_sb(server.address, count, batch_size)

    def raw_run(count: int) -> float:
        return batch_raw(server.address, count, batch_size)

    sb_rates, raw_rates = compare(
        f"{server.kind} batch",
        runs,
        n,
        sb_run,
        raw_run,
        lambda _events: server.flush(),
        warmup=batch_size * 2,
    )
    return throughput_result(
        "2",
        f"batch publish, batches of {batch_size:,}",
        server.kind,
        sb_rates,
        raw_rates,
        BATCH_TARGET,
        {"events": n, "batch_size": batch_size},
    )


# -- 3. consume and acknowledge ---------------------------------------------------


def bench_consume(
    server: BenchServer, runs: int, n: int, count: int, filler: Filler, collect: bool
) -> CaseResult:
    """(3) ``consumer.consume(handler, count, block=False)`` over a pre-filled stream vs a
    raw ``XREADGROUP`` + ``XACK`` loop that decodes each body with msgspec."""

    def sb_run(total: int) -> float:
        return consume_sb(server, total, count, collect, metrics=False)

    def raw_run(total: int) -> float:
        return consume_raw(server.address, total, count)

    label = f"{server.kind} consume" + ("" if collect else " (collect=False)")
    sb_rates, raw_rates = compare(
        label, runs, n, sb_run, raw_run, filler.afresh, warmup=min(n, count * 5)
    )
    if collect:
        return throughput_result(
            "3",
            f"consume + ack, count={count:,}",
            server.kind,
            sb_rates,
            raw_rates,
            CONSUME_TARGET,
            {"events": n, "count": count, "collect": True},
        )
    return throughput_result(
        "3b",
        f"consume + ack, count={count:,}, collect=False",
        server.kind,
        sb_rates,
        raw_rates,
        None,
        {"events": n, "count": count, "collect": False},
        target="(info)",
    )


def consume_raw(address: str, total: int, count: int) -> float:
    """Seconds a raw ``XREADGROUP`` + ``XACK`` loop takes over a stream of ``total``."""
    client = raw_client(address)
    handled = 0
    try:
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        with Stopwatch() as sw:
            for _ in range(total // count + 3):
                reply = client.xreadgroup(GROUP, "raw-consumer", {STREAM: ">"}, count=count)
                if not reply:
                    break
                for _key, entries in reply:
                    ids = handle_raw(entries)
                    handled += len(ids)
                    client.xack(STREAM, GROUP, *ids)
    finally:
        client.close()
    check(handled == total, f"raw consume: handled {handled} of {total}")
    check(_pending(address) == 0, "raw consume: events left pending")
    return sw.seconds


def consume_sb(server: BenchServer, total: int, count: int, collect: bool, metrics: bool) -> float:
    """Seconds ``consumer.consume(handler, count, block=False)`` takes over ``total``
    events (with ``metrics``: counted by a Prometheus registry, as a worker with
    ``--metrics-port`` does)."""
    config = registry(server.address)
    seen = [0]

    def handler(events: list[sb.Event]) -> None:
        for event in events:
            event.body  # noqa: B018 - decoding is part of consuming
        seen[0] += len(events)

    with config.broker() as broker:
        if metrics:
            from streambroker.metrics import Metrics

            Metrics().instrument(broker)
        _warm_broker(broker)  # creates the group at 0, reads nothing
        consumer = broker.consumer(GROUP, "bench-consumer", collect=collect)
        with Stopwatch() as sw:
            handled = consumer.consume(handler, count=count, block=False)
    check(handled == total == seen[0], f"consume: handled {handled} of {total}")
    check(_pending(server.address) == 0, "consume: events left pending")
    if collect:
        check(_xlen(server.address) == 0, "consume: acknowledged events not collected")
    return sw.seconds


def bench_metrics(server: BenchServer, runs: int, n: int, count: int, filler: Filler) -> CaseResult:
    """(3c) consume + ack with metrics (a ``Metrics`` registry counting every delivery,
    handler time and collection) vs the same without: what observing costs."""
    sb_rates, plain_rates = compare(
        f"{server.kind} consume with metrics",
        runs,
        n,
        lambda total: consume_sb(server, total, count, True, metrics=True),
        lambda total: consume_sb(server, total, count, True, metrics=False),
        filler.afresh,
        warmup=min(n, count * 5),
    )
    return throughput_result(
        "3c",
        f"consume + ack with metrics / without, count={count:,}",
        server.kind,
        sb_rates,
        plain_rates,
        METRICS_TARGET,
        {"events": n, "count": count},
    )


# -- 5. garbage collection ---------------------------------------------------------


def _acked_backlog(server: BenchServer, filler: Filler, n: int) -> None:
    """STREAM with ``n`` events that GROUP has read and acknowledged, all of them."""
    server.flush()
    filler.fill(n)
    client = raw_client(server.address)
    try:
        # Delivered up to the last event, nothing pending: the state after a group
        # read and acknowledged everything.
        client.xgroup_create(STREAM, GROUP, id="$")
    finally:
        client.close()


def _sb_collect(server: BenchServer, n: int) -> dict[str, Any]:
    config = registry(server.address)
    stats = raw_client(server.address)
    try:
        with config.broker() as broker:
            _warm_broker(broker)
            before = server_commands(stats)
            with count_round_trips() as trips, Stopwatch() as sw:
                removed = broker.collect_garbage(STREAM)
            commands = server_commands(stats) - before - 1  # less the first INFO
        check(removed == {STREAM: n}, f"collect_garbage removed {removed}, not {n}")
        check(int(stats.xlen(STREAM)) == 0, "collect_garbage left events behind")
    finally:
        stats.close()
    return {"seconds": sw.seconds, "round_trips": trips[0], "server_commands": commands}


def _raw_collect(server: BenchServer, n: int) -> dict[str, Any]:
    """The raw equivalent: find the lowest id every group still needs, ``XTRIM MINID`` it."""
    client = raw_client(server.address)
    try:
        client.ping()
        with count_round_trips() as trips, Stopwatch() as sw:
            trim: tuple[int, int] | None = None
            for group in client.xinfo_groups(STREAM):
                if group["pending"]:
                    first = client.xpending(STREAM, group["name"])["min"]
                    ms, _, seq = first.decode().partition("-")
                    need = (int(ms), int(seq))
                else:
                    ms, _, seq = group["last-delivered-id"].decode().partition("-")
                    need = (int(ms), int(seq) + 1)
                trim = need if trim is None else min(trim, need)
            assert trim is not None
            removed = client.xtrim(STREAM, minid=f"{trim[0]}-{trim[1]}", approximate=False)
        check(removed == n, f"raw XTRIM removed {removed}, not {n}")
    finally:
        client.close()
    return {"seconds": sw.seconds, "round_trips": trips[0]}


def bench_gc(server: BenchServer, runs: int, n: int, filler: Filler) -> CaseResult:
    """(5) ``broker.collect_garbage(stream)`` of a fully acknowledged backlog of ``n``."""
    small = max(1, n // 100)
    _acked_backlog(server, filler, small)
    small_sb = _sb_collect(server, small)
    sb_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    for i in range(runs):
        faces = [(_sb_collect, sb_runs), (_raw_collect, raw_runs)]
        if i % 2:
            faces.reverse()
        for collect, into in faces:
            _acked_backlog(server, filler, n)
            into.append(collect(server, n))
        log(
            f"  {server.kind} gc run {i + 1}/{runs}: streambroker "
            f"{sb_runs[-1]['seconds']:.3f} s in {sb_runs[-1]['round_trips']} round trips, "
            f"raw {raw_runs[-1]['seconds']:.3f} s in {raw_runs[-1]['round_trips']}"
        )
    sb_seconds = median([r["seconds"] for r in sb_runs])
    raw_seconds = median([r["seconds"] for r in raw_runs])
    trips = sorted({r["round_trips"] for r in sb_runs})
    constant = trips == [small_sb["round_trips"]]
    passed = sb_seconds < GC_SECONDS_TARGET and constant
    return CaseResult(
        case="5",
        title=f"collect_garbage, acknowledged backlog of {n:,}",
        server=server.kind,
        unit="s",
        sb=sb_seconds,
        raw=raw_seconds,
        ratio=raw_seconds / sb_seconds,
        target=f"< {GC_SECONDS_TARGET:.0f} s, O(1) round trips",
        passed=passed,
        sb_text=f"{sb_seconds:.3f} s, {'/'.join(map(str, trips))} rt",
        raw_text=f"{raw_seconds:.3f} s, {raw_runs[0]['round_trips']} rt",
        sb_runs=[r["seconds"] for r in sb_runs],
        raw_runs=[r["seconds"] for r in raw_runs],
        details={
            "events": n,
            "round_trips": trips,
            "server_commands": sorted({r["server_commands"] for r in sb_runs}),
            f"round_trips_at_{small}": small_sb["round_trips"],
            f"server_commands_at_{small}": small_sb["server_commands"],
            "raw_round_trips": raw_runs[0]["round_trips"],
            "raw": "XINFO GROUPS, then XTRIM MINID",
        },
    )
