"""Garbage collection: remove the events every registered group has acknowledged. I/O-free.

One server-side script per stream computes what is safe and removes it atomically,
so consumers acking, claiming and collecting at once can never race it:

1. If a registered group is missing on the server, nothing is removed (it has not
   read anything yet).
2. The *trim point* is the lowest id any registered group still needs: its lowest
   pending id, or the id after its last delivered one when nothing is pending. Every
   entry below it was delivered to and acknowledged by every group, so one
   ``XTRIM MINID`` removes them, at a cost that depends on what is removed now, not
   on what was removed before.
3. Between the trim point and the lowest last-delivered id of all groups, entries
   were delivered to every group; those pending in none of them (acknowledged out of
   order, e.g. while an older event waits for a retry) are removed with ``XDEL``. This
   window holds only events in flight, and is scanned at most ``limit`` entries at a
   time.

Groups that exist on the server but are not registered are ignored: they never hold
events back. A stream's replay streams (dead letters put back for one group) are
collected with it, and counted in its figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._effects import Command, Op, Parallel, ReplyError, Script, Send
from .core import BrokerCore
from .keys import replay_key

__all__ = ["COLLECT_SCRIPT", "collect", "collect_command", "removed_count"]

#: Entries of the in-flight window examined by one script call.
WINDOW_LIMIT = 5000

COLLECT_SCRIPT = Script("""
local key = KEYS[1]
local limit = tonumber(ARGV[1])
if redis.call('EXISTS', key) == 0 then return {0, 0} end

local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function less(a_ms, a_seq, b_ms, b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end

local groups = {}
for _, info in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local g = {}
  for i = 1, #info, 2 do g[info[i]] = info[i + 1] end
  groups[g['name']] = g
end

local trim_ms, trim_seq, top_ms, top_seq
local pending_groups = {}
for i = 2, #ARGV do
  local name = ARGV[i]
  local g = groups[name]
  if g == nil then return {0, 0} end
  local last_ms, last_seq = parse(g['last-delivered-id'])
  if last_seq >= 9007199254740991 then return {0, 0} end
  local need_ms, need_seq = last_ms, last_seq + 1
  if g['pending'] > 0 then
    need_ms, need_seq = parse(redis.call('XPENDING', key, name)[2])
    table.insert(pending_groups, name)
  end
  if trim_ms == nil or less(need_ms, need_seq, trim_ms, trim_seq) then
    trim_ms, trim_seq = need_ms, need_seq
  end
  if top_ms == nil or less(last_ms, last_seq, top_ms, top_seq) then
    top_ms, top_seq = last_ms, last_seq
  end
end
if trim_ms == nil then return {0, 0} end

local trim = trim_ms .. '-' .. trim_seq
local removed = redis.call('XTRIM', key, 'MINID', trim)

local deleted = 0
if not less(top_ms, top_seq, trim_ms, trim_seq) and #pending_groups > 0 then
  local top = top_ms .. '-' .. top_seq
  local entries = redis.call('XRANGE', key, trim, top, 'COUNT', limit)
  if #entries > 0 then
    local last = entries[#entries][1]
    local held = {}
    for _, name in ipairs(pending_groups) do
      local from = trim
      while true do
        local page = redis.call('XPENDING', key, name, from, last, limit)
        for _, p in ipairs(page) do held[p[1]] = true end
        if #page < limit then break end
        from = '(' .. page[#page][1]
      end
    end
    local batch = {}
    for _, entry in ipairs(entries) do
      if not held[entry[1]] then
        table.insert(batch, entry[1])
        if #batch == 1000 then
          deleted = deleted + redis.call('XDEL', key, unpack(batch))
          batch = {}
        end
      end
    end
    if #batch > 0 then deleted = deleted + redis.call('XDEL', key, unpack(batch)) end
  end
end
return {removed, deleted}
""")


def collect_command(key: str, groups: Iterable[str], limit: int = WINDOW_LIMIT) -> Command:
    """The command that collects the stream ``key`` read by ``groups`` (its reply goes
    to :func:`removed_count`)."""
    return ("EVALSHA", COLLECT_SCRIPT.sha, 1, key, limit, *groups)


def removed_count(pool: str, stream: str, reply: Any) -> int:
    """How many events the collect script removed, from its reply."""
    if isinstance(reply, ReplyError):
        raise reply.error(pool, f"cannot collect stream {stream!r}")
    trimmed, deleted = reply
    return int(trimmed) + int(deleted)


def collect(core: BrokerCore, streams: Iterable[str]) -> Op[dict[str, int]]:
    """Remove every event all registered groups acknowledged; returns counts per stream.

    All registered streams when ``streams`` is empty; one pipeline per pool.
    """
    names = list(dict.fromkeys(streams)) or list(core.registry.streams)
    per_pool: dict[str, list[str]] = {}
    for name in names:
        per_pool.setdefault(core.stream(name).pool, []).append(name)
    plans: dict[str, list[tuple[str, Command]]] = {}
    for pool, pool_streams in per_pool.items():
        plan = plans[pool] = []
        for stream in pool_streams:
            spec = core.registry.streams[stream]
            plan.append((stream, collect_command(spec.key, spec.groups)))
            for group in spec.groups:
                plan.append((stream, collect_command(replay_key(spec, group), (group,))))
    sends = [
        Send(pool, [command for _, command in plan], allow_errors=True)
        for pool, plan in plans.items()
    ]
    results = yield Parallel(sends)
    removed = dict.fromkeys(names, 0)
    for send, replies in zip(sends, results, strict=True):
        for (stream, _), reply in zip(plans[send.pool], replies, strict=True):
            removed[stream] += removed_count(send.pool, stream, reply)
    if core.observer is not None:
        for stream, count in removed.items():
            core.observer.collected(core.registry.streams[stream].pool, stream, count)
    return removed
