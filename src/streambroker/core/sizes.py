"""The receive-side limit on entries: how large an entry is, and what a read may take. I/O-free.

A stream may hold entries written by other programs, of any size. The broker never
reads one larger than its ``max_entry_size`` into memory:

- Every round trip that reads entries carries a byte budget (:func:`read_budget`):
  room for :data:`BUDGET_ENTRIES` entries of the largest allowed size, or as many as
  the command may return when fewer. The I/O layers count the reply's bytes as they
  arrive and, past the budget, stop reading, drop the connection and raise
  :class:`~streambroker.core.effects.ReplyTooLargeError`; so a batch of legitimate big
  entries is split over several reads rather than refused.
- What went over is found on the server, by the scripts below, which measure entries
  without sending them: a consumer sets its own pending entries above the limit
  aside as dead letters (copied by the server), ``read`` stops before such an entry,
  and dead letters are listed in pages a budget holds, one above the limit without
  the event's fields.
- An entry read whole (the budget held) is measured again by :func:`entry_size`
  when the replies took more bytes than one entry may.

An entry's size is the bytes of its field names and values, plus
:data:`FIELD_CHARGE` bytes for each field beyond the :data:`FREE_FIELDS` any event
of the broker may have (many tiny fields cost far more memory than their bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..wire.entry import MAX_META_TAGS
from .effects import Command, Script

__all__ = [
    "BUDGET_ENTRIES",
    "DEFAULT_MAX_ENTRY_SIZE",
    "RESERVED_SIZE",
    "dead_letters_page_command",
    "entry_size",
    "oversized_pending_command",
    "range_sizes_command",
    "read_budget",
    "reply_budget",
    "too_large",
]

#: The default ``max_entry_size``, when ``max_body_size`` leaves room for it.
DEFAULT_MAX_ENTRY_SIZE = 8 << 20
#: What an entry of the broker holds beyond what ``max_body_size`` counts: the names
#: ``$body`` and ``$codec`` and the codec's name. An entry may be that much larger than
#: ``max_entry_size``, so that ``max_entry_size`` may be ``max_body_size``.
RESERVED_SIZE = 64
#: Entries of the largest allowed size one read's budget has room for.
BUDGET_ENTRIES = 4
#: Fields (name and value pairs) an entry has without being charged for them: the
#: meta tags of an event and its two reserved fields.
FREE_FIELDS = MAX_META_TAGS + 2
#: What each further field costs.
FIELD_CHARGE = 16
#: Room in a budget for what a command's reply holds besides entries.
_REPLY_SLACK = 64 << 10
#: Room per argument of a command (its reply may list that many ids).
_ARGUMENT_SLACK = 48
#: Entries one scan of a consumer's pending entries measures (the server copies each).
_SCAN_PAGE = 100

_ENTRY_SIZE = f"""
local function entry_size(fields)
  local size = 0
  for _, word in ipairs(fields) do size = size + #word end
  local extra = #fields / 2 - {FREE_FIELDS}
  if extra > 0 then size = size + extra * {FIELD_CHARGE} end
  return size
end
"""

# This consumer's pending entries after cursor ARGV[3] ("-" or "(id"), a page of them:
# those larger than ARGV[4] bytes, as {id, size, deliveries}, and where to go on ('' at
# the end).
_OVERSIZED_PENDING = Script(
    _ENTRY_SIZE
    + f"""
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', {_SCAN_PAGE}, ARGV[2])
local found = {{}}
for _, row in ipairs(rows) do
  local entry = redis.call('XRANGE', KEYS[1], row[1], row[1])[1]
  if entry then
    local size = entry_size(entry[2])
    if size > tonumber(ARGV[4]) then table.insert(found, {{row[1], size, row[4]}}) end
  end
end
local cursor = ''
if #rows >= {_SCAN_PAGE} then cursor = '(' .. rows[#rows][1] end
return {{found, cursor}}
"""
)

# The ids and sizes of up to ARGV[2] entries from ARGV[1] on, as {id, size}.
_RANGE_SIZES = Script(
    _ENTRY_SIZE
    + """
local sizes = {}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])) do
  table.insert(sizes, {entry[1], entry_size(entry[2])})
end
return sizes
"""
)

# Up to ARGV[2] dead letters from ARGV[1] on ("-" or "(id"), as many as ARGV[4] bytes
# hold (one at least): {entries, more}. A letter larger than ARGV[3] bytes comes with
# its own $dead:* fields only (why it is a dead letter), not the event's.
_DEAD_LETTERS_PAGE = Script(
    _ENTRY_SIZE
    + """
local limit, room = tonumber(ARGV[3]), tonumber(ARGV[4])
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
local out, total = {}, 0
for _, entry in ipairs(entries) do
  local size = entry_size(entry[2])
  if size > limit then
    local kept = {}
    for i = 1, #entry[2], 2 do
      local name = entry[2][i]
      if string.sub(name, 1, 6) == '$dead:' and name ~= '$dead:fields' then
        table.insert(kept, name); table.insert(kept, entry[2][i + 1])
      end
    end
    if entry_size(kept) > limit then kept = {} end
    entry = {entry[1], kept}
    size = entry_size(kept)
  end
  if #out > 0 and total + size > room then return {out, 1} end
  total = total + size
  table.insert(out, entry)
end
return {out, #entries == tonumber(ARGV[2]) and 1 or 0}
"""
)


def entry_size(fields: Sequence[bytes]) -> int:
    """The size of an entry of the flat field/value list ``fields``, as the limit counts it."""
    size = sum(map(len, fields))
    extra = len(fields) // 2 - FREE_FIELDS
    return size + extra * FIELD_CHARGE if extra > 0 else size


def _entry_budget(limit: int) -> int:
    # An entry's framing on the wire (a few bytes per field name and value) is not in
    # its size: an eighth more, and 64 KiB, are room for it.
    return limit + limit // 8 + (64 << 10)


def read_budget(entries: int, limit: int) -> int:
    """The bytes replies of at most ``entries`` entries of at most ``limit`` bytes may
    take in one round trip: room for :data:`BUDGET_ENTRIES` at most (more are split)."""
    return min(entries, BUDGET_ENTRIES) * _entry_budget(limit) + _REPLY_SLACK


def reply_budget(command: Command) -> int:
    """The bytes the reply to ``command``, which reads no entries, may take."""
    return _REPLY_SLACK + _ARGUMENT_SLACK * len(command)


def too_large(size: int, limit: int) -> str:
    """Why an entry of ``size`` bytes was not read (as a dead letter records it)."""
    return (
        f"the entry is {size} bytes, more than the max_entry_size limit of {limit} bytes; "
        "it was set aside without being read"
    )


def oversized_pending_command(
    key: str, group: str, consumer: str, cursor: str, limit: int
) -> Command:
    """Measure a page of ``consumer``'s pending entries after ``cursor`` on the server;
    the reply lists those over ``limit`` as ``[id, size, deliveries]``, and the cursor
    to go on from (empty at the end)."""
    return ("EVALSHA", _OVERSIZED_PENDING.sha, 1, key, group, consumer, cursor, limit)


def range_sizes_command(key: str, start: str, count: int) -> Command:
    """Measure up to ``count`` entries of ``key`` from ``start`` (``(id``: after it) on
    the server; the reply lists ``[id, size]`` for each."""
    return ("EVALSHA", _RANGE_SIZES.sha, 1, key, start, count)


def dead_letters_page_command(key: str, start: str, count: int, limit: int) -> Command:
    """Up to ``count`` dead letters of the stream ``key`` from ``start`` (``(id``: after
    it), as many as a read's budget has room for; one over ``limit`` comes with its
    ``$dead:*`` fields only. The reply is ``[entries, more]``."""
    room = BUDGET_ENTRIES * limit
    return ("EVALSHA", _DEAD_LETTERS_PAGE.sha, 1, key, start, count, limit, room)
