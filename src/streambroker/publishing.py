"""Publishing events, one at a time or in batches (one round trip per pool), I/O-free.

Every event is encoded, and checked against the limits (see :mod:`.wire`), when it
is published or queued, so a refused event raises before anything is sent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._effects import Command, Op, Parallel, Send
from .core import BrokerCore
from .errors import BrokerError, InvalidArgumentError, ReplicationError
from .wire import encode_fields

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["BatchBuffer", "Replication", "publish", "replication"]


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


def _xadd(core: BrokerCore, stream: str, body: Any, meta: Mapping[str, str] | None) -> Command:
    """The ``XADD`` of one event; raises for an event that cannot be sent."""
    spec = core.stream(stream)
    fields = encode_fields(spec.name, body, meta, core.codec, core.max_body_size)
    return ("XADD", spec.key, "*", *fields)


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
    spec = core.stream(stream)
    commands = [_xadd(core, stream, body, meta)]
    if wait is not None:
        commands.append(wait.command)
    if not core.is_ready(spec.pool):
        yield from core.ensure_groups((spec.pool,))
    reply, *acknowledged = yield Send(spec.pool, commands)
    if core.observer is not None:
        core.observer.published(spec.pool, spec.name, 1)
    event_id: str = reply.decode()
    error = wait.error(spec.pool, acknowledged[0], [event_id]) if wait else None
    if error is not None:
        raise error
    return event_id


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
        self._commands: list[tuple[str, str, Command]] = []  # (pool, stream, XADD)
        self.ids: list[str] = []
        self._span: Span | None = None  # with tracing: the batch's PRODUCER span

    def __len__(self) -> int:
        return len(self._commands)

    def add(self, stream: str, body: Any, meta: Mapping[str, str] | None) -> None:
        """Encode one event now (errors raise here, nothing is sent) and queue it."""
        tracing = self._core.tracing
        if tracing is not None:
            spec = self._core.stream(stream)
            if self._span is None:
                server = self._core.registry.pools[spec.pool].server_address
                self._span = tracing.start_send(spec.name, server)
            meta = tracing.carrier(self._span, meta)
        command = _xadd(self._core, stream, body, meta)
        self._commands.append((self._core.registry.streams[stream].pool, stream, command))

    def discard(self, error: BaseException | None = None) -> None:
        """Drop the queued events unsent (the batch's block raised ``error``)."""
        self._commands.clear()
        self._end_span([], error)

    def _end_span(self, ids: list[str], error: BaseException | None) -> None:
        if self._span is not None and self._core.tracing is not None:
            streams = [stream for _, stream, _ in self._commands]
            self._core.tracing.finish_send(self._span, streams, ids, error)
            self._span = None

    def flush(self) -> Op[list[str]]:
        """Send every queued event, one pipeline per pool; returns all ids in order."""
        if not self._commands:
            return self.ids
        try:
            ids, acknowledged = yield from self._send()
        except BaseException as exc:
            self._end_span([], exc)
            raise
        error = None
        for pool, count in acknowledged.items():  # the events were written all the same
            written = [i for i, (p, _, _) in zip(ids, self._commands, strict=True) if p == pool]
            assert self._wait is not None
            error = error or self._wait.error(pool, count, written)
        self._end_span(ids, error)
        self._commands.clear()
        self.ids.extend(ids)
        if error is not None:
            raise error
        return ids

    def _send(self) -> Op[tuple[list[str], dict[str, int]]]:
        """Send the events; returns their ids and, per pool, how many replicas acknowledged
        them (when waiting for replicas)."""
        per_pool: dict[str, list[Command]] = {}
        for pool, _, command in self._commands:
            per_pool.setdefault(pool, []).append(command)
        yield from self._core.ensure_groups(per_pool)
        wait = self._wait
        extra = [wait.command] if wait is not None else []
        sends = [Send(pool, [*commands, *extra]) for pool, commands in per_pool.items()]
        results = yield Parallel(sends)
        replies = {send.pool: iter(result) for send, result in zip(sends, results, strict=True)}
        try:
            ids = [next(replies[pool]).decode() for pool, _, _ in self._commands]
        except StopIteration:
            raise BrokerError("a pool answered fewer replies than commands sent") from None
        observer = self._core.observer
        if observer is not None:
            for (pool, stream), count in Counter((p, s) for p, s, _ in self._commands).items():
                observer.published(pool, stream, count)
        acknowledged = {pool: next(replies[pool]) for pool in per_pool} if wait else {}
        return ids, acknowledged
