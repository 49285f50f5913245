"""The asyncio face: :class:`AsyncBroker`, :class:`AsyncBatch` and :class:`AsyncConsumer`.

The same operations as the synchronous face, as coroutines, run by the asyncio I/O
layer on the same I/O-free core; see :mod:`streambroker.broker` for the details of
each operation.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Unpack

from ._face import DEFAULT_CONSUMER, BatchFace, BrokerFace, ConsumerFace, ConsumerSettings
from .config.registry import FACES, ValidatedRegistry
from .core import admin, consuming, deadletters, gc, reading, scripts, stats
from .core.deadletters import DeadLetter
from .core.publishing import Replication, publish
from .core.stats import GroupStats, StreamStats
from .io.aio import AsyncDriver
from .io.connection import ConnectionOptions
from .wire.events import Event

__all__ = ["AsyncBatch", "AsyncBroker", "AsyncConsumer", "AsyncHandler"]

#: An asyncio handler; plain functions are accepted too, and run in a worker thread.
AsyncHandler = Callable[[list[Event]], Awaitable[object] | object]


class AsyncBroker(BrokerFace[AsyncDriver]):
    """Publishes to and consumes from the registered streams (asyncio API).

    The options are those of :class:`~streambroker.Broker`. Use it as
    ``async with config.async_broker() as broker:`` or call :meth:`close`.
    """

    def _make_driver(
        self, registry: ValidatedRegistry, connection: ConnectionOptions
    ) -> AsyncDriver:
        return AsyncDriver(registry, connection)

    async def publish(
        self,
        stream: str,
        body: Any = None,
        meta: Mapping[str, str] | None = None,
        *,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> str:
        """Publish one event; returns its id (as :meth:`Broker.publish`, with the same
        ``wait_replicas`` and ``wait_timeout``)."""
        wait = self._replication(wait_replicas, wait_timeout)
        return await self._driver.run(publish(self._core, stream, body, meta, wait))

    def batch(self, *, wait_replicas: int = 0, wait_timeout: float = 1.0) -> AsyncBatch:
        """A batch sent when its ``async with`` block ends (``wait_replicas``,
        ``wait_timeout``: as for :meth:`Broker.publish`, for each pool's events)."""
        return AsyncBatch(self, self._replication(wait_replicas, wait_timeout))

    async def read(
        self, stream: str, after: str = "0", *, count: int = 100, block: float | None = None
    ) -> list[Event]:
        """Events of ``stream`` above ``after``, without a group (as :meth:`Broker.read`)."""
        return await self._driver.run(
            reading.read(self._core, stream, after, count, block, self._connection.socket_timeout)
        )

    async def latest(self, stream: str, count: int = 10) -> list[Event]:
        """The newest ``count`` events of ``stream`` (as :meth:`Broker.latest`)."""
        return await self._driver.run(reading.latest(self._core, stream, count))

    def consumer(
        self, group: str, name: str = DEFAULT_CONSUMER, **options: Unpack[ConsumerSettings]
    ) -> AsyncConsumer:
        """A consumer of ``group`` (options as :meth:`Broker.consumer`)."""
        return AsyncConsumer(self, self._consumer_core(group, name, options))

    async def collect_garbage(self, *streams: str) -> dict[str, int]:
        """Remove what every group acknowledged; counts per stream."""
        return await self._driver.run(gc.collect(self._core, streams))

    async def dead_letters(self, stream: str, group: str, limit: int = 1000) -> list[DeadLetter]:
        """The dead letters of ``group`` from ``stream``, oldest first."""
        return await self._driver.run(
            deadletters.list_dead_letters(self._core, stream, group, limit)
        )

    async def replay_dead_letters(self, stream: str, group: str) -> int:
        """Put ``group``'s dead letters from ``stream`` back, for that group only."""
        return await self._driver.run(deadletters.replay_dead_letters(self._core, stream, group))

    async def replay_dead_letter(self, stream: str, group: str, letter_id: str) -> bool:
        """Put one dead letter back for ``group`` (as :meth:`Broker.replay_dead_letter`)."""
        return await self._driver.run(
            deadletters.replay_dead_letter(self._core, stream, group, letter_id)
        )

    async def delete_dead_letter(self, stream: str, group: str, letter_id: str) -> bool:
        """Delete one dead letter for good (as :meth:`Broker.delete_dead_letter`)."""
        return await self._driver.run(
            deadletters.delete_dead_letter(self._core, stream, group, letter_id)
        )

    async def reset_group(self, stream: str, group: str, to: str) -> None:
        """Move ``group``'s position on ``stream`` (as :meth:`Broker.reset_group`)."""
        await self._driver.run(admin.reset_group(self._core, stream, group, to))

    async def delete_group(self, stream: str, group: str) -> bool:
        """Delete an unregistered group of ``stream`` (as :meth:`Broker.delete_group`)."""
        return await self._driver.run(admin.delete_group(self._core, stream, group))

    async def purge(self, stream: str) -> int:
        """Delete every event of ``stream`` (as :meth:`Broker.purge`)."""
        return await self._driver.run(admin.purge_stream(self._core, stream))

    async def stats(self, *streams: str) -> list[StreamStats]:
        """Statistics of the given streams, or of all."""
        return await self._driver.run(stats.collect_stats(self._core, streams))

    async def stream_stats(self, stream: str) -> StreamStats:
        """Statistics of one stream."""
        return await self._driver.run(stats.stream_stats(self._core, stream))

    async def group_stats(self, stream: str, group: str) -> GroupStats:
        """Statistics of one group on one stream."""
        return await self._driver.run(stats.group_stats(self._core, stream, group))

    async def remove_consumer(self, group: str, name: str, to: str | None = None) -> int:
        """Delete a stopped consumer, moving its pending events first."""
        return await self._driver.run(consuming.remove_consumer(self._core, group, name, to))

    async def load_scripts(self) -> dict[str, int]:
        """Load every script on every pool (as :meth:`Broker.load_scripts`)."""
        return await self._driver.run(scripts.load_scripts(self._core))

    async def close(self) -> None:
        """Close every connection of this broker."""
        await self._driver.close()

    async def __aenter__(self) -> AsyncBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncBatch(BatchFace):
    """Events sent together (one pipelined round trip per pool) when the block ends.

    ``publish`` queues without waiting; nothing is sent if the block raises.
    """

    def __init__(self, broker: AsyncBroker, wait: Replication | None = None) -> None:
        super().__init__(broker, wait)
        self._driver = broker._driver

    async def flush(self) -> list[str]:
        """Send the queued events now; returns their ids."""
        return await self._driver.run(self._buffer.flush())

    async def __aenter__(self) -> AsyncBatch:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, *rest: object
    ) -> None:
        if exc_type is not None:
            self._buffer.discard(exc)
        else:
            await self.flush()


class AsyncConsumer(ConsumerFace):
    """One named consumer of a consumer group (asyncio)."""

    def __init__(self, broker: AsyncBroker, core: consuming.ConsumerCore) -> None:
        super().__init__(core)
        self._driver = broker._driver
        self._wake: asyncio.Event | None = None

    async def consume(
        self,
        handler: AsyncHandler,
        count: int = 10,
        *,
        block: bool = True,
        handle_signals: bool | None = None,
    ) -> int:
        """Hand the group's events to ``handler`` (as :meth:`Consumer.consume`).

        Cancelling the task is a graceful stop: the batch in hand is finished, or left
        pending if the handler itself was cancelled (a plain function, in its thread,
        cannot be: it is waited for); acknowledgements go out and the consumer name is
        released, then the cancellation propagates: the task ends cancelled.
        """
        self._core.check_handler(handler)
        self._core.check_count(count)
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._stop_now)
        try:
            return await self._driver.run(self._core.consume(count, block), handler, self._wake)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _stop_now(self) -> None:
        self._core.stopping = True
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        """Make a running :meth:`consume` return once the batch in hand is handled."""
        self._stop_now()

    async def claim(self, from_name: str, to_name: str, *, force: bool = False) -> int:
        """Move every pending event of ``from_name`` to ``to_name`` (as
        :meth:`Consumer.claim`)."""
        return await self._driver.run(
            consuming.claim(self._core.core, self.group, from_name, to_name, force)
        )

    async def leave(self) -> list[str]:
        """Delete this stopped consumer from its group (as :meth:`Consumer.leave`)."""
        return await self._driver.run(consuming.leave(self._core.core, self.group, self.name))


FACES["asyncio"] = AsyncBroker
