"""Statistics of streams, groups and consumers. I/O-free.

Everything is read in two round trips, each one pipeline per pool (the pools in
parallel): the first fetches the stream, group and consumer figures and the server
clock; the second asks which consumers hold their lease (lease keys live in other
hash slots than the streams), and counts the lag of groups whose lag the server
cannot tell (after deletions in the middle of a stream).

Statistics only read: a stream or group that does not exist yet (no consumer of the
group ran) is shown as such, with every event of the stream as its lag.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..config.registry import StreamSpec
from ..wire.keys import dead_letter_key, lease_key, replay_key
from .effects import Command, Op, Parallel, ReplyError, Script, Send
from .state import BrokerCore

__all__ = ["ConsumerStats", "GroupStats", "StreamStats", "collect_stats"]

#: The most entries counted to find a lag the server does not know.
LAG_COUNT_LIMIT = 100_000

_COUNT_AFTER = Script("""
return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
""")


@dataclass(frozen=True)
class ConsumerStats:
    """One consumer of a group: its pending events, idle seconds, and whether it runs."""

    name: str
    pending: int
    idle: float
    alive: bool


@dataclass(frozen=True)
class GroupStats:
    """One group on one stream. Ages are seconds, None when there is nothing to age.

    ``created`` is False while the group does not exist on the server yet (none of
    its consumers ran): then every event of the stream is its lag.
    """

    group: str
    lag: int
    pending: int
    last_delivered_id: str
    last_delivered_age: float | None
    lowest_pending_id: str | None
    lowest_pending_age: float | None
    dead_letters: int
    consumers: tuple[ConsumerStats, ...]
    created: bool = True
    #: The age of the oldest event of the stream the group has not read (None: none).
    oldest_unread_age: float | None = None

    @property
    def holding_back(self) -> bool:
        """Whether the group keeps events in its stream with no consumer running: it has
        events to read or to acknowledge, and none of its consumers holds its lease.
        (Those events stay until one runs: the stream cannot be collected past them.)"""
        return bool(self.lag or self.pending) and not any(c.alive for c in self.consumers)

    @property
    def held_back(self) -> int:
        """How many events of the stream the group holds back (unread and pending)."""
        return self.lag + self.pending


@dataclass(frozen=True)
class StreamStats:
    """One stream: its length, its newest id, its oldest event's age, its groups and
    orphan groups.

    ``last_id`` is the id of the last event ever added (``"0-0"`` before the first),
    even if it was removed since. ``orphan_groups`` exist on the server but are not
    registered for the stream; they hold nothing back, and can be deleted.
    """

    stream: str
    pool: str
    length: int
    last_id: str
    oldest_event_age: float | None
    groups: tuple[GroupStats, ...]
    orphan_groups: tuple[str, ...]
    #: Events ever added to the stream (None from servers older than Redis 7).
    entries_added: int | None = None
    #: The stream's retention limits (events, seconds); None when not set.
    max_length: int | None = None
    max_age: float | None = None
    #: Bytes the stream takes on the server (``MEMORY USAGE``), read only when one of
    #: its groups is :attr:`~GroupStats.holding_back` it; None otherwise.
    memory: int | None = None

    @property
    def held_back_by(self) -> tuple[GroupStats, ...]:
        """The groups that hold events of this stream back with no consumer running."""
        return tuple(group for group in self.groups if group.holding_back)


def holding_back_warning(stream: StreamStats, group: GroupStats) -> str:
    """The warning that ``group`` holds events of ``stream`` back with no consumer running."""
    ages = [age for age in (group.oldest_unread_age, group.lowest_pending_age) if age is not None]
    oldest = f", the oldest {max(ages):.0f} s old" if ages else ""
    memory = ""
    if stream.memory:
        amount = stream.memory / 1048576
        shown = f"{amount:.1f} MiB" if amount >= 1 else f"{stream.memory / 1024:.0f} KiB"
        memory = f"; the stream takes {shown}"
    events = f"{group.held_back} event{'' if group.held_back == 1 else 's'}"
    return (
        f"consumer group {group.group} holds back {events} of stream {stream.stream}"
        f"{oldest}{memory}: none of its consumers runs, and the stream keeps them (and every "
        "later event) until one does"
    )


def _name(raw: bytes) -> str:
    """A group or consumer name read from the server (any bytes another client wrote)."""
    return raw.decode(errors="backslashreplace")


def _table(flat: list[Any]) -> dict[str, Any]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _ms(event_id: bytes | str | None) -> int | None:
    if not event_id:
        return None
    text = event_id.decode() if isinstance(event_id, bytes) else event_id
    ms = int(text.partition("-")[0])
    return ms or None


def _age(now_ms: int, event_id: bytes | str | None) -> float | None:
    ms = _ms(event_id)
    return None if ms is None else max(0.0, (now_ms - ms) / 1000)


@dataclass
class _Plan:
    stream: str
    key: str
    pool: str
    groups: tuple[str, ...]
    commands: list[Command]


def _first_round(spec: StreamSpec) -> _Plan:
    key = spec.key
    commands: list[Command] = [
        ("TIME",),
        ("XINFO", "STREAM", key),
        ("XINFO", "GROUPS", key),
    ]
    for group in spec.groups:
        commands += [
            ("XPENDING", key, group),
            ("XINFO", "CONSUMERS", key, group),
            ("XINFO", "GROUPS", replay_key(spec, group)),
            ("XLEN", replay_key(spec, group)),
            ("XLEN", dead_letter_key(spec, group)),
        ]
    return _Plan(spec.name, key, spec.pool, spec.groups, commands)


def _check(pool: str, stream: str, reply: Any, missing: Any = None) -> Any:
    """``reply``, or ``missing`` when it says that the key or group does not exist
    (only if ``missing`` is given); raises for any other error."""
    if isinstance(reply, ReplyError):
        absent = reply.message.startswith("NOGROUP") or reply.message.endswith("no such key")
        if missing is None or reply.denied or not absent:
            raise reply.error(pool, f"cannot read the statistics of stream {stream!r}")
        return missing
    return reply


@dataclass
class _Draft:
    """A group's figures from the first round, waiting for the second."""

    stats: GroupStats
    consumers: list[dict[str, Any]]
    lag_known: bool


def _draft(
    group: str, now_ms: int, length: int, main: dict[str, Any] | None, replies: list[Any]
) -> _Draft:
    """A group's figures; ``main`` is its row of ``XINFO GROUPS`` (None: not created)."""
    summary, consumers, replay_groups, replay_length, dead = replies
    replay = next((t for t in map(_table, replay_groups) if t["name"] == group.encode()), None)
    created = main is not None and bool(summary)  # (no summary: it vanished meanwhile)
    if main is None or not created:  # it will read the whole stream
        summary, consumers, main = [0, None], [], {"lag": length}
    last = (main.get("last-delivered-id") or b"0-0").decode()
    lag = main.get("lag")
    known = isinstance(lag, int)
    replay_lag = int(replay_length) if replay is None else replay.get("lag")
    lag_now = (lag if isinstance(lag, int) else 0) + (
        replay_lag if isinstance(replay_lag, int) else 0
    )
    stats = GroupStats(
        group=group,
        lag=lag_now,
        pending=int(summary[0]) + int((replay or {}).get("pending", 0)),
        last_delivered_id=last,
        last_delivered_age=_age(now_ms, last),
        lowest_pending_id=summary[1].decode() if summary[1] else None,
        lowest_pending_age=_age(now_ms, summary[1]),
        dead_letters=int(dead),
        consumers=(),
        created=created,
    )
    return _Draft(stats, [_table(row) for row in consumers], known)


def _may_have_unread(draft: _Draft) -> bool:
    return not draft.lag_known or draft.stats.lag > 0


def collect_stats(core: BrokerCore, streams: Iterable[str]) -> Op[list[StreamStats]]:
    """The statistics of ``streams`` (all registered streams when empty), in order."""
    names = list(dict.fromkeys(streams)) or list(core.registry.streams)
    specs = [core.stream(name) for name in names]
    plans = [_first_round(spec) for spec in specs]
    prefix = core.registry.key_prefix
    replies = yield from _run(plans)

    drafts: list[tuple[StreamStats, list[_Draft]]] = []
    second: list[_Plan] = []
    now_of: dict[str, int] = {}
    for plan, raw in zip(plans, replies, strict=True):
        # A missing stream, or a group not created yet, reads as empty.
        reply = [_check(plan.pool, plan.stream, r, missing=[]) for r in raw]
        seconds, micros = (int(x) for x in reply[0])
        now_ms = seconds * 1000 + micros // 1000
        now_of[plan.stream] = now_ms
        info = _table(reply[1])
        first_entry = info.get("first-entry")
        length = int(info.get("length", 0))
        on_server = {_name((row := _table(flat))["name"]): row for flat in reply[2]}
        groups = [
            _draft(group, now_ms, length, on_server.get(group), reply[3 + 5 * i : 8 + 5 * i])
            for i, group in enumerate(plan.groups)
        ]
        follow_up: list[Command] = []
        for draft in groups:
            last = draft.stats.last_delivered_id
            if not draft.lag_known:
                follow_up.append(("EVALSHA", _COUNT_AFTER.sha, 1, plan.key, last, LAG_COUNT_LIMIT))
            if _may_have_unread(draft):
                follow_up.append(("XRANGE", plan.key, f"({last}", "+", "COUNT", 1))
            follow_up += [
                ("EXISTS", lease_key(prefix, draft.stats.group, _name(row["name"])))
                for row in draft.consumers
            ]
        stream = StreamStats(
            stream=plan.stream,
            pool=plan.pool,
            length=length,
            last_id=info.get("last-generated-id", b"0-0").decode(),
            oldest_event_age=_age(now_ms, first_entry[0] if first_entry else None),
            groups=(),
            orphan_groups=tuple(sorted(set(on_server) - set(plan.groups))),
            # A stream that does not exist yet has had nothing added.
            entries_added=info.get("entries-added", 0 if not info else None),
            max_length=core.registry.streams[plan.stream].max_length,
            max_age=core.registry.streams[plan.stream].max_age,
        )
        drafts.append((stream, groups))
        second.append(_Plan(plan.stream, plan.key, plan.pool, plan.groups, follow_up))

    answers = yield from _run(second)
    result = []
    for (stream, groups), answer in zip(drafts, answers, strict=True):
        values = iter([_check(stream.pool, stream.stream, value) for value in answer])
        finished = []
        for draft in groups:
            lag = draft.stats.lag if draft.lag_known else draft.stats.lag + int(next(values))
            unread = next(values) if _may_have_unread(draft) else []
            oldest_unread = _age(now_of[stream.stream], unread[0][0]) if unread else None
            consumers = tuple(
                ConsumerStats(
                    name=_name(row["name"]),
                    pending=int(row["pending"]),
                    idle=int(row["idle"]) / 1000,
                    alive=bool(next(values)),
                )
                for row in draft.consumers
            )
            finished.append(
                replace(draft.stats, lag=lag, consumers=consumers, oldest_unread_age=oldest_unread)
            )
        result.append(replace(stream, groups=tuple(finished)))
    held = [
        (i, plan)
        for i, (plan, stream) in enumerate(zip(plans, result, strict=True))
        if stream.held_back_by
    ]
    if held:  # rare: only then is the memory they keep worth a round trip
        memory = yield from _run(
            [
                _Plan(p.stream, p.key, p.pool, p.groups, [("MEMORY", "USAGE", p.key)])
                for _, p in held
            ]
        )
        for (i, plan), (usage,) in zip(held, memory, strict=True):
            usage = _check(plan.pool, plan.stream, usage)
            result[i] = replace(result[i], memory=None if usage is None else int(usage))
    return result


def stream_stats(core: BrokerCore, stream: str) -> Op[StreamStats]:
    """The statistics of one stream."""
    (result,) = yield from collect_stats(core, [stream])
    return result


def group_stats(core: BrokerCore, stream: str, group: str) -> Op[GroupStats]:
    """The statistics of one group on one stream."""
    core.stream_group(stream, group)
    result = yield from stream_stats(core, stream)
    return next(g for g in result.groups if g.group == group)


def _run(plans: list[_Plan]) -> Op[list[list[Any]]]:
    """Send each plan's commands, one pipeline per pool; the replies, per plan."""
    per_pool: dict[str, list[Command]] = {}
    for plan in plans:
        per_pool.setdefault(plan.pool, []).extend(plan.commands)
    sends = [
        Send(pool, commands, allow_errors=True) for pool, commands in per_pool.items() if commands
    ]
    results = yield Parallel(sends)
    by_pool = {send.pool: iter(result) for send, result in zip(sends, results, strict=True)}
    return [[next(by_pool[plan.pool]) for _ in plan.commands] for plan in plans]
