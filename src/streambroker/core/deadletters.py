"""Dead letters: events that failed ``max_deliveries`` times, set aside per group. I/O-free.

Moving an event to the dead letters copies its entry to the group's dead-letter
stream (with ``$dead:*`` fields saying why) and acknowledges it, in one atomic
script, so it no longer holds the group or the garbage collector back.

A script cannot pass more than about 8,000 values to one ``XADD``, so an entry with
more than :data:`MAX_COPIED_FIELDS` fields (only other programs write those: an
event carries at most ``MAX_META_TAGS`` meta tags) is not copied field by field: its
fields go into the one field ``$dead:fields``, as netstrings (``5:price,4:9.99,``),
and :func:`list_dead_letters` unpacks them.

Replaying moves the dead letters, oldest first, to the group's replay stream, which
only that group reads: a script moves those it can copy; each packed one is read
back and written whole by the broker, in a transaction with a script that removes
the dead letter (or, when another replay took it first, the copy). One dead letter
can also be replayed, or deleted for good, by its id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..config.registry import StreamSpec
from ..errors import DecodeError, InvalidArgumentError, ServerReplyError
from ..wire.events import Event
from ..wire.keys import dead_letter_key, replay_key
from .effects import Command, Op, Script, Send, single
from .sizes import dead_letters_page_command, read_budget
from .state import BrokerCore

__all__ = [
    "MAX_COPIED_FIELDS",
    "DeadLetter",
    "dead_letter_command",
    "delete_dead_letter",
    "list_dead_letters",
    "replay_dead_letter",
    "replay_dead_letters",
]

#: The longest error text kept with a dead letter.
MAX_ERROR_LENGTH = 2000
#: Entries with more fields than this are packed into ``$dead:fields``.
MAX_COPIED_FIELDS = 2000

_PREFIX = b"$dead:"
_PACKED = b"$dead:fields"
#: The ``$dead:*`` fields a dead letter adds to the original ones.
_ADDED_FIELDS = 5

# Copy pending event ARGV[3] of consumer ARGV[2] to the dead letters and acknowledge it.
# Fields of an earlier death (a replayed dead letter) are dropped, but its origin stays.
_DEAD = Script("""
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
  if #fields > 2 * tonumber(ARGV[7]) then
    local packed = {}
    for i, value in ipairs(fields) do packed[i] = #value .. ':' .. value .. ',' end
    fields = {'$dead:fields', table.concat(packed)}
  end
  for _, f in ipairs({'$dead:stream', ARGV[4], '$dead:group', ARGV[1], '$dead:id', origin,
                      '$dead:error', ARGV[5], '$dead:deliveries', ARGV[6]}) do
    table.insert(fields, f)
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
""")

# Move up to ARGV[1] dead letters, oldest first, until one that is packed or has more
# than ARGV[2] values. Returns {moved, more, id, fields}: ``more`` is 1 when dead letters
# may be left; ``id`` and ``fields`` are those of the letter it stopped at ('' and {}).
_REPLAY = Script("""
local limit = tonumber(ARGV[2])
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])
local moved = 0
for _, e in ipairs(entries) do
  local copy = #e[2] <= limit
  for i = 1, #e[2], 2 do
    if copy and e[2][i] == '$dead:fields' then copy = false end
  end
  if not copy then return {moved, 1, e[1], e[2]} end
  redis.call('XADD', KEYS[2], '*', unpack(e[2]))
  redis.call('XDEL', KEYS[1], e[1])
  moved = moved + 1
end
return {moved, #entries == tonumber(ARGV[1]) and 1 or 0, '', {}}
""")

# Run in a transaction right after the XADD of dead letter ARGV[1]'s copy (ARGV[2]
# values) to KEYS[2]: remove the dead letter, or, when another replay removed it
# first, the copy. Nothing is removed unless the copy is there.
_TAKE = """
local copy = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if not copy or #copy[2] ~= tonumber(ARGV[2]) then
  return redis.error_reply('the copy of dead letter ' .. ARGV[1] .. ' is not in the replay stream')
end
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then return 1 end
redis.call('XDEL', KEYS[2], copy[1])
return 0
"""

# Move dead letter ARGV[1] when a script can copy it (at most ARGV[2] values, not packed).
# Returns {1, {}} when moved, {0, {}} when there is no such dead letter, and {2, fields}
# when it must be replayed whole.
_REPLAY_ONE = Script("""
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])[1]
if not e then return {0, {}} end
if #e[2] > tonumber(ARGV[2]) then return {2, e[2]} end
for i = 1, #e[2], 2 do
  if e[2][i] == '$dead:fields' then return {2, e[2]} end
end
redis.call('XADD', KEYS[2], '*', unpack(e[2]))
redis.call('XDEL', KEYS[1], e[1])
return {1, {}}
""")

_PAGE = 1000
_LETTER_ID = re.compile(r"\d{1,20}-\d{1,20}")


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
    stream: StreamSpec,
    key: str,
    group: str,
    consumer: str,
    event_id: str,
    error: str,
    deliveries: int,
) -> Command:
    """Move one pending event of ``consumer`` to the dead letters; the reply is 1, or 0
    when the event is no longer this consumer's. ``key`` is the stream or replay key
    the event is pending in."""
    return (
        "EVALSHA",
        _DEAD.sha,
        2,
        key,
        dead_letter_key(stream, group),
        group,
        consumer,
        event_id,
        stream.name,
        error[:MAX_ERROR_LENGTH],
        deliveries,
        MAX_COPIED_FIELDS,
    )


def _netstrings(data: bytes) -> list[bytes] | None:
    """The values of concatenated netstrings, or None when ``data`` is not that."""
    values = []
    at = 0
    while at < len(data):
        colon = data.find(b":", at)
        digits = data[at:colon]
        if colon < 0 or not digits.isdigit():
            return None
        end = colon + 1 + int(digits)
        if data[end : end + 1] != b",":
            return None
        values.append(data[colon + 1 : end])
        at = end + 1
    return values


def _letter(
    stream: str, group: str, letter_id: str, fields: list[bytes]
) -> tuple[list[bytes], dict[bytes, bytes]]:
    """A dead letter's fields as (the event's own, unpacked; the ``$dead:*`` ones)."""
    original: list[bytes] = []
    dead: dict[bytes, bytes] = {}
    for i in range(0, len(fields) - 1, 2):
        name = fields[i]
        if name.startswith(_PREFIX):
            dead[name] = fields[i + 1]
        else:
            original += (name, fields[i + 1])
    packed = dead.pop(_PACKED, None)
    if packed is not None:
        values = _netstrings(packed)
        if values is None or len(values) % 2:
            raise DecodeError(
                f"stream {stream}, group {group}: dead letter {letter_id} has a "
                f"{_PACKED.decode()} field that is not a list of netstrings"
            )
        original = values + original
    return original, dead


def _text(dead: dict[bytes, bytes], name: bytes) -> str:
    return dead.get(name, b"").decode(errors="replace")


def list_dead_letters(
    core: BrokerCore, stream: str, group: str, limit: int = 1000
) -> Op[list[DeadLetter]]:
    """The oldest ``limit`` dead letters of ``group`` from ``stream``.

    A dead letter larger than ``max_entry_size`` is listed without the event's fields
    (its error says why it is a dead letter); it stays whole on the server.
    """
    spec = core.stream_group(stream, group)
    pool = spec.pool
    key = dead_letter_key(spec, group)
    entries: list[Any] = []
    start, more = "-", True
    while more and len(entries) < limit:
        count = limit - len(entries)
        page = dead_letters_page_command(key, start, count, core.entry_limit)
        (reply,) = yield Send(pool, [page], budget=read_budget(count, core.entry_limit))
        found, more = reply
        entries += found
        if found:
            start = "(" + found[-1][0].decode()
    letters = []
    for raw_id, fields in entries:
        letter_id = raw_id.decode()
        original, dead = _letter(stream, group, letter_id, fields)
        deliveries = _text(dead, b"$dead:deliveries")
        letters.append(
            DeadLetter(
                id=letter_id,
                stream=stream,
                group=group,
                event=Event(stream, _text(dead, b"$dead:id"), original),
                error=_text(dead, b"$dead:error"),
                deliveries=int(deliveries) if deliveries.isdigit() else 0,
            )
        )
    return letters


def replay_dead_letters(core: BrokerCore, stream: str, group: str) -> Op[int]:
    """Deliver every dead letter of ``group`` from ``stream`` again, to that group only."""
    spec = core.stream_group(stream, group)
    pool = spec.pool
    dead, replay = dead_letter_key(spec, group), replay_key(spec, group)
    yield from core.ensure_groups([(pool, replay, group)])  # the key it writes
    copied = 2 * (MAX_COPIED_FIELDS + _ADDED_FIELDS)
    moved = 0
    while True:
        (reply,) = yield single(pool, "EVALSHA", _REPLAY.sha, 2, dead, replay, _PAGE, copied)
        count, more, letter_id, fields = reply
        moved += int(count)
        if letter_id:
            moved += yield from _replay_whole(pool, spec, group, letter_id.decode(), fields)
        elif not more:
            return moved


def _letter_pool(core: BrokerCore, stream: str, group: str, letter_id: str) -> str:
    """The pool of ``stream``, checking ``group`` reads it and ``letter_id`` is an entry id."""
    pool = core.stream_group(stream, group).pool
    if not isinstance(letter_id, str) or not _LETTER_ID.fullmatch(letter_id):
        raise InvalidArgumentError(
            f"stream {stream}, group {group}: a dead letter id is a stream entry id such as "
            f"'1518951480106-0', got {letter_id!r}"
        )
    return pool


def replay_dead_letter(core: BrokerCore, stream: str, group: str, letter_id: str) -> Op[bool]:
    """Deliver the dead letter ``letter_id`` (its :attr:`DeadLetter.id`) of ``group`` from
    ``stream`` again, to that group only; False when there is no such dead letter."""
    pool = _letter_pool(core, stream, group, letter_id)
    spec = core.stream(stream)
    dead, replay = dead_letter_key(spec, group), replay_key(spec, group)
    yield from core.ensure_groups([(pool, replay, group)])  # the key it writes
    copied = 2 * (MAX_COPIED_FIELDS + _ADDED_FIELDS)
    (reply,) = yield single(pool, "EVALSHA", _REPLAY_ONE.sha, 2, dead, replay, letter_id, copied)
    outcome, fields = reply
    if int(outcome) == 2:
        return bool((yield from _replay_whole(pool, spec, group, letter_id, fields)))
    return bool(int(outcome))


def delete_dead_letter(core: BrokerCore, stream: str, group: str, letter_id: str) -> Op[bool]:
    """Delete the dead letter ``letter_id`` of ``group`` from ``stream`` for good; False
    when there is no such dead letter."""
    pool = _letter_pool(core, stream, group, letter_id)
    spec = core.stream(stream)
    (deleted,) = yield single(pool, "XDEL", dead_letter_key(spec, group), letter_id)
    return bool(int(deleted))


def _replay_whole(
    pool: str, spec: StreamSpec, group: str, letter_id: str, fields: list[bytes]
) -> Op[int]:
    """Replay one dead letter too large for a script to copy; 1, or 0 when another
    replay took it first."""
    stream = spec.name
    original, added = _letter(stream, group, letter_id, fields)
    entry = original + [word for item in added.items() for word in item]
    dead, replay = dead_letter_key(spec, group), replay_key(spec, group)
    # EVAL with the text, not EVALSHA: in a transaction a missing script fails alone
    # (NOSCRIPT) while the XADD is applied, and the copy would stay with the dead letter.
    replies = yield Send(
        pool,
        [
            ("MULTI",),
            ("XADD", replay, "*", *entry),
            ("EVAL", _TAKE, 2, dead, replay, letter_id, len(entry)),
            ("EXEC",),
        ],
    )
    results = replies[-1]
    for result in results:
        if isinstance(result, Exception):
            raise ServerReplyError(
                pool,
                f"cannot replay dead letter {letter_id} of group {group!r} from stream "
                f"{stream!r}: {result}",
            )
    return int(results[1])
