"""Consuming a group's streams: reading, merging, handing to the handler, acking. I/O-free.

A consumer first re-reads its own pending events (delivered to it earlier, never
acknowledged), stream by stream, then new ones (``>``). Each pool is read with one
``XREADGROUP`` over its streams of the group; the pools are read in parallel and
the results merged in id order. Acknowledgements of a batch ride in the same
round trip as the next read of the pool, and are flushed before ``consume`` returns;
each stream's acknowledgement is followed by its garbage collection (``gc``), in the
same round trip.
"""

from __future__ import annotations

import logging
from typing import Any

from ._effects import Command, Handle, Op, Parallel, Send
from .config import StreamSpec, check_name
from .core import BrokerCore
from .errors import BrokerError, InvalidArgumentError
from .events import Event
from .gc import collect_command

__all__ = ["DEFAULT_BLOCK_TIMEOUT", "ConsumerCore"]

log = logging.getLogger("streambroker.consumer")

DEFAULT_BLOCK_TIMEOUT = 1.0
#: Blocking time per read when a group spans several pools, read in parallel: a
#: pool that has events answers at once, and this bounds how long the others hold
#: the batch back.
MULTI_POOL_BLOCK_MS = 100
_NEW = ">"


def _id_key(event: Event) -> tuple[int, int]:
    ms, _, seq = event.id.partition("-")
    return int(ms), int(seq or 0)


class ConsumerCore:
    """The state of one named consumer of a group, and its consume loop."""

    def __init__(
        self,
        core: BrokerCore,
        group: str,
        name: str,
        block_timeout: float = DEFAULT_BLOCK_TIMEOUT,
        collect: bool = True,
    ) -> None:
        problem = check_name("consumer", name)
        if problem:
            raise InvalidArgumentError(f"consumer group {group}: {problem}")
        if (
            isinstance(block_timeout, bool)
            or not isinstance(block_timeout, int | float)
            or (not 0 < block_timeout <= 60)
        ):
            raise InvalidArgumentError(
                f"consumer {name} of group {group}: block_timeout must be between 0 and 60 "
                f"seconds, got {block_timeout!r}"
            )
        self.core = core
        self.group = group
        self.name = name
        self.streams: tuple[StreamSpec, ...] = core.group_streams(group)
        self._by_pool: dict[str, list[str]] = {}
        for spec in self.streams:
            self._by_pool.setdefault(spec.pool, []).append(spec.name)
        self._block_ms = max(1, int(block_timeout * 1000))
        if len(self._by_pool) > 1:
            self._block_ms = min(self._block_ms, MULTI_POOL_BLOCK_MS)
        # Where each stream is read from: "0" and then the last pending id seen while
        # re-reading this consumer's own pending events, ">" (new events) after that.
        # Every consume() starts by re-reading.
        self._cursor: dict[str, str] = {spec.name: "0" for spec in self.streams}
        self._acks: dict[str, dict[str, list[str]]] = {pool: {} for pool in self._by_pool}
        self.stopping = False
        #: Whether acknowledging also removes what every group has acknowledged.
        self.collect = collect

    def check_count(self, count: object) -> int:
        """``count`` as a valid batch size, else :class:`InvalidArgumentError`."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidArgumentError(
                f"consumer {self.name} of group {self.group}: count must be an integer "
                f">= 1, got {count!r}"
            )
        return count

    def consume(self, count: int, block: bool) -> Op[int]:
        """Hand events to the handler until stopped (``block``) or none are left.

        Returns how many events were handled. When the handler raises, the events it
        acked are acknowledged, the others stay pending, and the error propagates.
        """
        self.check_count(count)
        yield from self.core.ensure_groups(self._by_pool)
        self._cursor = dict.fromkeys(self._cursor, "0")
        handled = 0
        try:
            while True:
                rereading = self._rereading()
                events = yield from self._read(count, block and not self.stopping)
                if events:
                    handled += yield from self._handle(events, count)
                elif not block and not rereading:
                    break
                if self.stopping:
                    break
        except BaseException:
            try:
                yield from self._flush_acks()
            except BrokerError as exc:
                log.warning(
                    "consumer %s of group %s: could not send acknowledgements (the events "
                    "will be delivered again): %s",
                    self.name,
                    self.group,
                    exc,
                )
            raise
        finally:
            self.stopping = False
        yield from self._flush_acks()
        return handled

    def _handle(self, events: list[Event], count: int) -> Op[int]:
        for start in range(0, len(events), count):
            chunk = events[start : start + count]
            try:
                yield Handle(chunk)
            except BaseException:
                self._queue_acks(event for event in chunk if event.acked)
                raise
            self._queue_acks(chunk)
        return len(events)

    def _queue_acks(self, events: Any) -> None:
        pools = self.core.registry.streams
        for event in events:
            self._acks[pools[event.stream].pool].setdefault(event.stream, []).append(event.id)

    def _ack_commands(self, pool: str) -> list[Command]:
        """The pool's pending acknowledgements, each followed by a collection of its stream."""
        commands: list[Command] = []
        for stream, ids in self._acks[pool].items():
            if ids:
                commands.append(("XACK", stream, self.group, *ids))
                if self.collect:
                    commands.append(collect_command(self.core, stream))
        return commands

    def _flush_acks(self) -> Op[None]:
        sends = [
            Send(pool, commands) for pool in self._by_pool if (commands := self._ack_commands(pool))
        ]
        if sends:
            yield Parallel(sends)
            for send in sends:
                self._acks[send.pool].clear()

    def _rereading(self) -> bool:
        return any(cursor != _NEW for cursor in self._cursor.values())

    def _read_command(self, streams: list[str], count: int, block: bool) -> Command:
        cursors = [self._cursor[stream] for stream in streams]
        head: tuple[Any, ...] = ("XREADGROUP", "GROUP", self.group, self.name, "COUNT", count)
        if block:
            head += ("BLOCK", self._block_ms)
        return (*head, "STREAMS", *streams, *cursors)

    def _read(self, count: int, block: bool) -> Op[list[Event]]:
        # Re-reading pending events never blocks; only block once every stream reads new.
        block = block and not self._rereading()
        sends = []
        for pool, streams in self._by_pool.items():
            commands = self._ack_commands(pool)
            commands.append(self._read_command(streams, count, block))
            sends.append(Send(pool, commands))
        results = yield Parallel(sends)
        events: list[Event] = []
        contributing = 0
        for send, replies in zip(sends, results, strict=True):
            self._acks[send.pool].clear()
            before = len(events)
            self._parse(self._by_pool[send.pool], replies[-1], count, events)
            contributing += len(events) > before
        if contributing > 1:
            events.sort(key=_id_key)
        return events

    def _parse(self, streams: list[str], reply: Any, count: int, into: list[Event]) -> None:
        seen: set[str] = set()
        for raw_stream, entries in reply or ():
            stream = raw_stream.decode()
            seen.add(stream)
            rereading = self._cursor[stream] != _NEW
            for raw_id, fields in entries:
                event_id = raw_id.decode()
                if fields is None:
                    # A pending entry deleted or trimmed by someone else: nothing to
                    # hand over; acknowledge it so it stops being pending.
                    log.warning(
                        "stream %s, group %s: pending event %s was deleted from the stream; "
                        "acknowledging it",
                        stream,
                        self.group,
                        event_id,
                    )
                    self._acks[self.core.registry.streams[stream].pool].setdefault(
                        stream, []
                    ).append(event_id)
                    continue
                into.append(Event(stream, event_id, fields))
            if rereading:
                self._cursor[stream] = entries[-1][0].decode() if len(entries) >= count else _NEW
        for stream in streams:
            if stream not in seen:
                self._cursor[stream] = _NEW
