"""Publishing events, one at a time or in batches (one round trip per pool), I/O-free.

Every event is encoded, and checked against the limits (see :mod:`.wire`), when it
is published or queued, so a refused event raises before anything is sent.

Publishers keep a stream with retention limits within them even when no consumer
runs: every :data:`COLLECT_EVERY_EVENTS` events of it that a broker publishes, and
with its first event :data:`COLLECT_EVERY_SECONDS` after the last time, the collect
script of :mod:`.gc` goes in the same round trip as the events. Streams without
limits are published exactly as before.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config.registry import StreamSpec
from ..errors import BrokerError, InvalidArgumentError, ReplicationError
from ..wire.entry import XaddPacker, xadd_packer
from .effects import AnyCommand, Command, Op, Parallel, ReplyError, Send, describe
from .gc import collected, stream_collect_command
from .state import BrokerCore

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = [
    "COLLECT_EVERY_EVENTS",
    "COLLECT_EVERY_SECONDS",
    "BatchBuffer",
    "Replication",
    "publish",
    "replication",
]

log = logging.getLogger("streambroker")

#: A broker's publishers of a stream with retention limits collect it after this many
#: of its events...
COLLECT_EVERY_EVENTS = 100
#: ...and with its first event this many seconds after they last did.
COLLECT_EVERY_SECONDS = 1.0


def _collect_due(core: BrokerCore, stream: str, events: int) -> bool:
    """Count ``events`` published to the limited ``stream``; whether to collect it now."""
    count, at = core.publisher_collects.get(stream, (0, 0.0))
    now = time.monotonic()
    if count + events >= COLLECT_EVERY_EVENTS or now >= at:
        core.publisher_collects[stream] = (0, now + COLLECT_EVERY_SECONDS)
        return True
    core.publisher_collects[stream] = (count + events, at)
    return False


def _publisher_collected(core: BrokerCore, spec: StreamSpec, reply: Any) -> None:
    """Take in the reply of a publisher's collection: the event was published whatever
    it says, so a refused collection is a warning."""
    try:
        if collected(spec.pool, spec, spec.groups, reply).more:
            core.publisher_collects[spec.name] = (COLLECT_EVERY_EVENTS, 0.0)  # again next time
    except BrokerError as exc:
        log.warning(
            "stream %s: its publisher could not apply its retention limits: %s", spec.name, exc
        )


def _packer(core: BrokerCore, stream: str) -> tuple[StreamSpec, XaddPacker]:
    """The spec of ``stream`` and what packs its ``XADD`` commands (made on first use);
    raises :class:`~streambroker.UnknownStreamError`."""
    try:
        return core.packers[stream]
    except (KeyError, TypeError):
        spec = core.stream(stream)
        packer = xadd_packer(spec.key, spec.name, core.codec, core.max_body_size)
        core.packers[stream] = spec, packer
        return spec, packer


def _check_published(pool: str, commands: list[AnyCommand], replies: list[Any]) -> None:
    """Raise for the first ``XADD`` refused among ``replies`` (sent with errors in place)."""
    for command, reply in zip(commands, replies, strict=False):
        if isinstance(reply, ReplyError):
            raise reply.error(pool, describe(command))


@dataclass(frozen=True, slots=True)
class Replication:
    """Wait until ``replicas`` replicas acknowledged the writes, ``timeout`` seconds at
    most (``WAIT``, sent in the same round trip as the writes)."""

    replicas: int
    timeout: float

    @property
    def command(self) -> Command:
        """The ``WAIT`` command (its timeout in milliseconds, never 0: that waits forever)."""
        return ("WAIT", self.replicas, max(1, round(self.timeout * 1000)))

    def error(self, pool: str, acknowledged: int, ids: list[str]) -> ReplicationError | None:
        """The error to raise when fewer replicas acknowledged ``ids`` than asked."""
        if acknowledged >= self.replicas:
            return None
        return ReplicationError(pool, ids, acknowledged, self.replicas, self.timeout)


def replication(replicas: object, timeout: object, socket_timeout: float) -> Replication | None:
    """The checked ``wait_replicas`` and ``wait_timeout`` options (None: do not wait)."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise InvalidArgumentError(f"wait_replicas must be an integer >= 0, got {replicas!r}")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < socket_timeout
    ):
        raise InvalidArgumentError(
            f"wait_timeout must be a number of seconds above 0 and below the broker's "
            f"socket_timeout ({socket_timeout:g}), got {timeout!r}"
        )
    return Replication(replicas, float(timeout)) if replicas else None


def publish(
    core: BrokerCore,
    stream: str,
    body: Any,
    meta: Mapping[str, str] | None,
    wait: Replication | None = None,
) -> Op[str]:
    """Publish one event; returns its id (``wait``: after replicas acknowledged it)."""
    if core.tracing is not None:
        return (yield from _traced(core, stream, body, meta, wait))
    return (yield from _publish(core, stream, body, meta, wait))


def _publish(
    core: BrokerCore,
    stream: str,
    body: Any,
    meta: Mapping[str, str] | None,
    wait: Replication | None,
) -> Op[str]:
    spec, pack = _packer(core, stream)
    command = pack(body, meta)
    commands: list[AnyCommand] = [command]
    collect = spec.limited and _collect_due(core, spec.name, 1)
    if collect:
        commands.append(stream_collect_command(spec))
    if wait is not None:
        commands.append(wait.command)
    reply, *others = yield Send(spec.pool, commands, allow_errors=collect)
    if collect:
        _check_published(spec.pool, [command], [reply])
        _publisher_collected(core, spec, others.pop(0))
    if core.observer is not None:
        core.observer.published(spec.pool, spec.name, 1)
    event_id: str = reply.decode()
    error = _replicated(wait, spec.pool, others, [event_id])
    if error is not None:
        raise error
    return event_id


def _replicated(
    wait: Replication | None, pool: str, replies: list[Any], ids: list[str]
) -> ReplicationError | None:
    """The error to raise when the ``WAIT`` of ``wait`` (its reply last of ``replies``)
    says fewer replicas acknowledged ``ids`` than asked; None when enough did."""
    if wait is None:
        return None
    acknowledged = replies[-1]
    if isinstance(acknowledged, ReplyError):
        raise acknowledged.error(pool, "WAIT")
    return wait.error(pool, int(acknowledged), ids)


def _traced(
    core: BrokerCore,
    stream: str,
    body: Any,
    meta: Mapping[str, str] | None,
    wait: Replication | None,
) -> Op[str]:
    """:func:`publish` inside a PRODUCER span whose context the event carries."""
    tracing = core.tracing
    assert tracing is not None
    spec = core.stream(stream)
    span = tracing.start_send(spec.name, core.registry.pools[spec.pool].server_address)
    try:
        event_id = yield from _publish(core, stream, body, tracing.carrier(span, meta), wait)
    except BaseException as exc:
        tracing.finish_send(span, [spec.name], [], exc)
        raise
    tracing.finish_send(span, [spec.name], [event_id], None)
    return event_id


class BatchBuffer:
    """Events encoded and waiting to be sent together; :meth:`flush` sends them."""

    def __init__(self, core: BrokerCore, wait: Replication | None = None) -> None:
        self._core = core
        self._wait = wait
        self._queued: dict[str, list[AnyCommand]] = {}  # per pool, the packed XADDs in order
        self._streams: list[str] = []  # the stream of each event, in publish order
        self.ids: list[str] = []
        self._span: Span | None = None  # with tracing: the batch's PRODUCER span
        self._limited: Counter[str] = Counter()  # events queued per stream with limits

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: str, body: Any, meta: Mapping[str, str] | None) -> None:
        """Encode one event now (errors raise here, nothing is sent) and queue it."""
        core = self._core
        try:
            spec, pack = core.packers[stream]
        except (KeyError, TypeError):
            spec, pack = _packer(core, stream)
        tracing = core.tracing
        if tracing is not None:
            if self._span is None:
                server = core.registry.pools[spec.pool].server_address
                self._span = tracing.start_send(spec.name, server)
            meta = tracing.carrier(self._span, meta)
        command = pack(body, meta)
        if spec.limited:
            self._limited[stream] += 1
        queue = self._queued.get(spec.pool)
        if queue is None:
            queue = self._queued[spec.pool] = []
        queue.append(command)
        self._streams.append(stream)

    def _clear(self) -> None:
        self._queued.clear()
        self._streams.clear()
        self._limited.clear()

    def discard(self, error: BaseException | None = None) -> None:
        """Drop the queued events unsent (the batch's block raised ``error``)."""
        self._clear()
        self._end_span([], error)

    def _end_span(self, ids: list[str], error: BaseException | None) -> None:
        if self._span is not None and self._core.tracing is not None:
            self._core.tracing.finish_send(self._span, list(self._streams), ids, error)
            self._span = None

    def _pools(self) -> list[str]:
        """The pool of each event queued, in publish order."""
        streams = self._core.registry.streams
        return [streams[stream].pool for stream in self._streams]

    def flush(self) -> Op[list[str]]:
        """Send every queued event, one pipeline per pool; returns all ids in order."""
        if not self._streams:
            return self.ids
        try:
            ids, replies_of = yield from self._send()
        except BaseException as exc:
            self._end_span([], exc)
            raise
        error = None
        pools = self._pools() if len(replies_of) > 1 else None  # None: all of one pool
        for pool, replies in replies_of.items():  # the events were written all the same
            written = [i for i, p in zip(ids, pools, strict=True) if p == pool] if pools else ids
            error = error or _replicated(self._wait, pool, replies, written)
        self._end_span(ids, error)
        self._clear()
        self.ids.extend(ids)
        if error is not None:
            raise error
        return ids

    def _due_collections(self) -> dict[str, list[StreamSpec]]:
        """Per pool, the limited streams of the batch its publisher collects now."""
        core = self._core
        due: dict[str, list[StreamSpec]] = {}
        for stream, count in self._limited.items():
            if _collect_due(core, stream, count):
                spec = core.registry.streams[stream]
                due.setdefault(spec.pool, []).append(spec)
        return due

    def _send(self) -> Op[tuple[list[str], dict[str, list[Any]]]]:
        """Send the events; returns their ids and, per pool, the replies of its round trip
        (the last one a ``WAIT``'s, when waiting for replicas)."""
        per_pool = self._queued
        collects = self._due_collections()
        wait = self._wait
        sends = []
        for pool, commands in per_pool.items():
            extra = [stream_collect_command(spec) for spec in collects.get(pool, ())]
            waiting = [wait.command] if wait is not None else []
            sends.append(Send(pool, [*commands, *extra, *waiting], allow_errors=bool(extra)))
        results = yield Parallel(sends)
        for send, result in zip(sends, results, strict=True):
            if send.allow_errors:
                _check_published(send.pool, per_pool[send.pool], result)
                sent, due = len(per_pool[send.pool]), collects.get(send.pool, [])
                for spec, reply in zip(due, result[sent : sent + len(due)], strict=True):
                    _publisher_collected(self._core, spec, reply)
        try:
            if len(sends) == 1:  # the usual batch: one reply per command, the XADDs' first
                ids = [reply.decode() for reply in results[0][: len(self._streams)]]
            else:
                replies = {s.pool: iter(result) for s, result in zip(sends, results, strict=True)}
                ids = [next(replies[pool]).decode() for pool in self._pools()]
        except StopIteration:
            raise BrokerError("a pool answered fewer replies than commands sent") from None
        observer = self._core.observer
        if observer is not None:
            streams = self._core.registry.streams
            for stream, count in Counter(self._streams).items():
                observer.published(streams[stream].pool, stream, count)
        return ids, {send.pool: result for send, result in zip(sends, results, strict=True)}
