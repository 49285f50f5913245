"""The synchronous face: :class:`Broker`, :class:`Batch` and :class:`Consumer`.

Each method builds an operation of the I/O-free core and runs it with the
synchronous I/O layer; no broker logic lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from . import gc
from ._sync import SyncDriver
from .config import ValidatedRegistry
from .connection import ConnectionOptions
from .consuming import DEFAULT_BLOCK_TIMEOUT, ConsumerCore
from .core import DEFAULT_MAX_BODY_SIZE, BrokerCore
from .events import Event
from .publishing import BatchBuffer, publish

__all__ = ["Batch", "Broker", "Consumer", "Handler"]

#: A handler takes the events of one batch; its return value is ignored.
Handler = Callable[[list[Event]], object]

DEFAULT_CONSUMER = "consumer-1"


class Broker:
    """Publishes to and consumes from the registered streams (synchronous API).

    Options: ``codec`` (``"msgpack"``, the default, or ``"json"``) for the bodies it
    publishes; ``max_body_size`` (bytes, default 1 MiB) above which a body is refused
    before anything is sent; ``socket_timeout`` and ``connect_timeout`` (seconds).
    Connections are opened on first use; :meth:`close` (or ``with``) closes them.
    """

    def __init__(
        self,
        registry: ValidatedRegistry,
        *,
        codec: str = "msgpack",
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        socket_timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._core = BrokerCore(registry, codec=codec, max_body_size=max_body_size)
        self._driver = SyncDriver(registry, ConnectionOptions(socket_timeout, connect_timeout))

    @property
    def registry(self) -> ValidatedRegistry:
        """The registry this broker serves."""
        return self._core.registry

    def publish(self, stream: str, body: Any = None, meta: Mapping[str, str] | None = None) -> str:
        """Publish one event to ``stream``; returns its id (e.g. ``"1518951480106-0"``).

        ``body`` is any value the codec encodes (built-ins, dataclasses, msgspec Structs,
        pydantic models) or None; ``meta`` maps tag names to string values.
        """
        return self._driver.run(publish(self._core, stream, body, meta))

    def batch(self) -> Batch:
        """A batch of events sent together when its ``with`` block ends."""
        return Batch(self)

    def consumer(
        self,
        group: str,
        name: str = DEFAULT_CONSUMER,
        *,
        block_timeout: float = DEFAULT_BLOCK_TIMEOUT,
        collect: bool = True,
    ) -> Consumer:
        """A consumer named ``name`` of the registered consumer group ``group``.

        ``block_timeout`` (seconds) is the longest a blocking read waits before the
        consumer looks again whether it was stopped. With ``collect`` (the default),
        each acknowledgement also removes the events every group has acknowledged.
        """
        return Consumer(self, ConsumerCore(self._core, group, name, block_timeout, collect))

    def collect_garbage(self, *streams: str) -> dict[str, int]:
        """Remove the events every registered group acknowledged, now.

        Collects the given streams, or all registered streams; returns how many events
        were removed from each.
        """
        return self._driver.run(gc.collect(self._core, streams))

    def close(self) -> None:
        """Close every connection of this broker."""
        self._driver.close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Batch:
    """Events published together: one pipelined round trip per pool.

    Each :meth:`publish` encodes its event at once (a bad body raises there). The
    events are sent when the ``with`` block ends without an error; if the block
    raises, nothing is sent. :attr:`ids` then lists the ids in publish order.
    """

    def __init__(self, broker: Broker) -> None:
        self._driver = broker._driver
        self._buffer = BatchBuffer(broker._core)

    @property
    def ids(self) -> list[str]:
        """The ids of the events sent so far, in publish order."""
        return self._buffer.ids

    def __len__(self) -> int:
        return len(self._buffer)

    def publish(self, stream: str, body: Any = None, meta: Mapping[str, str] | None = None) -> None:
        """Queue one event (see :meth:`Broker.publish`)."""
        self._buffer.add(stream, body, meta)

    def flush(self) -> list[str]:
        """Send the queued events now; returns their ids."""
        return self._driver.run(self._buffer.flush())

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()


class Consumer:
    """One named consumer of a consumer group."""

    def __init__(self, broker: Broker, core: ConsumerCore) -> None:
        self._driver = broker._driver
        self._core = core

    def __repr__(self) -> str:
        return f"Consumer(group={self.group!r}, name={self.name!r})"

    @property
    def group(self) -> str:
        """The consumer group's name."""
        return self._core.group

    @property
    def name(self) -> str:
        """This consumer's name within its group."""
        return self._core.name

    def consume(self, handler: Handler, count: int = 10, *, block: bool = True) -> int:
        """Hand the group's events to ``handler``, at most ``count`` per call.

        With ``block=True`` it waits for new events until :meth:`stop` is called; with
        ``block=False`` it handles what is available now and returns. Events the
        handler did not :meth:`~Event.ack` are acknowledged when it returns; if it
        raises, those stay pending (delivered again) and the error propagates.
        Returns the number of events handled.
        """
        self._core.check_count(count)
        return self._driver.run(self._core.consume(count, block), handler)

    def stop(self) -> None:
        """Make a running :meth:`consume` return once the batch in hand is handled.

        Safe to call from another thread or a signal handler.
        """
        self._core.stopping = True
