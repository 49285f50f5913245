"""The synchronous face: :class:`Broker`, :class:`Batch` and :class:`Consumer`.

Each method builds an operation of the I/O-free core and runs it with the
synchronous I/O layer; no broker logic lives here.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from types import FrameType
from typing import Any, Unpack

from ._face import DEFAULT_CONSUMER, BatchFace, BrokerFace, ConsumerFace, ConsumerSettings
from .config.registry import FACES, ValidatedRegistry
from .core import admin, consuming, deadletters, gc, reading, scripts, stats
from .core.deadletters import DeadLetter
from .core.publishing import Replication, publish
from .core.stats import GroupStats, StreamStats
from .io.connection import ConnectionOptions
from .io.sync import SyncDriver
from .wire.events import Event

__all__ = ["Batch", "Broker", "Consumer", "Handler"]

#: A handler takes the events of one batch; its return value is ignored.
Handler = Callable[[list[Event]], object]

log = logging.getLogger("streambroker.consumer")


class Broker(BrokerFace[SyncDriver]):
    """Publishes to and consumes from the registered streams (synchronous API).

    Options: ``codec`` (``"msgpack"``, the default, or ``"json"``) for the bodies it
    publishes; ``max_body_size`` (bytes, default 1 MiB) above which an event is
    refused before anything is sent, counting its encoded body and every meta tag's
    name and value; ``max_entry_size`` (bytes, default 8 MiB, at least
    ``max_body_size``, with 64 bytes more allowed for the reserved fields) above which
    an entry of a stream is never read (consumers set it aside as a dead letter,
    unread; :meth:`read` raises
    :class:`~streambroker.EntryTooLargeError` at it); ``socket_timeout`` and
    ``connect_timeout`` (seconds). Connections are opened on first use; :meth:`close`
    (or ``with``) closes them. A broker may be shared by threads.
    """

    def _make_driver(
        self, registry: ValidatedRegistry, connection: ConnectionOptions
    ) -> SyncDriver:
        return SyncDriver(registry, connection)

    def publish(
        self,
        stream: str,
        body: Any = None,
        meta: Mapping[str, str] | None = None,
        *,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> str:
        """Publish one event to ``stream``; returns its id (e.g. ``"1518951480106-0"``).

        ``body`` is any value the codec encodes (built-ins, dataclasses, msgspec Structs,
        pydantic models) or None; ``meta`` maps tag names to string values.
        With ``wait_replicas=N``, the same round trip waits (``WAIT``) until ``N`` replicas
        acknowledged the event, ``wait_timeout`` seconds at most (default 1), and raises
        :class:`~streambroker.ReplicationError` when fewer did: the event is on the master
        but a failover may lose it.
        """
        wait = self._replication(wait_replicas, wait_timeout)
        return self._driver.run(publish(self._core, stream, body, meta, wait))

    def batch(self, *, wait_replicas: int = 0, wait_timeout: float = 1.0) -> Batch:
        """A batch of events sent together when its ``with`` block ends (``wait_replicas``
        and ``wait_timeout``: as for :meth:`publish`, for each pool's events)."""
        return Batch(self, self._replication(wait_replicas, wait_timeout))

    def read(
        self, stream: str, after: str = "0", *, count: int = 100, block: float | None = None
    ) -> list[Event]:
        """Up to ``count`` events of ``stream`` with ids above ``after``, oldest first,
        read without a consumer group: nothing is acknowledged or recorded, and
        ``ack()`` / ``fail()`` on these events do nothing.

        Pass the last id read as ``after`` to go on; start from
        ``stream_stats(stream).last_id`` to see only events published from then on.
        With ``block`` (seconds), waits that long at most when there is no event yet.
        """
        return self._driver.run(
            reading.read(self._core, stream, after, count, block, self._connection.socket_timeout)
        )

    def latest(self, stream: str, count: int = 10) -> list[Event]:
        """The newest ``count`` events of ``stream``, oldest first, read without a group
        (as :meth:`read`); go on with :meth:`read` after the last one's id."""
        return self._driver.run(reading.latest(self._core, stream, count))

    def consumer(
        self, group: str, name: str = DEFAULT_CONSUMER, **options: Unpack[ConsumerSettings]
    ) -> Consumer:
        """A consumer named ``name`` of the registered consumer group ``group``.

        Options: ``block_timeout``, ``collect``, ``retry_after``, ``lease``,
        ``max_deliveries``, ``retry_delay``, ``forget_after`` (see
        :class:`ConsumerSettings`).
        """
        return Consumer(self, self._consumer_core(group, name, options))

    def collect_garbage(self, *streams: str) -> dict[str, int]:
        """Remove the events every registered group acknowledged, now.

        Collects the given streams, or all registered streams; returns how many events
        were removed from each.
        """
        return self._driver.run(gc.collect(self._core, streams))

    def dead_letters(self, stream: str, group: str, limit: int = 1000) -> list[DeadLetter]:
        """The dead letters ``group`` set aside from ``stream``, oldest first."""
        return self._driver.run(deadletters.list_dead_letters(self._core, stream, group, limit))

    def replay_dead_letters(self, stream: str, group: str) -> int:
        """Deliver ``group``'s dead letters from ``stream`` again, to that group only.

        Returns how many were put back; they leave the dead letters.
        """
        return self._driver.run(deadletters.replay_dead_letters(self._core, stream, group))

    def replay_dead_letter(self, stream: str, group: str, letter_id: str) -> bool:
        """Deliver one dead letter (by its :attr:`DeadLetter.id`) again, to ``group`` only.

        Returns False when there is no such dead letter (replayed or deleted already).
        """
        return self._driver.run(
            deadletters.replay_dead_letter(self._core, stream, group, letter_id)
        )

    def delete_dead_letter(self, stream: str, group: str, letter_id: str) -> bool:
        """Delete one dead letter (by its :attr:`DeadLetter.id`) for good.

        Returns False when there is no such dead letter.
        """
        return self._driver.run(
            deadletters.delete_dead_letter(self._core, stream, group, letter_id)
        )

    def reset_group(self, stream: str, group: str, to: str) -> None:
        """Move ``group``'s position on ``stream``: the events with ids above ``to`` are
        delivered next (``"0"``: every event again; ``"$"``: only those published from now).

        Pending events stay pending, with the consumers that hold them.
        """
        self._driver.run(admin.reset_group(self._core, stream, group, to))

    def delete_group(self, stream: str, group: str) -> bool:
        """Delete a consumer group of ``stream`` that is not registered (an orphan group
        of :class:`StreamStats`), with its pending events, replay stream and dead letters.

        Returns False when the stream has no such group; refuses a registered group.
        """
        return self._driver.run(admin.delete_group(self._core, stream, group))

    def purge(self, stream: str) -> int:
        """Delete every event of ``stream`` (and of its groups' replay streams) now;
        returns how many. The groups and their dead letters stay."""
        return self._driver.run(admin.purge_stream(self._core, stream))

    def stats(self, *streams: str) -> list[StreamStats]:
        """Statistics of the given streams (all registered streams when none given)."""
        return self._driver.run(stats.collect_stats(self._core, streams))

    def stream_stats(self, stream: str) -> StreamStats:
        """Statistics of one stream, its groups and their consumers."""
        return self._driver.run(stats.stream_stats(self._core, stream))

    def group_stats(self, stream: str, group: str) -> GroupStats:
        """Statistics of one group on one stream."""
        return self._driver.run(stats.group_stats(self._core, stream, group))

    def remove_consumer(self, group: str, name: str, to: str | None = None) -> int:
        """Delete a stopped consumer from its group, without losing its pending events.

        They are moved to ``to``, or to a live consumer of the group, first; returns
        how many were moved. Refuses while the consumer runs, and when it holds
        pending events that nobody can take.
        """
        return self._driver.run(consuming.remove_consumer(self._core, group, name, to))

    def load_scripts(self) -> dict[str, int]:
        """Load every server-side script of the broker on every pool (``SCRIPT LOAD``).

        Scripts go out by their SHA1 (``EVALSHA``), and with their text (``EVAL``)
        only when a server lacks one; a user allowed ``EVALSHA`` but not ``EVAL``
        works once an administrator loaded them, after each server restart or
        ``SCRIPT FLUSH``. Returns how many scripts were loaded on each pool.
        """
        return self._driver.run(scripts.load_scripts(self._core))

    def close(self) -> None:
        """Close every connection of this broker."""
        self._driver.close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Batch(BatchFace):
    """Events published together: one pipelined round trip per pool.

    Each :meth:`publish` encodes its event at once (a bad body raises there). The
    events are sent when the ``with`` block ends without an error; if the block
    raises, nothing is sent. :attr:`ids` then lists the ids in publish order.
    """

    def __init__(self, broker: Broker, wait: Replication | None = None) -> None:
        super().__init__(broker, wait)
        self._driver = broker._driver

    def flush(self) -> list[str]:
        """Send the queued events now; returns their ids."""
        return self._driver.run(self._buffer.flush())

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, *rest: object
    ) -> None:
        if exc_type is None:
            self.flush()
        else:
            self._buffer.discard(exc)


class Consumer(ConsumerFace):
    """One named consumer of a consumer group."""

    def __init__(self, broker: Broker, core: consuming.ConsumerCore) -> None:
        super().__init__(core)
        self._driver = broker._driver
        self._wake = threading.Event()

    def consume(
        self,
        handler: Handler,
        count: int = 10,
        *,
        block: bool = True,
        handle_signals: bool | None = None,
    ) -> int:
        """Hand the group's events to ``handler``, at most ``count`` per call.

        With ``block=True`` it waits for new events until :meth:`stop` is called; with
        ``block=False`` it handles what is available now and returns. Events the
        handler did not :meth:`~Event.ack` or :meth:`~Event.fail` are acknowledged when
        it returns; if it raises, those stay pending (delivered again) and the error
        propagates. Returns the number of events handled.

        Only one process at a time may consume under one group and name
        (:class:`ConsumerBusyError`). ``handle_signals`` (default: when called in the
        main thread) makes SIGTERM and SIGINT stop the consumer gracefully.
        """
        self._core.check_handler(handler)
        self._core.check_count(count)
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        self._wake.clear()
        with _StopOnSignals(self.stop) if handle_signals else nullcontext():
            return self._driver.run(self._core.consume(count, block), handler, self._wake)

    def stop(self) -> None:
        """Make a running :meth:`consume` return once the batch in hand is handled.

        Safe to call from another thread or a signal handler.
        """
        self._core.stopping = True
        self._wake.set()

    def claim(self, from_name: str, to_name: str, *, force: bool = False) -> int:
        """Move every pending event of consumer ``from_name`` to ``to_name``.

        For scaling down by hand; refuses while ``from_name`` runs unless ``force``.
        Returns how many events were moved.
        """
        return self._driver.run(
            consuming.claim(self._core.core, self.group, from_name, to_name, force)
        )

    def leave(self) -> list[str]:
        """Delete this stopped consumer from its group, where it holds nothing pending.

        As a consumer leaving its group when it shuts down (a worker's consumers do so
        when they stop): it no longer shows in the group's consumers. Returns the
        streams where it stays because it still holds pending events there; a live
        consumer of the group takes those over once idle for ``retry_after``. Refuses
        (:class:`ConsumerBusyError`) while a consumer of this name runs.
        """
        return self._driver.run(consuming.leave(self._core.core, self.group, self.name))


class _StopOnSignals:
    """Within the block, SIGTERM and SIGINT call ``stop`` instead of killing the process."""

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping after the batch in hand", signal.Signals(signum).name)
        # Not stop() itself: the signal may interrupt this thread inside the wake-up
        # event's own lock (its wait()), which set() would then wait for forever.
        threading.Thread(target=self._stop, name="streambroker-stop").start()

    def __enter__(self) -> None:
        for sig in self._SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


FACES["sync"] = Broker
