"""The asyncio face with coroutine handlers: what the sync facade cannot show."""

from __future__ import annotations

import asyncio

import pytest

import streambroker as sb

from .conftest import Server, wait_for

pytestmark = pytest.mark.anywhere

FAST: sb.ConsumerSettings = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.2}
#: Heartbeats every 0.33 s keep events that retry_after would give away after 1.5 s.
PATIENT: sb.ConsumerSettings = {**FAST, "retry_after": 1.5}


def ours(server: Server) -> int:
    """Connections the broker holds open on the server."""
    return sum(1 for c in server.client().client_list() if c.get("name") == "streambroker")


def test_coroutine_handlers_publish_batch_and_collect(
    config: sb.ValidatedRegistry, server: Server
) -> None:
    async def main() -> None:
        async with config.async_broker() as broker:
            first = await broker.publish("stream-a", {"n": 0}, meta={"v": "1"})
            async with broker.batch() as batch:
                for n in range(1, 5):
                    batch.publish("stream-a", {"n": n})
            assert len(batch.ids) == 4
            seen: list[tuple[str, object]] = []

            async def handler(events: list[sb.Event]) -> None:
                await asyncio.sleep(0)
                seen.extend((e.id, e.body) for e in events)

            for group in ("read-group-a", "read-group-ab"):
                handled = await broker.consumer(group).consume(handler, count=2, block=False)
                assert handled == 5
            assert seen[0] == (first, {"n": 0})
            assert [body for _, body in seen[:5]] == [{"n": n} for n in range(5)]
            stats = await broker.stream_stats("stream-a")
            assert stats.length == 0  # both groups acknowledged: collected
        wait_for(lambda: ours(server) == 0, what="connections closed")

    asyncio.run(main())


def test_cancelling_a_consumer_is_a_graceful_stop(
    config: sb.ValidatedRegistry, server: Server
) -> None:
    client = server.client()

    async def main() -> None:
        async with config.async_broker() as broker:
            ids = [await broker.publish("stream-a", n) for n in range(3)]
            started = asyncio.Event()

            async def stuck(events: list[sb.Event]) -> None:
                events[0].ack()
                started.set()
                await asyncio.Event().wait()

            consumer = broker.consumer("read-group-a", "cancelled", **FAST)
            task = asyncio.create_task(consumer.consume(stuck, count=3))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The acked event is acknowledged, the rest left pending, never half-acked.
            rows = client.xpending_range("stream-a", "read-group-a", "-", "+", 10)
            assert [r["message_id"].decode() for r in rows] == ids[1:]
            assert not client.exists("{sb:lease:12:read-group-a}:cancelled")  # name released

            # Cancelling a consumer waiting in a blocking read, again and again, leaves
            # no connection behind and the name free.
            baseline = ours(server)
            for _ in range(5):
                idle = broker.consumer("read-group-c", "waiting", **FAST)
                task = asyncio.create_task(idle.consume(stuck))
                while not server.client(3).exists("{sb:lease:12:read-group-c}:waiting"):
                    await asyncio.sleep(0.01)  # until the consumer runs
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert ours(server) <= baseline + 2
            assert not server.client(3).exists("{sb:lease:12:read-group-c}:waiting")

            # The cancelled consumer starts again with its pending events.
            handled: list[str] = []

            async def record(events: list[sb.Event]) -> None:
                handled.extend(e.id for e in events)

            assert await consumer.consume(record, block=False) == 2
            assert handled == ids[1:]
        wait_for(lambda: ours(server) == 0, what="connections closed")

    asyncio.run(main())


def test_stop_from_another_task(config: sb.ValidatedRegistry) -> None:
    async def main() -> None:
        async with config.async_broker() as broker:
            consumer = broker.consumer("read-group-c", **FAST)
            got: list[object] = []

            async def handler(events: list[sb.Event]) -> None:
                got.extend(e.body for e in events)
                await consumer.stop()

            task = asyncio.create_task(consumer.consume(handler))
            await broker.publish("stream-c", "x")
            assert await asyncio.wait_for(task, timeout=10) == 1
            assert got == ["x"]

    asyncio.run(main())


def test_a_slow_coroutine_handler_keeps_its_events(
    config: sb.ValidatedRegistry, server: Server
) -> None:
    async def main() -> None:
        async with config.async_broker() as broker:
            event_id = await broker.publish("stream-a", "slow")
            counts: list[int] = []
            others: list[str] = []

            async def slow(events: list[sb.Event]) -> None:
                counts.extend(e.delivery_count for e in events)
                await asyncio.sleep(4.5)  # three times retry_after

            async def other(events: list[sb.Event]) -> None:
                others.extend(e.id for e in events)

            slow_consumer = broker.consumer("read-group-a", "slow", **PATIENT)
            slow_task = asyncio.create_task(slow_consumer.consume(slow, block=False))

            async def holding() -> None:
                while not counts:
                    await asyncio.sleep(0.01)

            # The other consumer starts once the slow handler holds the event (else it
            # could read it first).
            await asyncio.wait_for(holding(), 20)
            helper = broker.consumer("read-group-a", "other", **PATIENT)
            helper_task = asyncio.create_task(helper.consume(other))
            handled = await slow_task
            await helper.stop()
            await helper_task
            assert handled == 1
            assert counts == [1]
            assert others == []  # never reclaimed while the handler ran
            assert event_id not in others
        assert server.client().xpending("stream-a", "read-group-a")["pending"] == 0

    asyncio.run(main())


def test_cancelled_round_trips_leave_the_next_ones_in_step(
    config: sb.ValidatedRegistry, server: Server
) -> None:
    client = server.client()

    def last_id() -> str:
        ((entry_id, _),) = client.xrevrange("stream-a", count=1)
        return str(entry_id.decode())

    async def main() -> None:
        async with config.async_broker() as broker:
            await broker.publish("stream-a", "ready")
            # Cancelled after 0, 1, 2, ... turns of the loop: before sending, while
            # writing, while waiting for the replies, or after them.
            for turns in range(12):
                for publish in (
                    broker.publish("stream-a", turns),
                    _batch_of_three(broker, turns),
                ):
                    task = asyncio.ensure_future(publish)
                    for _ in range(turns):
                        await asyncio.sleep(0)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    assert await broker.publish("stream-a", "check") == last_id()
                    async with broker.batch() as batch:
                        batch.publish("stream-a", "check")
                    assert batch.ids == [last_id()]

    asyncio.run(main())


async def _batch_of_three(broker: sb.AsyncBroker, n: int) -> None:
    async with broker.batch() as batch:
        for _ in range(3):
            batch.publish("stream-a", n)
