"""Run one face of one case in a loop, for a sampling profiler to watch.

    py-spy record -o profile.svg -- .venv/bin/python -m bench.profile consume
    pyinstrument -m bench.profile publish --events 20000

(Neither profiler is a dependency of the project: ``pip install py-spy`` or
``pyinstrument`` into the virtual environment first.) Starts its own Valkey server;
``--raw`` runs the raw redis-py code instead, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import streambroker as sb

from . import async_cases
from .common import (
    BODY_FIELD,
    GROUP,
    STREAM,
    Filler,
    decode_body,
    make_body,
    raw_client,
    raw_fields,
    registry,
)
from .servers import start_servers

CASES = ("publish", "batch", "consume", "async-batch", "async-consume")


def _sb(case: str, address: str, n: int, size: int, collect: bool) -> None:
    config = registry(address)
    if case.startswith("async-"):
        asyncio.run(_sb_async(case, config, n, size, collect))
        return
    with config.broker() as broker:
        if case == "publish":
            for seq in range(n):
                broker.publish(STREAM, make_body(seq))
        elif case == "batch":
            for start in range(0, n, size):
                with broker.batch() as batch:
                    for seq in range(start, min(n, start + size)):
                        batch.publish(STREAM, make_body(seq))
        else:

            def handler(events: list[sb.Event]) -> None:
                for event in events:
                    event.body  # noqa: B018 - decoding is part of consuming

            consumer = broker.consumer(GROUP, "profile", collect=collect)
            consumer.consume(handler, count=size, block=False)


async def _sb_async(
    case: str, config: sb.ValidatedRegistry, n: int, size: int, collect: bool
) -> None:
    async with async_cases._async_broker(config) as broker:
        if case == "async-batch":
            for start in range(0, n, size):
                async with broker.batch() as batch:
                    for seq in range(start, min(n, start + size)):
                        batch.publish(STREAM, make_body(seq))
        else:

            async def handler(events: list[sb.Event]) -> None:
                for event in events:
                    event.body  # noqa: B018 - decoding is part of consuming

            consumer = broker.consumer(GROUP, "profile", collect=collect)
            await consumer.consume(handler, count=size, block=False)


def _raw(case: str, address: str, n: int, size: int) -> None:
    client = raw_client(address)
    try:
        if case == "publish":
            for seq in range(n):
                client.xadd(STREAM, raw_fields(seq))
        elif case == "batch":
            for start in range(0, n, size):
                pipe = client.pipeline(transaction=False)
                for seq in range(start, min(n, start + size)):
                    pipe.xadd(STREAM, raw_fields(seq))
                pipe.execute()
        elif case == "consume":
            client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            for _ in range(n // size + 3):
                reply = client.xreadgroup(GROUP, "raw", {STREAM: ">"}, count=size)
                if not reply:
                    break
                for _key, entries in reply:
                    ids = []
                    for event_id, fields in entries:
                        decode_body(fields[BODY_FIELD])
                        ids.append(event_id)
                    client.xack(STREAM, GROUP, *ids)
        else:
            raise SystemExit(f"--raw has no {case} (use the suite for redis.asyncio)")
    finally:
        client.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("case", choices=CASES)
    p.add_argument("--events", type=int, default=200_000, help="events per round (200,000)")
    p.add_argument("--size", type=int, default=1000, help="batch size or count (1,000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, server flushed between (3)")
    p.add_argument("--raw", action="store_true", help="run the raw redis-py code instead")
    p.add_argument("--no-collect", action="store_true", help="consumers with collect=False")
    args = p.parse_args()
    servers, _ = start_servers(["valkey"])
    (server,) = servers
    try:
        filler = Filler(server.address)
        for round_ in range(args.rounds):
            server.flush()
            if args.case.endswith("consume"):
                filler.fill(args.events)
            start = time.perf_counter()
            if args.raw:
                _raw(args.case, server.address, args.events, args.size)
            else:
                _sb(args.case, server.address, args.events, args.size, not args.no_collect)
            seconds = time.perf_counter() - start
            print(f"round {round_ + 1}: {args.events / seconds:,.0f} events/s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
