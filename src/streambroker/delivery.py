"""Server-side scripts that hand pending events over with their delivery counts. I/O-free.

``XREADGROUP`` with ``>`` gives new events (delivered once). Every other way an event
comes to a consumer goes through one of these scripts, which return the entries
together with the server's delivery counter (each of them counts as a delivery:
nothing is claimed with ``JUSTID`` except heartbeats), and report entries deleted
from under a pending event (those are acknowledged, not retried forever).

Replies of the three delivering scripts: ``{entries, counts, gone, cursor}`` (the
reclaiming one adds the names of the consumers it forgot).
"""

from __future__ import annotations

from ._effects import Command

__all__ = [
    "MAX_SCRIPT_BATCH",
    "ack_owned_command",
    "claim_all_command",
    "own_pending_command",
    "reclaim_command",
    "retry_command",
    "set_delivery_count_command",
    "touch_command",
]

#: The most entries one script call hands over (bounded by Lua's unpack()).
MAX_SCRIPT_BATCH = 1000

_CLAIMED = """
local function claimed(key, group, ids, counts)
  local entries, ncounts, seen, gone = {}, {}, {}, {}
  if #ids > 0 then
    for _, e in ipairs(redis.call('XCLAIM', key, group, ARGV[2], 0, unpack(ids))) do
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
  if #gone > 0 then redis.call('XACK', key, group, unpack(gone)) end
  return entries, ncounts, gone
end
"""

# This consumer's own pending events after the cursor ARGV[3] ("-" or "(id").
_OWN = (
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
_RECLAIM = """
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
"""

# The given pending events, again, if they are still this consumer's (retries).
_RETRY = (
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

# Acknowledge (ARGV[3] == 'ack') or keep alive ('touch': resets the idle time
# without counting a delivery) the given events that are still this consumer's.
# Returns the ids that are not: another consumer took them over.
_OWNED = """
local owned, lost = {}, {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then table.insert(owned, ARGV[i])
  else table.insert(lost, ARGV[i]) end
end
if #owned > 0 then
  if ARGV[3] == 'ack' then
    redis.call('XACK', KEYS[1], ARGV[1], unpack(owned))
  elseif string.sub(ARGV[3], 1, 6) == 'count:' then
    table.insert(owned, 'RETRYCOUNT'); table.insert(owned, string.sub(ARGV[3], 7))
    table.insert(owned, 'JUSTID')
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(owned))
  else
    table.insert(owned, 'JUSTID')
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(owned))
  end
end
return lost
"""

# Move up to ARGV[4] pending events of consumer ARGV[2] to consumer ARGV[3].
_CLAIM_ALL = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[4], ARGV[2])
if #rows == 0 then return 0 end
local ids = {}
for i, row in ipairs(rows) do ids[i] = row[1] end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, unpack(ids))
return #ids
"""


def own_pending_command(key: str, group: str, consumer: str, cursor: str, count: int) -> Command:
    """Hand this consumer's own pending events after ``cursor`` over again."""
    return ("EVAL", _OWN, 1, key, group, consumer, cursor, min(count, MAX_SCRIPT_BATCH))


def reclaim_command(
    key: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int, forget_ms: int
) -> Command:
    """Take over events idle for ``min_idle_ms`` from any consumer of the group; at the
    end of a scan, forget the other consumers idle for ``forget_ms`` (0: never) that
    hold nothing pending."""
    batch = min(count, MAX_SCRIPT_BATCH)
    return ("EVAL", _RECLAIM, 1, key, group, consumer, min_idle_ms, cursor, batch, forget_ms)


def retry_command(key: str, group: str, consumer: str, ids: list[str]) -> Command:
    """Deliver the given pending events again, where they are still this consumer's."""
    return ("EVAL", _RETRY, 1, key, group, consumer, *ids)


def ack_owned_command(key: str, group: str, consumer: str, ids: list[str]) -> Command:
    """Acknowledge the events still held by this consumer; the reply lists the others."""
    return ("EVAL", _OWNED, 1, key, group, consumer, "ack", *ids)


def touch_command(key: str, group: str, consumer: str, ids: list[str]) -> Command:
    """Reset the idle time of the events still held; the reply lists the others."""
    return ("EVAL", _OWNED, 1, key, group, consumer, "touch", *ids)


def set_delivery_count_command(
    key: str, group: str, consumer: str, ids: list[str], count: int
) -> Command:
    """Set the delivery counter of the events still held; the reply lists the others."""
    return ("EVAL", _OWNED, 1, key, group, consumer, f"count:{count}", *ids)


def claim_all_command(key: str, group: str, source: str, target: str) -> Command:
    """Move a page of ``source``'s pending events to ``target``; the reply is how many."""
    return ("EVAL", _CLAIM_ALL, 1, key, group, source, target, MAX_SCRIPT_BATCH)
