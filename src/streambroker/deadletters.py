"""Dead letters: events that failed ``max_deliveries`` times, set aside per group. I/O-free.

Moving an event to the dead letters copies its entry to the group's dead-letter
stream (with ``$dead:*`` fields saying why) and acknowledges it, in one atomic
script, so it no longer holds the group or the garbage collector back. Replaying
moves the dead letters to the group's replay stream, which only that group reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._effects import Command, Op, Send
from .core import BrokerCore
from .events import Event
from .keys import dead_letter_key, replay_key

__all__ = ["DeadLetter", "dead_letter_command", "list_dead_letters", "replay_dead_letters"]

#: The longest error text kept with a dead letter.
MAX_ERROR_LENGTH = 2000

_DEAD = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
local entry = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])[1]
if entry then
  local fields, origin = {}, ARGV[3]
  for i = 1, #entry[2], 2 do
    local name = entry[2][i]
    if name == '$dead:id' then origin = entry[2][i + 1]
    elseif string.sub(name, 1, 6) ~= '$dead:' then
      table.insert(fields, name); table.insert(fields, entry[2][i + 1])
    end
  end
  for _, f in ipairs({'$dead:stream', ARGV[4], '$dead:group', ARGV[1], '$dead:id', origin,
                      '$dead:error', ARGV[5], '$dead:deliveries', ARGV[6]}) do
    table.insert(fields, f)
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

_REPLAY = """
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])
for _, e in ipairs(entries) do
  redis.call('XADD', KEYS[2], '*', unpack(e[2]))
  redis.call('XDEL', KEYS[1], e[1])
end
return #entries
"""

_PAGE = 1000


@dataclass(frozen=True)
class DeadLetter:
    """An event set aside after failing; ``event`` is as it was published."""

    id: str
    stream: str
    group: str
    event: Event
    error: str
    deliveries: int


def dead_letter_command(
    stream: str, key: str, group: str, consumer: str, event_id: str, error: str, deliveries: int
) -> Command:
    """Move one pending event of ``consumer`` to the dead letters; the reply is 1, or 0
    when the event is no longer this consumer's."""
    return (
        "EVAL",
        _DEAD,
        2,
        key,
        dead_letter_key(stream, group),
        group,
        consumer,
        event_id,
        stream,
        error[:MAX_ERROR_LENGTH],
        deliveries,
    )


def _field(fields: list[Any], name: bytes) -> str:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == name:
            return str(fields[i + 1].decode(errors="replace"))
    return ""


def list_dead_letters(
    core: BrokerCore, stream: str, group: str, limit: int = 1000
) -> Op[list[DeadLetter]]:
    """The oldest ``limit`` dead letters of ``group`` from ``stream``."""
    pool = core.stream_group(stream, group).pool
    (entries,) = yield Send(
        pool, [("XRANGE", dead_letter_key(stream, group), "-", "+", "COUNT", limit)]
    )
    letters = []
    for raw_id, fields in entries:
        origin = _field(fields, b"$dead:id")
        deliveries = _field(fields, b"$dead:deliveries")
        letters.append(
            DeadLetter(
                id=raw_id.decode(),
                stream=stream,
                group=group,
                event=Event(stream, origin, fields),
                error=_field(fields, b"$dead:error"),
                deliveries=int(deliveries) if deliveries.isdigit() else 0,
            )
        )
    return letters


def replay_dead_letters(core: BrokerCore, stream: str, group: str) -> Op[int]:
    """Deliver every dead letter of ``group`` from ``stream`` again, to that group only."""
    pool = core.stream_group(stream, group).pool
    yield from core.ensure_groups((pool,))
    moved = 0
    while True:
        (count,) = yield Send(
            pool,
            [
                (
                    "EVAL",
                    _REPLAY,
                    2,
                    dead_letter_key(stream, group),
                    replay_key(stream, group),
                    _PAGE,
                )
            ],
        )
        moved += int(count)
        if count < _PAGE:
            return moved
