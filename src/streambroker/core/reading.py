"""Reading a stream without a consumer group: browsing and tailing. I/O-free.

Nothing is recorded on the server: any number of readers may read the same events,
which stay until the registered groups have settled them (garbage collection does
not wait for these readers).
"""

from __future__ import annotations

import re

from ..errors import EntryTooLargeError, InvalidArgumentError
from ..wire.events import Event
from .effects import Op, ReplyTooLargeError, Send, single
from .sizes import BUDGET_ENTRIES, entry_size, range_sizes_command, read_budget
from .state import BrokerCore

__all__ = ["latest", "read"]

_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


def read(
    core: BrokerCore,
    stream: str,
    after: str,
    count: int,
    block: float | None,
    socket_timeout: float,
) -> Op[list[Event]]:
    """Up to ``count`` events of ``stream`` with ids above ``after``, oldest first.

    With ``block`` (seconds), waits that long at most for an event when there is none.
    Stops before an entry larger than ``max_entry_size``; raises
    :class:`EntryTooLargeError` when it comes first.
    """
    spec = core.stream(stream)

    def fail(message: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"reading stream {stream}: {message}")

    if not isinstance(after, str) or not _ID.fullmatch(after):
        raise fail(f"after must be an event id such as '1518951480106-0' or '0', got {after!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise fail(f"count must be an integer >= 1, got {count!r}")
    command: tuple[str | int, ...] = ("XREAD", "COUNT", count)
    if block is not None:
        if isinstance(block, bool) or not isinstance(block, int | float) or block <= 0:
            raise fail(f"block must be a positive number of seconds or None, got {block!r}")
        if block >= socket_timeout:
            raise fail(
                f"block ({block} s) must be shorter than the broker's socket_timeout "
                f"({socket_timeout} s)"
            )
        command += ("BLOCK", max(1, int(block * 1000)))
    limit = core.entry_limit
    try:
        (reply,) = yield Send(
            spec.pool,
            ((*command, "STREAMS", spec.key, after),),
            budget=read_budget(count, limit),
        )
    except ReplyTooLargeError:
        # Measured on the server: the entries before the first one over the limit,
        # as many as a budget has room for, are read again.
        measure = range_sizes_command(spec.key, f"({after}", min(count, BUDGET_ENTRIES))
        (sizes,) = yield single(spec.pool, *measure)
        fit = 0
        for raw_id, size in sizes:
            if size > limit:
                if not fit:
                    raise EntryTooLargeError(
                        stream, raw_id.decode(), size, core.max_entry_size
                    ) from None
                break
            fit += 1
        if not fit:
            return []  # deleted meanwhile
        again = ("XREAD", "COUNT", fit, "STREAMS", spec.key, after)
        (reply,) = yield Send(spec.pool, (again,), budget=read_budget(fit, limit))
    events: list[Event] = []
    for _, entries in reply or ():
        for raw_id, fields in entries:
            size = entry_size(fields)
            if size > limit:
                if not events:
                    raise EntryTooLargeError(stream, raw_id.decode(), size, core.max_entry_size)
                return events  # the next read raises there
            events.append(Event(spec.name, raw_id.decode(), fields, spec.key))
    return events


def latest(core: BrokerCore, stream: str, count: int) -> Op[list[Event]]:
    """The newest ``count`` events of ``stream``, oldest first."""
    spec = core.stream(stream)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgumentError(
            f"reading stream {stream}: count must be an integer >= 1, got {count!r}"
        )
    (entries,) = yield Send(
        spec.pool,
        (("XREVRANGE", spec.key, "+", "-", "COUNT", count),),
        budget=read_budget(count, core.entry_limit),
    )
    return [
        Event(spec.name, raw_id.decode(), fields, spec.key) for raw_id, fields in reversed(entries)
    ]
