"""(7) The asyncio face: batch publish (2) and consume (3) vs raw ``redis.asyncio``.

=====================================================================================
ASYNCIO FACE. These run only when the library has one: ``available(config)`` checks
``hasattr(config, "async_broker")``. Until then the suite reports case 7 as skipped.
The API assumed (as planned):

    async with config.async_broker() as broker:         # or close()/aclose() it
        await broker.publish(stream, body)
        async with broker.batch() as batch:
            batch.publish(stream, body)
        consumer = broker.consumer(group, name)         # or awaited, if a coroutine
        await consumer.consume(async_handler, count=1000, block=False)
=====================================================================================
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio

import streambroker as sb

from .common import (
    GROUP,
    STREAM,
    WARM_STREAM,
    Filler,
    Stopwatch,
    check,
    handle_raw,
    make_body,
    raw_fields,
    registry,
)
from .results import CaseResult, compare, throughput_result
from .servers import BenchServer

#: Targets against redis.asyncio (the batch also goes against the sync face's: see the README).
BATCH_TARGET = 2.5
CONSUME_TARGET = 1.5


def available(config: sb.ValidatedRegistry) -> bool:
    """Whether the library has an asyncio face to measure."""
    return hasattr(config, "async_broker")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@asynccontextmanager
async def _async_broker(config: sb.ValidatedRegistry) -> AsyncIterator[Any]:
    """The async broker, opened with ``async with`` when it supports it, else closed after."""
    broker = await _maybe_await(config.async_broker())
    if hasattr(broker, "__aenter__"):
        async with broker as opened:
            yield opened
        return
    try:
        yield broker
    finally:
        close = getattr(broker, "aclose", None) or getattr(broker, "close", None)
        if close is not None:
            await _maybe_await(close())


async def _warm(broker: Any) -> None:
    """Connect without touching STREAM (collecting creates nothing)."""
    if hasattr(broker, "collect_garbage"):
        await _maybe_await(broker.collect_garbage(WARM_STREAM))
    else:
        await broker.publish(WARM_STREAM, make_body(0))


def _raw_async_client(address: str) -> redis.asyncio.Redis:
    host, _, port = address.rpartition(":")
    return redis.asyncio.Redis(host=host, port=int(port), db=0, socket_timeout=60)


async def _xlen(address: str) -> int:
    client = _raw_async_client(address)
    try:
        return int(await client.xlen(STREAM))
    finally:
        await client.aclose()


async def _pending(address: str) -> int:
    client = _raw_async_client(address)
    try:
        return int((await client.xpending(STREAM, GROUP))["pending"])
    finally:
        await client.aclose()


def bench_async_batch(server: BenchServer, runs: int, n: int, batch_size: int) -> CaseResult:
    """(7, batch) ``async with broker.batch()`` vs a ``redis.asyncio`` pipeline."""
    config = registry(server.address)

    async def sb_main(count: int) -> float:
        async with _async_broker(config) as broker:
            await _warm(broker)
            with Stopwatch() as sw:
                for start in range(0, count, batch_size):
                    async with broker.batch() as batch:
                        for seq in range(start, min(count, start + batch_size)):
                            batch.publish(STREAM, make_body(seq))
        check(await _xlen(server.address) == count, "async batch: wrong stream length")
        return sw.seconds

    async def raw_main(count: int) -> float:
        client = _raw_async_client(server.address)
        try:
            await client.ping()
            with Stopwatch() as sw:
                for start in range(0, count, batch_size):
                    async with client.pipeline(transaction=False) as pipe:
                        for seq in range(start, min(count, start + batch_size)):
                            pipe.xadd(STREAM, raw_fields(seq))
                        await pipe.execute()
        finally:
            await client.aclose()
        check(await _xlen(server.address) == count, "raw async batch: wrong stream length")
        return sw.seconds

    sb_rates, raw_rates = compare(
        f"{server.kind} async batch",
        runs,
        n,
        lambda count: asyncio.run(sb_main(count)),
        lambda count: asyncio.run(raw_main(count)),
        lambda _events: server.flush(),
        warmup=batch_size * 2,
    )
    return throughput_result(
        "7/2",
        f"asyncio batch publish, batches of {batch_size:,}",
        server.kind,
        sb_rates,
        raw_rates,
        BATCH_TARGET,
        {"events": n, "batch_size": batch_size},
    )


def bench_async_consume(
    server: BenchServer, runs: int, n: int, count: int, filler: Filler
) -> CaseResult:
    """(7, consume) ``await consumer.consume(async_handler, ...)`` vs a ``redis.asyncio``
    ``XREADGROUP`` + ``XACK`` loop."""
    config = registry(server.address)
    rounds = n // count + 3

    async def sb_main(total: int) -> float:
        seen = [0]

        async def handler(events: list[sb.Event]) -> None:
            for event in events:
                event.body  # noqa: B018 - decoding is part of consuming
            seen[0] += len(events)

        async with _async_broker(config) as broker:
            await _warm(broker)
            consumer = await _maybe_await(broker.consumer(GROUP, "bench-consumer"))
            with Stopwatch() as sw:
                handled = await consumer.consume(handler, count=count, block=False)
        check(handled == total == seen[0], f"async consume: handled {handled} of {total}")
        check(await _pending(server.address) == 0, "async consume: events left pending")
        return sw.seconds

    async def raw_main(total: int) -> float:
        client = _raw_async_client(server.address)
        handled = 0
        try:
            await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            with Stopwatch() as sw:
                for _ in range(rounds):
                    reply = await client.xreadgroup(
                        GROUP, "raw-consumer", {STREAM: ">"}, count=count
                    )
                    if not reply:
                        break
                    for _key, entries in reply:
                        ids = handle_raw(entries)
                        handled += len(ids)
                        await client.xack(STREAM, GROUP, *ids)
        finally:
            await client.aclose()
        check(handled == total, f"raw async consume: handled {handled} of {total}")
        return sw.seconds

    sb_rates, raw_rates = compare(
        f"{server.kind} async consume",
        runs,
        n,
        lambda total: asyncio.run(sb_main(total)),
        lambda total: asyncio.run(raw_main(total)),
        filler.afresh,
        warmup=min(n, count * 5),
    )
    return throughput_result(
        "7/3",
        f"asyncio consume + ack, count={count:,}",
        server.kind,
        sb_rates,
        raw_rates,
        CONSUME_TARGET,
        {"events": n, "count": count},
    )
