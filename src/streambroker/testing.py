"""Testing applications that use streambroker: a pytest plugin and helpers.

Installed with the package, the plugin gives every test suite the fixture
``streambroker_server``: the address of a fresh embedded server in a temporary
directory, stopped after the test, for ``Registry.register_redis``::

    def test_orders_are_billed(streambroker_server):
        registry = sb.Registry()
        registry.register_redis(streambroker_server)
        registry.register_stream("orders", "default", ["billing"])
        with sb.Broker(registry.validate()) as broker:
            broker.publish("orders", {"total": 3})
            broker.consumer("billing", "test").consume(bill, block=False)
            wait_drained(broker, "billing")

:func:`wait_drained` (and :func:`async_wait_drained`) wait until a group has read
and acknowledged every event of its streams.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator, Sequence

import pytest

from .async_broker import AsyncBroker
from .broker import Broker
from .core.stats import StreamStats
from .errors import BrokerError, InvalidArgumentError
from .io.embedded import EmbeddedServer

__all__ = ["DrainTimeoutError", "async_wait_drained", "streambroker_server", "wait_drained"]

#: Seconds between two looks at a group's figures.
_POLL = 0.02


class DrainTimeoutError(BrokerError, AssertionError):
    """A group still had events to read or acknowledge when the wait ran out.

    It is an ``AssertionError`` too, so pytest reports it as a failed test.
    """


@pytest.fixture
def streambroker_server() -> Iterator[str]:
    """The address (``embedded:DIR``) of a fresh embedded server, stopped after the test."""
    with tempfile.TemporaryDirectory(prefix="sb-") as directory:
        server = EmbeddedServer(directory)
        server.start()
        try:
            yield f"embedded:{directory}"
        finally:
            server.stop()


def _streams_of(broker: Broker | AsyncBroker, group: str) -> list[str]:
    try:
        return list(broker.registry.groups[group])
    except KeyError:
        raise InvalidArgumentError(f"consumer group {group!r} is not registered") from None


def _left(stats: Sequence[StreamStats], group: str) -> str | None:
    """What ``group`` still has to do on ``stats`` (None when drained)."""
    for stream in stats:
        for figures in stream.groups:
            if figures.group == group and (figures.lag or figures.pending):
                return (
                    f"consumer group {group!r} of stream {stream.stream!r} still has "
                    f"{figures.lag} unread and {figures.pending} unacknowledged events"
                )
    return None


def _timed_out(left: str, timeout: float) -> DrainTimeoutError:
    return DrainTimeoutError(f"after {timeout} s, {left}")


def wait_drained(broker: Broker, group: str, timeout: float = 10.0) -> None:
    """Wait until ``group`` read and acknowledged every event of its streams.

    Raises :class:`DrainTimeoutError` (an ``AssertionError``) naming the stream and
    what is left after ``timeout`` seconds.
    """
    streams = _streams_of(broker, group)
    deadline = time.monotonic() + timeout
    while (left := _left(broker.stats(*streams), group)) is not None:
        if time.monotonic() > deadline:
            raise _timed_out(left, timeout)
        time.sleep(_POLL)


async def async_wait_drained(broker: AsyncBroker, group: str, timeout: float = 10.0) -> None:
    """:func:`wait_drained` for an :class:`~streambroker.AsyncBroker`."""
    streams = _streams_of(broker, group)
    deadline = time.monotonic() + timeout
    while (left := _left(await broker.stats(*streams), group)) is not None:
        if time.monotonic() > deadline:
            raise _timed_out(left, timeout)
        await asyncio.sleep(_POLL)
