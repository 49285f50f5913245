"""Server-side scripts that hand pending events over with their delivery counts. I/O-free.

``XREADGROUP`` with ``>`` gives new events (delivered once). Every other way an event
comes to a consumer goes through one of these scripts, which return the entries
together with the server's delivery counter (each of them counts as a delivery:
nothing is claimed with ``JUSTID`` except by heartbeats and by
:func:`set_delivery_count_command`), and report entries deleted
from under a pending event (those are acknowledged, not retried forever).

Replies of the three delivering scripts: ``{entries, counts, gone, cursor}`` (the
reclaiming one adds the names of the consumers it forgot).

Lua in Redis and Valkey cannot pass more than about 8,000 values to one call
(``unpack`` fails with "too many results to unpack"), so every list of ids a script
hands to a command goes in pages of :data:`PAGE` (see :data:`PAGED`): a consumer's
``count`` may be 10,000.
"""

from __future__ import annotations

from .effects import Command, Script

__all__ = [
    "MAX_SCRIPT_BATCH",
    "PAGE",
    "PAGED",
    "ack_owned_command",
    "claim_all_command",
    "own_pending_command",
    "reclaim_command",
    "retry_command",
    "set_delivery_count_command",
    "touch_command",
]

#: The most entries one script call hands over: it bounds the work of one call,
#: which holds the server while it runs.
MAX_SCRIPT_BATCH = 1000

#: The most items of a list a script passes to one command.
PAGE = 1000

#: A Lua function for the scripts: ``paged(head, list, tail)`` calls
#: ``redis.call(head..., items..., tail...)`` for each page of at most :data:`PAGE`
#: items of ``list`` (none when it is empty) and returns the replies in order.
PAGED = f"""
local function paged(head, list, tail)
  local replies = {{}}
  for first = 1, #list, {PAGE} do
    local args = {{unpack(head)}}
    for i = first, math.min(first + {PAGE - 1}, #list) do args[#args + 1] = list[i] end
    for _, word in ipairs(tail) do args[#args + 1] = word end
    replies[#replies + 1] = redis.call(unpack(args))
  end
  return replies
end
"""

_CLAIMED = (
    PAGED
    + """
local function claimed(key, group, ids, counts)
  local entries, ncounts, seen, gone = {}, {}, {}, {}
  for _, page in ipairs(paged({'XCLAIM', key, group, ARGV[2], 0}, ids, {})) do
    for _, e in ipairs(page) do
      if e and e[2] then
        table.insert(entries, e)
        table.insert(ncounts, counts[e[1]] + 1)
        seen[e[1]] = true
      end
    end
  end
  for _, id in ipairs(ids) do
    if not seen[id] then table.insert(gone, id) end
  end
  paged({'XACK', key, group}, gone, {})
  return entries, ncounts, gone
end
"""
)

# This consumer's own pending events after the cursor ARGV[3] ("-" or "(id").
_OWN = Script(
    _CLAIMED
    + """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', ARGV[4], ARGV[2])
local ids, counts = {}, {}
for i, row in ipairs(rows) do ids[i] = row[1]; counts[row[1]] = row[4] end
local entries, ncounts, gone = claimed(KEYS[1], ARGV[1], ids, counts)
local cursor = ''
if #rows >= tonumber(ARGV[4]) then cursor = '(' .. ids[#ids] end
return {entries, ncounts, gone, cursor}
"""
)

# Events of any consumer of the group idle for ARGV[3] ms or more, from cursor ARGV[4].
# Once a scan is complete, other consumers idle for ARGV[6] ms (if > 0) holding
# nothing pending are deleted from the group; their names are the fifth item.
_RECLAIM = Script("""
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local entries, counts = {}, {}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    table.insert(entries, e)
    table.insert(counts, p[1] and p[1][4] or 1)
  end
end
local forgotten = {}
local forget = tonumber(ARGV[6])
if forget > 0 and r[1] == '0-0' then
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local info = {}
    for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
    if info['name'] ~= ARGV[2] and info['pending'] == 0 and info['idle'] >= forget then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
      table.insert(forgotten, info['name'])
    end
  end
end
return {entries, counts, r[3] or {}, r[1], forgotten}
""")

# The given pending events, again, if they are still this consumer's (retries).
_RETRY = Script(
    _CLAIMED
    + """
local ids, counts, lost = {}, {}, {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    table.insert(ids, ARGV[i]); counts[ARGV[i]] = p[1][4]
  else
    table.insert(lost, ARGV[i])
  end
end
local entries, ncounts, gone = claimed(KEYS[1], ARGV[1], ids, counts)
for _, id in ipairs(lost) do table.insert(gone, id) end
return {entries, ncounts, gone, ''}
"""
)

# For the given events (from ARGV[5]) that are still this consumer's: acknowledge
# them (ARGV[3] == 'ack'), keep them alive ('touch': resets the idle time without
# counting a delivery), or also set their delivery counter to ARGV[4] ('count').
# Returns the ids that are not this consumer's: another consumer took them over.
_OWNED = Script(
    PAGED
    + """
local owned, lost = {}, {}
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then table.insert(owned, ARGV[i])
  else table.insert(lost, ARGV[i]) end
end
if ARGV[3] == 'ack' then
  paged({'XACK', KEYS[1], ARGV[1]}, owned, {})
elseif ARGV[3] == 'touch' then
  paged({'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}, owned, {'JUSTID'})
else
  paged({'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}, owned, {'RETRYCOUNT', ARGV[4], 'JUSTID'})
end
return lost
"""
)

# Move up to ARGV[4] pending events of consumer ARGV[2] to consumer ARGV[3].
_CLAIM_ALL = Script(
    PAGED
    + """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[4], ARGV[2])
local ids = {}
for i, row in ipairs(rows) do ids[i] = row[1] end
paged({'XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0}, ids, {})
return #ids
"""
)


def own_pending_command(key: str, group: str, consumer: str, cursor: str, count: int) -> Command:
    """Hand this consumer's own pending events after ``cursor`` over again."""
    return ("EVALSHA", _OWN.sha, 1, key, group, consumer, cursor, min(count, MAX_SCRIPT_BATCH))


def reclaim_command(
    key: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int, forget_ms: int
) -> Command:
    """Take over events idle for ``min_idle_ms`` from any consumer of the group; at the
    end of a scan, forget the other consumers idle for ``forget_ms`` (0: never) that
    hold nothing pending."""
    batch = min(count, MAX_SCRIPT_BATCH)
    return ("EVALSHA", _RECLAIM.sha, 1, key, group, consumer, min_idle_ms, cursor, batch, forget_ms)


def retry_command(key: str, group: str, consumer: str, ids: list[str]) -> Command:
    """Deliver the given pending events again, where they are still this consumer's."""
    return ("EVALSHA", _RETRY.sha, 1, key, group, consumer, *ids)


def ack_owned_command(key: str, group: str, consumer: str, ids: list[str]) -> Command:
    """Acknowledge the events still held by this consumer; the reply lists the others."""
    return ("EVALSHA", _OWNED.sha, 1, key, group, consumer, "ack", 0, *ids)


def touch_command(key: str, group: str, consumer: str, ids: list[str]) -> Command:
    """Reset the idle time of the events still held; the reply lists the others."""
    return ("EVALSHA", _OWNED.sha, 1, key, group, consumer, "touch", 0, *ids)


def set_delivery_count_command(
    key: str, group: str, consumer: str, ids: list[str], count: int
) -> Command:
    """Set the server's delivery counter of the events still held to ``count``, without
    counting a delivery (``XCLAIM … RETRYCOUNT count JUSTID``: the owner stays, the idle
    time restarts); the reply lists the ids that are no longer this consumer's, which
    are left alone."""
    return ("EVALSHA", _OWNED.sha, 1, key, group, consumer, "count", count, *ids)


def claim_all_command(key: str, group: str, source: str, target: str) -> Command:
    """Move a page of ``source``'s pending events to ``target``; the reply is how many."""
    return ("EVALSHA", _CLAIM_ALL.sha, 1, key, group, source, target, MAX_SCRIPT_BATCH)
