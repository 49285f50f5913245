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

A stream with retention limits (``max_length``, ``max_age``) then loses its oldest
events past them, whoever still needs them, in the same call (at most ``limit`` of
them per call): the script counts, per registered group, the removed events it had
not read and those pending for it (and acknowledges those, so its pending list holds
no ids of removed entries), and :func:`collected` warns with the counts. Ages go by
the server's clock. Replay streams and dead letters have no limits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config.registry import StreamSpec
from ..wire.keys import replay_key
from .effects import Command, Op, Parallel, ReplyError, Script, Send
from .state import BrokerCore

__all__ = [
    "COLLECT_SCRIPT",
    "Collected",
    "collect",
    "collect_command",
    "collected",
    "stream_collect_command",
]

log = logging.getLogger("streambroker")

#: Entries of the in-flight window examined by one script call.
WINDOW_LIMIT = 5000

COLLECT_SCRIPT = Script("""
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local max_length = tonumber(ARGV[2])
local max_age = tonumber(ARGV[3])
if redis.call('EXISTS', key) == 0 then return {0, 0, 0, 0} end

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

-- Today's rule: a registered group missing on the server (or at the very last id)
-- holds everything back.
local trim_ms, trim_seq, top_ms, top_seq
local held_back = false
local pending_groups = {}
for i = 4, #ARGV do
  local name = ARGV[i]
  local g = groups[name]
  if g == nil then held_back = true break end
  local last_ms, last_seq = parse(g['last-delivered-id'])
  if last_seq >= 9007199254740991 then held_back = true break end
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

local removed, deleted = 0, 0
if trim_ms ~= nil and not held_back then
  local trim = trim_ms .. '-' .. trim_seq
  removed = redis.call('XTRIM', key, 'MINID', trim)
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
end
if max_length == 0 and max_age == 0 then return {removed, deleted, 0, 0} end

-- Retention limits: the oldest events past them go, at most limit per call, whoever
-- still needs them. Entries are walked from the start of what is left.
local excess = 0
if max_length > 0 then excess = math.max(0, redis.call('XLEN', key) - max_length) end
local oldest_ms
if max_age > 0 then
  local now = redis.call('TIME')
  oldest_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - max_age
end
local cut = {}
local cut_last
local from = '-'
local done = false
local step = 16
while not done and #cut < limit do
  local size = math.min(limit - #cut, math.max(excess - #cut, step))
  step = step * 2
  local page = redis.call('XRANGE', key, from, '+', 'COUNT', size)
  for _, entry in ipairs(page) do
    local id = entry[1]
    local ms, seq = parse(id)
    if #cut < excess or (oldest_ms ~= nil and ms < oldest_ms) then
      table.insert(cut, id)
      cut_last = id
    else
      done = true
      break
    end
  end
  if #page < size then done = true end
  if not done then from = '(' .. cut_last end
end
local more = 0
if #cut == limit and not done then more = 1 end
local reply = {removed, deleted, #cut, more}
if #cut == 0 then return reply end

local cut_ms, cut_seq = parse(cut_last)
local by_id = {}
for _, id in ipairs(cut) do by_id[id] = true end
for i = 4, #ARGV do
  local name = ARGV[i]
  local g = groups[name]
  local unread, pending = 0, 0
  if g == nil then
    unread = #cut
  else
    local last_ms, last_seq = parse(g['last-delivered-id'])
    for _, id in ipairs(cut) do
      local ms, seq = parse(id)
      if less(last_ms, last_seq, ms, seq) then unread = unread + 1 end
    end
    if g['pending'] > 0 then
      while true do
        local page = redis.call('XPENDING', key, name, '-', cut_last, limit)
        local ids = {}
        for _, p in ipairs(page) do
          table.insert(ids, p[1])
          if by_id[p[1]] then pending = pending + 1 end
        end
        if #ids > 0 then redis.call('XACK', key, name, unpack(ids)) end
        if #page < limit then break end
      end
    end
  end
  table.insert(reply, unread)
  table.insert(reply, pending)
end
local after = cut_ms .. '-' .. (cut_seq + 1)
if cut_seq >= 9007199254740991 then after = (cut_ms + 1) .. '-0' end
reply[3] = redis.call('XTRIM', key, 'MINID', after)
return reply
""")


@dataclass(frozen=True)
class Collected:
    """What one collection of a stream key removed.

    ``removed`` counts every event removed; ``past_limits`` those of them removed for
    the stream's retention limits, and ``lost`` what each group lost of those:
    ``(unread, pending)`` per group, for the groups that lost some. ``more``: the
    stream may still be past its limits (a collection removes at most
    :data:`WINDOW_LIMIT` events past them).
    """

    removed: int
    past_limits: int = 0
    lost: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    more: bool = False


def collect_command(
    key: str,
    groups: Iterable[str],
    limit: int = WINDOW_LIMIT,
    *,
    max_length: int | None = None,
    max_age: float | None = None,
) -> Command:
    """The command that collects the stream ``key`` read by ``groups``, within the
    retention limits given (its reply goes to :func:`collected`)."""
    age_ms = 0 if max_age is None else max(1, round(max_age * 1000))
    return ("EVALSHA", COLLECT_SCRIPT.sha, 1, key, limit, max_length or 0, age_ms, *groups)


def stream_collect_command(spec: StreamSpec) -> Command:
    """The command that collects the registered stream ``spec`` within its limits."""
    return collect_command(spec.key, spec.groups, max_length=spec.max_length, max_age=spec.max_age)


def collected(pool: str, spec: StreamSpec, groups: Sequence[str], reply: Any) -> Collected:
    """What the collect script removed from a key of ``spec`` read by ``groups``, from
    its reply; warns (logger ``streambroker``) when events past the limits went."""
    if isinstance(reply, ReplyError):
        raise reply.error(pool, f"cannot collect stream {spec.name!r}")
    trimmed, deleted, past, more, *losses = (int(value) for value in reply)
    # The counts per group come only when events past the limits went.
    lost = {
        group: (unread, pending)
        for group, unread, pending in zip(groups, losses[::2], losses[1::2], strict=False)
        if unread or pending
    }
    if past:
        limits = [f"max_length {spec.max_length}"] if spec.max_length is not None else []
        if spec.max_age is not None:
            limits.append(f"max_age {spec.max_age:g} s")
        held = "; ".join(
            f"group {group} lost {unread} unread and {pending} pending"
            for group, (unread, pending) in lost.items()
        )
        log.warning(
            "stream %s is past its retention limits (%s): removed its %d oldest events "
            "before every group acknowledged them: %s",
            spec.name,
            ", ".join(limits),
            past,
            held,
        )
    return Collected(trimmed + deleted + past, past, lost, bool(more))


def collect(core: BrokerCore, streams: Iterable[str]) -> Op[dict[str, int]]:
    """Remove every event all registered groups acknowledged, and those past the
    streams' retention limits; returns counts per stream.

    All registered streams when ``streams`` is empty; one pipeline per pool, repeated
    for the streams still past their limits (each round removes at most
    :data:`WINDOW_LIMIT` events past them per stream).
    """
    names = list(dict.fromkeys(streams)) or list(core.registry.streams)
    per_pool: dict[str, list[str]] = {}
    for name in names:
        per_pool.setdefault(core.stream(name).pool, []).append(name)
    collected_now = dict.fromkeys(names, 0)
    todo = names
    while todo:
        more = yield from _collect_once(core, todo, collected_now)
        todo = [name for name in todo if name in more]
    if core.observer is not None:
        for stream, count in collected_now.items():
            core.observer.collected(core.registry.streams[stream].pool, stream, count)
    return collected_now


def _collect_once(core: BrokerCore, names: list[str], removed: dict[str, int]) -> Op[set[str]]:
    """Collect ``names`` once, adding to ``removed``; the streams still past their limits."""
    plans: dict[str, list[tuple[StreamSpec, tuple[str, ...], Command]]] = {}
    for name in names:
        spec = core.registry.streams[name]
        plan = plans.setdefault(spec.pool, [])
        plan.append((spec, spec.groups, stream_collect_command(spec)))
        for group in spec.groups:
            plan.append((spec, (group,), collect_command(replay_key(spec, group), (group,))))
    sends = [
        Send(pool, [command for _, _, command in plan], allow_errors=True)
        for pool, plan in plans.items()
    ]
    results = yield Parallel(sends)
    more = set()
    for send, replies in zip(sends, results, strict=True):
        for (spec, groups, _), reply in zip(plans[send.pool], replies, strict=True):
            result = collected(send.pool, spec, groups, reply)
            removed[spec.name] += result.removed
            if result.more:
                more.add(spec.name)
    return more
