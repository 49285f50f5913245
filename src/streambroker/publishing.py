"""Publishing events, one at a time or in batches (one round trip per pool), I/O-free.

Every event is encoded, and checked against the limits (see :mod:`.wire`), when it
is published or queued, so a refused event raises before anything is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._effects import Command, Op, Parallel, Send
from .core import BrokerCore
from .errors import BrokerError
from .wire import encode_fields

__all__ = ["BatchBuffer", "publish"]


def _xadd(core: BrokerCore, stream: str, body: Any, meta: Mapping[str, str] | None) -> Command:
    """The ``XADD`` of one event; raises for an event that cannot be sent."""
    spec = core.stream(stream)
    fields = encode_fields(spec.name, body, meta, core.codec, core.max_body_size)
    return ("XADD", spec.name, "*", *fields)


def publish(core: BrokerCore, stream: str, body: Any, meta: Mapping[str, str] | None) -> Op[str]:
    """Publish one event; returns its id."""
    spec = core.stream(stream)
    command = _xadd(core, stream, body, meta)
    (reply,) = yield Send(spec.pool, (command,))
    return reply.decode()  # type: ignore[no-any-return]


class BatchBuffer:
    """Events encoded and waiting to be sent together; :meth:`flush` sends them."""

    def __init__(self, core: BrokerCore) -> None:
        self._core = core
        self._commands: list[tuple[str, Command]] = []
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self._commands)

    def add(self, stream: str, body: Any, meta: Mapping[str, str] | None) -> None:
        """Encode one event now (errors raise here, nothing is sent) and queue it."""
        command = _xadd(self._core, stream, body, meta)
        self._commands.append((self._core.registry.streams[stream].pool, command))

    def flush(self) -> Op[list[str]]:
        """Send every queued event, one pipeline per pool; returns all ids in order."""
        if not self._commands:
            return self.ids
        per_pool: dict[str, list[Command]] = {}
        for pool, command in self._commands:
            per_pool.setdefault(pool, []).append(command)
        sends = [Send(pool, commands) for pool, commands in per_pool.items()]
        results = yield Parallel(sends)
        replies = {send.pool: iter(result) for send, result in zip(sends, results, strict=True)}
        try:
            ids = [next(replies[pool]).decode() for pool, _ in self._commands]
        except StopIteration:
            raise BrokerError("a pool answered fewer replies than commands sent") from None
        self._commands.clear()
        self.ids.extend(ids)
        return ids
