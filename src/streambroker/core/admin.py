"""Operators' changes to streams and groups: moving a group, deleting one, purging a
stream. I/O-free.
"""

from __future__ import annotations

import re

from ..errors import InvalidArgumentError
from ..wire.keys import dead_letter_key, replay_key
from .effects import Op, ReplyError, Send, single
from .state import BrokerCore

__all__ = ["delete_group", "purge_stream", "reset_group"]

_POSITION = re.compile(r"\$|\d{1,20}(-\d{1,20})?")


def reset_group(core: BrokerCore, stream: str, group: str, to: str) -> Op[None]:
    """Move ``group``'s position on ``stream`` (``XGROUP SETID``): it is delivered the
    events with ids above ``to`` next (``"0"``: every event again, ``"$"``: only new ones).

    Pending events stay pending, with the consumers that hold them.
    """
    spec = core.stream_group(stream, group)
    if not isinstance(to, str) or not _POSITION.fullmatch(to):
        raise InvalidArgumentError(
            f"consumer group {group!r} of stream {stream!r}: the position is an event id "
            f"such as '1518951480106-0', '0' or '$', got {to!r}"
        )
    yield from core.ensure_groups([(spec.pool, spec.key, group)])
    yield single(spec.pool, "XGROUP", "SETID", spec.key, group, to)


def delete_group(core: BrokerCore, stream: str, group: str) -> Op[bool]:
    """Delete the unregistered consumer group ``group`` of ``stream``, with its pending
    events, replay stream and dead letters; False when the stream has no such group.

    A group registered for the stream is refused: the next broker would create it again,
    from the beginning of the stream.
    """
    spec = core.stream(stream)
    if group in spec.groups:
        raise InvalidArgumentError(
            f"consumer group {group!r} is registered for stream {stream!r}: a broker would "
            "create it again, from the first event; remove it from the registry first"
        )
    commands = [
        ("XGROUP", "DESTROY", spec.key, group),
        ("DEL", replay_key(spec, group), dead_letter_key(spec, group)),
    ]
    destroyed, deleted = yield Send(spec.pool, commands, allow_errors=True)
    for command, reply in zip(commands, (destroyed, deleted), strict=True):
        # A stream that does not exist has no group to destroy.
        if isinstance(reply, ReplyError) and (reply.code or command[0] == "DEL"):
            raise reply.error(spec.pool, f"{command[0]} {command[1]} {stream}")
    return not isinstance(destroyed, ReplyError) and bool(destroyed)


def purge_stream(core: BrokerCore, stream: str) -> Op[int]:
    """Delete every event of ``stream`` and of its groups' replay streams; returns how many.

    The stream and its groups stay (events published later are delivered as usual), and
    so do the dead letters. Events pending when they were deleted are skipped by the
    consumers that hold them.
    """
    spec = core.stream(stream)
    keys = [spec.key, *(replay_key(spec, group) for group in spec.groups)]
    removed = yield Send(spec.pool, [("XTRIM", key, "MAXLEN", 0) for key in keys])
    return sum(int(count) for count in removed)
