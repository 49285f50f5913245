"""Consuming a group's streams: the consumer's state machine, free of I/O.

One step of a consumer is one round trip per pool (the pools in parallel), which
carries, in order: the acknowledgements and dead letters of the last batch, each
followed by a garbage collection of its stream; the lease renewal; the retries that
are due; a reclaim of events idle longer than ``retry_after`` (now and then); the
consumer's own pending events (when it starts); and an ``XREADGROUP`` of new events
over the group's streams in that pool. The events are merged in id order and handed
to the handler in batches of at most ``count``.

Each stream a group reads has a replay stream for that group (dead letters put
back); consumers read it as part of the stream.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from ..config.registry import StreamSpec, check_name
from ..errors import (
    BrokerError,
    ConsumerBusyError,
    InvalidArgumentError,
    LeaseLostError,
    OutOfMemoryError,
    PoolConnectionError,
    ServerReplyError,
)
from ..wire.events import Event
from ..wire.keys import lease_key, replay_key
from .backoff import backoff
from .deadletters import dead_letter_command
from .delivery import (
    MAX_SCRIPT_BATCH,
    claim_all_command,
    own_pending_command,
    reclaim_command,
    retry_command,
    set_delivery_count_command,
    touch_command,
)
from .delivery import ack_owned_command as _ack_owned
from .effects import (
    Command,
    Handle,
    Op,
    Parallel,
    ReplyError,
    ReplyTooLargeError,
    Script,
    Send,
    Sleep,
    describe,
    single,
)
from .gc import collect_command, collected, stream_collect_command
from .handing import (
    DIED_ON_LAST_DELIVERY,
    LAST_DELIVERY_MARK,
    batches,
    describe_failure,
    died_on_last_delivery,
)
from .leases import LEASE_RETAKEN, acquire_command, release_command, renew_command
from .observer import Outcome
from .routing import key_slot
from .sizes import (
    BUDGET_ENTRIES,
    entry_size,
    oversized_pending_command,
    read_budget,
    reply_budget,
    too_large,
)
from .state import BrokerCore

__all__ = ["ConsumerCore", "ConsumerOptions", "check_count", "claim", "remove_consumer"]

log = logging.getLogger("streambroker.consumer")


class _ConsumerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The consumer's logger: every record carries its group and name (for JSON logs),
    and what a call adds (``extra``: the stream, event ids)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


#: Blocking time per read when a group spans several pools, read in parallel: a
#: pool that has events answers at once, and this bounds how long the others hold
#: the batch back.
MULTI_POOL_BLOCK = 0.1
#: Connection failures in a row after which a one-shot ``consume`` gives up.
ONE_SHOT_ATTEMPTS = 5
#: The longest wait between reconnection attempts (seconds).
MAX_RECONNECT_DELAY = 5.0
#: A consumer collects the streams it acknowledged events of at most this often
#: (seconds), in round trips it makes anyway, and always before ``consume`` returns:
#: with small batches, collecting after each one would cost more than the events.
COLLECT_EVERY = 0.05
#: An event acknowledged sooner than this share of ``retry_after`` after it was read
#: cannot have been reclaimed, so its acknowledgement skips the ownership check.
_SAFE_SHARE = 0.8


@dataclass(frozen=True)
class ConsumerOptions:
    """How a consumer waits, retries and reclaims (all times in seconds).

    - ``block_timeout``: longest wait of one blocking read (and so, of ``stop()``).
    - ``collect``: remove events every group acknowledged, as acknowledgements go out.
    - ``retry_after``: a pending event idle this long (its consumer crashed or hangs)
      is taken over by a live consumer of the group.
    - ``lease``: a consumer name stays taken this long after its process died.
    - ``max_deliveries``: deliveries after which a failing event becomes a dead letter.
    - ``retry_delay``: back-off before the first retry of a failed event; it doubles
      with each delivery (jittered), up to ``retry_after``.
    - ``forget_after``: other consumers of the group idle this long and holding
      nothing pending (stopped or crashed long ago) are deleted from it; 0: never.
    """

    block_timeout: float = 1.0
    collect: bool = True
    retry_after: float = 30.0
    lease: float = 30.0
    max_deliveries: int = 5
    retry_delay: float = 1.0
    forget_after: float = 3600.0

    def check(self, group: str, name: str, socket_timeout: float) -> None:
        """Raise :class:`InvalidArgumentError` naming the consumer for a bad option."""

        def fail(message: str) -> None:
            raise InvalidArgumentError(f"consumer {name} of group {group}: {message}")

        for option in ("block_timeout", "retry_after", "lease", "retry_delay"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                fail(f"{option} must be a positive number of seconds, got {value!r}")
        if self.block_timeout >= socket_timeout:
            fail(
                f"block_timeout ({self.block_timeout} s) must be shorter than the broker's "
                f"socket_timeout ({socket_timeout} s)"
            )
        forget = self.forget_after
        if isinstance(forget, bool) or not isinstance(forget, int | float) or forget < 0:
            fail(f"forget_after must be a number of seconds >= 0 (0: never), got {forget!r}")
        deliveries = self.max_deliveries
        if isinstance(deliveries, bool) or not isinstance(deliveries, int) or deliveries < 1:
            fail(f"max_deliveries must be an integer >= 1, got {deliveries!r}")


@dataclass(frozen=True)
class _Source:
    """One stream key a consumer reads: a registered stream, or its replay stream."""

    spec: StreamSpec
    key: str
    pool: str
    groups: tuple[str, ...]

    @property
    def stream(self) -> str:
        """The name of the registered stream."""
        return self.spec.name


@dataclass
class _Outgoing:
    """Acknowledgements and dead letters waiting for the next round trip to a pool."""

    acks: dict[str, list[str]] = field(default_factory=dict)
    checked_acks: dict[str, list[str]] = field(default_factory=dict)
    dead: list[tuple[str, Command]] = field(default_factory=list)
    restore: list[tuple[str, Command]] = field(default_factory=list)


# What a batch's checks read of each of its events, in C rather than Python per event.
_KEY = attrgetter("key")
_ID = attrgetter("id")
_READ_AT = attrgetter("read_at")
_ERROR = attrgetter("error")
_DELIVERIES = attrgetter("delivery_count")


def _id_key(event: Event) -> tuple[int, int]:
    ms, _, seq = event.id.partition("-")
    return int(ms), int(seq or 0)


def check_count(count: object, whose: str) -> int:
    """``count`` as a valid batch size, else :class:`InvalidArgumentError` naming ``whose``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgumentError(f"{whose}: count must be an integer >= 1, got {count!r}")
    return count


class ConsumerCore:
    """The state of one named consumer of a group, and its consume loop."""

    def __init__(
        self,
        core: BrokerCore,
        group: str,
        name: str,
        options: ConsumerOptions,
        socket_timeout: float,
    ) -> None:
        problem = check_name("consumer", name)
        if problem:
            raise InvalidArgumentError(f"consumer group {group}: {problem}")
        streams = core.group_streams(group)
        options.check(group, name, socket_timeout)
        self.core = core
        self.group = group
        self.name = name
        self.options = options
        sources = []
        for spec in streams:
            sources.append(_Source(spec, spec.key, spec.pool, spec.groups))
            sources.append(_Source(spec, replay_key(spec, group), spec.pool, (group,)))
        self._sources = {source.key: source for source in sources}
        self._groups = core.group_keys(group)  # (pool, key, group) it reads
        self._by_pool: dict[str, list[_Source]] = {}
        for source in sources:
            self._by_pool.setdefault(source.pool, []).append(source)
        self._lease_pool = streams[0].pool
        self._prefix = core.registry.key_prefix
        self._block = options.block_timeout
        self._cluster_pools = {pool for pool in self._by_pool if core.registry.pools[pool].cluster}
        reads = sum(
            len(self._read_groups(pool, [source.key for source in sources]))
            for pool, sources in self._by_pool.items()
        )
        if reads > 1:  # several pools, or several slots of a cluster
            self._block = min(self._block, MULTI_POOL_BLOCK)
        self._reclaim_every = max(0.05, options.retry_after / 2)
        self._heartbeat_every = min(options.retry_after, options.lease) / 3
        self._token = ""
        self._leased = False  # whether the lease is taken (the token may be, unconfirmed)
        #: Why the last round trip failed while the consumer tries again (None: it did not).
        self.problem: str | None = None
        self.log = _ConsumerLog(log, {"group": group, "consumer": name})
        # Per key: where re-reading this consumer's own pending events goes on ("-"
        # or "(id"); keys without an entry read new events.
        self._own: dict[str, str] = {}
        self._reclaim_cursor = dict.fromkeys(self._sources, "0-0")
        self._reclaim_at = 0.0
        self._renew_at = 0.0
        self._retries: dict[str, dict[str, float]] = {}
        self._outgoing = {pool: _Outgoing() for pool in self._by_pool}
        # Keys with acknowledgements since they were last collected, and when next to.
        self._uncollected: dict[str, None] = {}
        self._collect_at = 0.0
        self._in_hand: list[Event] = []
        self._dead_waiting = False  # dead letters refused for want of memory wait
        # Whether the last step read events delivered before (handed in smaller batches).
        self._redelivered = False
        # Whether a read went over its budget: the pending events are to be measured,
        # then re-read in pieces a budget has room for.
        self._oversized = False
        self._pieces = False
        # After a read of legitimate entries went over its budget: how many new events
        # to read per stream, from the size of those read since (None: ``count``).
        self._read_cap: int | None = None
        self._lost: set[tuple[str, str]] = set()
        self._lease_lost = False
        # Whether a loss of this group's data was reported (until the lease is seen again).
        self._loss_reported = False
        self._renewed_at = 0.0  # when the lease was last taken or renewed
        self._renewal_after = 0.0  # the above when the loop timed its renewal in flight
        self.stopping = False

    # -- the loop ---------------------------------------------------------------

    def check_count(self, count: object) -> int:
        """``count`` as a valid batch size, else :class:`InvalidArgumentError`."""
        return check_count(count, f"consumer {self.name} of group {self.group}")

    def check_handler(self, handler: object) -> None:
        """Refuse a handler that cannot be called, naming the consumer."""
        if not callable(handler):
            raise InvalidArgumentError(
                f"consumer {self.name} of group {self.group}: the handler must be callable, "
                f"got {handler!r}"
            )

    def consume(self, count: int, block: bool) -> Op[int]:
        """Hand events to the handler until stopped (``block``) or none are left.

        Returns how many events were handled. When the handler raises, the events it
        acked are acknowledged, the others stay pending, and the error propagates.
        """
        self.check_count(count)
        handled = 0
        try:
            failures = 0
            reported = ""  # the failure last logged, so that a streak logs each once
            while True:
                reading_new = self._leased and not self._own
                try:
                    yield from self.core.ensure_groups(self._groups)  # at once when lost
                    if not self._leased:
                        yield from self._acquire()
                    if self._oversized and not (yield from self._set_aside_oversized()):
                        # Big entries, but none too big: fewer are read at a time.
                        streams = max(len(sources) for sources in self._by_pool.values())
                        self._read_cap = max(1, BUDGET_ENTRIES // streams)
                    events = yield from self._step(count, block and not self.stopping)
                except ReplyTooLargeError as exc:
                    self.log.info(
                        "consumer %s of group %s: a read from redis pool %r took more than "
                        "its budget of %d bytes; setting aside its pending entries larger than "
                        "max_entry_size (%d bytes) and re-reading the others in smaller pieces",
                        self.name,
                        self.group,
                        exc.pool,
                        exc.budget,
                        self.core.max_entry_size,
                    )
                    self._own = dict.fromkeys(self._sources, "-")
                    self._retries.clear()  # re-reading the pending events covers them
                    self._oversized = self._pieces = True
                    continue
                except (PoolConnectionError, ServerReplyError) as exc:
                    failures += 1
                    if not self._recoverable(exc) or (not block and failures >= ONE_SHOT_ATTEMPTS):
                        raise
                    if self.stopping:
                        break
                    delay = backoff(failures, 0.1, MAX_RECONNECT_DELAY)
                    text = str(exc)
                    self.log.log(
                        logging.DEBUG if text == reported else logging.WARNING,
                        "consumer %s of group %s: %s; trying again in %.1f s (%s)",
                        self.name,
                        self.group,
                        text,
                        delay,
                        "and on, with back-off, for as long as it takes"
                        if block
                        else f"attempt {failures} of {ONE_SHOT_ATTEMPTS}",
                    )
                    reported = text
                    self.problem = text
                    yield Sleep(delay)
                    continue
                self.problem = None
                if failures:
                    self.log.warning(
                        "consumer %s of group %s: reconnected after %d failed attempts",
                        self.name,
                        self.group,
                        failures,
                    )
                    failures = 0
                    reported = ""
                if events:
                    handled += yield from self._handle(events, count)
                elif not block and reading_new and not self._due_retries(time.monotonic()):
                    break
                if self.stopping:
                    break
            yield from self._flush()
        except BaseException:
            try:
                yield from self._flush()
            except BrokerError as exc:
                self.log.warning(
                    "consumer %s of group %s: could not send acknowledgements (the events "
                    "will be delivered again): %s",
                    self.name,
                    self.group,
                    exc,
                )
            raise
        finally:
            self.stopping = False
            yield from self._release()
        return handled

    @property
    def running(self) -> bool:
        """Whether the consumer holds its lease and its last round trip succeeded."""
        return self._leased and self.problem is None

    def _recoverable(self, exc: BrokerError) -> bool:
        """Whether a failed step is worth trying again (and prepare for it)."""
        self._own = dict.fromkeys(self._sources, "-")  # replies may have been lost
        self._reclaim_at = 0.0
        if isinstance(exc, PoolConnectionError | OutOfMemoryError):
            return True  # the server is back, or has memory again, after a while
        # NOGROUP: the group is gone; UNBLOCKED: the stream was deleted while we waited.
        if isinstance(exc, ServerReplyError) and ("NOGROUP" in str(exc) or "UNBLOCKED" in str(exc)):
            self._report_loss(exc.pool, "a stream or the group vanished")
            return True
        return False

    def _report_loss(self, pool: str, what: str) -> None:
        """Say (once for one loss) that the server lost this group's data; recreate it."""
        if not self._loss_reported:
            self.log.warning(
                "consumer %s of group %s: %s from redis pool %r (the server lost data, or "
                "someone deleted it); recreating what is missing",
                self.name,
                self.group,
                what,
                pool,
            )
            self._loss_reported = True
        self.core.forget_groups(pool)

    def _acquire(self) -> Op[None]:
        # Known before the reply (and kept for another attempt): if the reply is lost,
        # the lease may be ours, to take again or to release.
        token = self._token = self._token or uuid.uuid4().hex
        self._lease_lost = False
        ttl = int(self.options.lease * 1000)
        sent_at = time.monotonic()
        (reply,) = yield single(
            self._lease_pool, *acquire_command(self._prefix, self.group, self.name, token, ttl)
        )
        if reply != 1:
            self._token = ""
            raise ConsumerBusyError(
                self.group,
                self.name,
                f"consumer {self.name!r} of group {self.group!r} is already running in another "
                f"process (its lease expires in {-int(reply) / 1000:.1f} s unless renewed)",
            )
        self._leased = True
        self._renewed_at = sent_at
        self._renew_at = time.monotonic() + self.options.lease / 3
        self._own = dict.fromkeys(self._sources, "-")
        self._retries.clear()  # re-reading the pending events covers them
        self._reclaim_at = 0.0
        # Registered with the group at once (not at its first read), so statistics
        # list a live consumer even before it received anything.
        sends = [
            Send(
                pool,
                [("XGROUP", "CREATECONSUMER", s.key, self.group, self.name) for s in sources],
                allow_errors=True,
            )
            for pool, sources in self._by_pool.items()
        ]
        results = yield Parallel(sends)
        lost = self._created(sends, results)
        if lost:
            for pool in lost:
                self._report_loss(pool, "the group vanished")
            yield from self.core.ensure_groups(g for g in self._groups if g[0] in lost)
            again = [send for send in sends if send.pool in lost]
            if self._created(again, (yield Parallel(again))):
                raise ServerReplyError(lost[0], f"consumer group {self.group!r} vanished again")

    def _created(self, sends: list[Send], results: list[list[Any]]) -> list[str]:
        """The pools whose ``XGROUP CREATECONSUMER`` replies say the group is gone.

        Refused for want of memory, the consumer is registered by its first read
        instead (reading needs no memory check); other errors raise.
        """
        lost: list[str] = []
        for send, replies in zip(sends, results, strict=True):
            for command, reply in zip(send.commands, replies, strict=True):
                if not isinstance(reply, ReplyError) or reply.out_of_memory:
                    continue
                if reply.message.startswith("NOGROUP") or "requires the key" in reply.message:
                    if send.pool not in lost:
                        lost.append(send.pool)
                else:
                    raise reply.error(send.pool, describe(command))
        return lost

    def _release(self) -> Op[None]:
        token, self._token = self._token, ""
        self._leased = False
        if not token or self._lease_lost:
            return
        try:
            yield single(
                self._lease_pool, *release_command(self._prefix, self.group, self.name, token)
            )
        except BrokerError as exc:
            self.log.warning(
                "consumer %s of group %s: could not release its lease: %s",
                self.name,
                self.group,
                exc,
            )

    # -- one round trip -----------------------------------------------------------

    def _due_retries(self, now: float) -> dict[str, list[str]]:
        return {
            key: [event_id for event_id, due in ids.items() if due <= now]
            for key, ids in self._retries.items()
            if any(due <= now for due in ids.values())
        }

    def _outgoing_commands(self, pool: str, final: bool = False) -> list[tuple[str, str, Command]]:
        """(kind, key, command) for the acknowledgements and dead letters of ``pool``, and
        for collecting its streams when that is due (always when ``final``)."""
        out = self._outgoing[pool]
        commands: list[tuple[str, str, Command]] = []
        touched: dict[str, None] = {}
        for key, ids in out.acks.items():
            commands.append(("ack", key, ("XACK", key, self.group, *ids)))
            touched[key] = None
        for key, ids in out.checked_acks.items():
            commands.append(("checked", key, _ack_owned(key, self.group, self.name, ids)))
            touched[key] = None
        for key, command in out.dead:
            commands.append(("dead", key, command))
            touched[key] = None
        for key, command in out.restore:
            commands.append(("restore", key, command))
        if self.options.collect:
            self._uncollected.update(touched)
            if final or time.monotonic() >= self._collect_at:
                for key in self._uncollected:
                    source = self._sources[key]
                    if source.pool == pool:
                        command = (
                            stream_collect_command(source.spec)
                            if key == source.spec.key
                            else collect_command(key, source.groups)
                        )
                        commands.append(("gc", key, command))
        return commands

    def _collect_in(self, now: float) -> float | None:
        """Seconds until collecting is due; None when there is nothing to collect."""
        if not self.options.collect:
            return None
        if not self._uncollected and not any(
            out.acks or out.checked_acks or out.dead or out.restore
            for out in self._outgoing.values()
        ):
            return None
        return self._collect_at - now

    def _step(self, count: int, block: bool) -> Op[list[Event]]:
        now = time.monotonic()
        due = self._due_retries(now)
        # Not while re-reading its own pending events: those reclaimed now would be
        # found among them again.
        reclaim = now >= self._reclaim_at and not self._own
        renew = now >= self._renew_at
        wait = 0.0
        if block and not self._own and not due and not reclaim:
            wait = min(self._block, self._reclaim_at - now, self._renew_at - now)
            collect_in = self._collect_in(now)
            if collect_in is not None and collect_in > 0:
                wait = min(wait, collect_in)
            upcoming = [d for ids in self._retries.values() for d in ids.values()]
            if upcoming:
                wait = min(wait, min(upcoming) - now)
        plans: list[list[tuple[str, str, Command]]] = []
        sends = []
        for pool, sources in self._by_pool.items():
            plan = self._outgoing_commands(pool)
            own = [source.key for source in sources if source.key in self._own]
            piece = count
            if self._pieces and own:
                # Pieces a budget has room for, of a few streams at a time.
                own = own[:BUDGET_ENTRIES]
                piece = min(count, max(1, BUDGET_ENTRIES // len(own)))
            if renew and pool == self._lease_pool:
                self._renewal_after = self._renewed_at
                ttl = int(self.options.lease * 1000)
                command = renew_command(self._prefix, self.group, self.name, self._token, ttl)
                plan.append(("renew", "", command))
            for source in sources:
                key = source.key
                if key in due:
                    plan.append(("retry", key, retry_command(key, self.group, self.name, due[key])))
                if reclaim:
                    idle_ms = int(self.options.retry_after * 1000)
                    cursor = self._reclaim_cursor[key]
                    forget_ms = int(self.options.forget_after * 1000)
                    command = reclaim_command(
                        key, self.group, self.name, idle_ms, cursor, count, forget_ms
                    )
                    plan.append(("reclaim", key, command))
                if key in own:
                    command = own_pending_command(key, self.group, self.name, self._own[key], piece)
                    plan.append(("own", key, command))
            new = [source.key for source in sources if source.key not in self._own]
            reading = min(count, self._read_cap or count)
            if new:
                head: tuple[Any, ...] = (
                    "XREADGROUP",
                    "GROUP",
                    self.group,
                    self.name,
                    "COUNT",
                    reading,
                )
                if wait >= 0.001:
                    head += ("BLOCK", int(wait * 1000))
                for keys in self._read_groups(pool, new):
                    plan.append(("read", "", (*head, "STREAMS", *keys, *[">"] * len(keys))))
            plans.append(plan)
            budget = self._budget(plan, count, reading)
            commands = [command for _, _, command in plan]
            sends.append(Send(pool, commands, allow_errors=True, budget=budget))
        read_at = time.monotonic()
        results = yield Parallel(sends)
        self._sent(sends, plans, results)
        for key, ids in due.items():
            for event_id in ids:
                self._retries[key].pop(event_id, None)
            if not self._retries[key]:
                del self._retries[key]
        if reclaim:
            self._reclaim_at = now + self._reclaim_every
        if renew:
            self._renew_at = now + self.options.lease / 3
        events: list[Event] = []
        for send, plan, replies in zip(sends, plans, results, strict=True):
            # Replies smaller than the limit cannot hold an entry over it.
            measure = send.received > self.core.entry_limit
            for (kind, key, _), reply in zip(plan, replies, strict=True):
                self._reply(kind, key, reply, count, read_at, events, measure)
        if not self._own:
            self._pieces = False
        if self._read_cap is not None and events:
            # As many as a budget has room for, at the size these had.
            size = sum(send.received for send in sends) // len(events) + 1
            room = read_budget(BUDGET_ENTRIES, self.core.entry_limit) // size
            streams = max(len(sources) for sources in self._by_pool.values())
            self._read_cap = max(1, room // streams)
            if self._read_cap >= count:
                self._read_cap = None
        return self._screen(events)

    def _sent(
        self,
        sends: list[Send],
        plans: list[list[tuple[str, str, Command]]],
        results: list[list[Any]],
    ) -> None:
        """Check a round trip's error replies, then clear what went out.

        A dead letter refused because the server is out of memory waits for the next
        round trip (its event stays pending meanwhile); any other error reply raises,
        and everything is sent again with the next attempt.
        """
        waiting: list[tuple[str, str, Command]] = []
        for send, plan, replies in zip(sends, plans, results, strict=True):
            for (kind, key, command), reply in zip(plan, replies, strict=True):
                if not isinstance(reply, ReplyError):
                    continue
                if kind == "dead" and reply.out_of_memory:
                    waiting.append((send.pool, key, command))
                else:
                    raise reply.error(send.pool, describe(command))
        for pool in self._by_pool:
            self._outgoing[pool] = _Outgoing()
        for pool, key, command in waiting:
            self._outgoing[pool].dead.append((key, command))
        if waiting and not self._dead_waiting:
            self.log.warning(
                "consumer %s of group %s: the server is out of memory: %d dead letters wait "
                "(their events stay pending) until it has memory again",
                self.name,
                self.group,
                len(waiting),
            )
        self._dead_waiting = bool(waiting)

    def _reply(
        self,
        kind: str,
        key: str,
        reply: Any,
        count: int,
        read_at: float,
        into: list[Event],
        measure: bool = False,
    ) -> None:
        """Take in the reply of a command of kind ``kind``; events go ``into`` the list
        (with ``measure``, those larger than ``max_entry_size`` are set aside)."""
        limit = self.core.entry_limit
        if kind == "read":
            for raw_key, entries in reply or ():
                source = self._sources[raw_key.decode()]
                stream, key = source.stream, source.key
                if not measure:
                    into += [Event(stream, i.decode(), f, key, 1, read_at) for i, f in entries]
                    continue
                for raw_id, fields in entries:
                    if (size := entry_size(fields)) > limit:
                        self._set_aside(key, raw_id.decode(), size, 1)
                        continue
                    into.append(Event(stream, raw_id.decode(), fields, key, 1, read_at))
        elif kind in ("own", "retry", "reclaim"):
            entries, counts, gone, cursor, *forgotten = reply
            source = self._sources[key]
            for (raw_id, fields), delivered in zip(entries, counts, strict=True):
                if measure and (size := entry_size(fields)) > limit:
                    self._set_aside(key, raw_id.decode(), size, int(delivered))
                    continue
                event = Event(source.stream, raw_id.decode(), fields, key, int(delivered), read_at)
                into.append(event)
            self._redelivered = self._redelivered or bool(entries)
            if gone:
                self.log.warning(
                    "stream %s, group %s: pending events %s are no longer in the stream (deleted "
                    "or trimmed by someone else, or taken over by another consumer); not "
                    "handling them",
                    source.stream,
                    self.group,
                    [g.decode() for g in gone],
                    extra={"stream": source.stream, "ids": [g.decode() for g in gone]},
                )
            if kind == "own":
                if cursor:
                    self._own[key] = cursor.decode()
                else:
                    self._own.pop(key, None)
            elif kind == "reclaim":
                self._reclaim_cursor[key] = cursor.decode()
                if entries:
                    self.log.info(
                        "consumer %s of group %s took over %d events idle for %.1f s or more "
                        "from stream %s",
                        self.name,
                        self.group,
                        len(entries),
                        self.options.retry_after,
                        source.stream,
                    )
                if len(entries) >= min(count, MAX_SCRIPT_BATCH):
                    self._reclaim_at = 0.0  # more may be waiting
                if forgotten and forgotten[0]:
                    self.log.info(
                        "consumer %s of group %s forgot consumers idle for %g s or more with "
                        "nothing pending, from stream %s: %s",
                        self.name,
                        self.group,
                        self.options.forget_after,
                        source.stream,
                        ", ".join(name.decode() for name in forgotten[0]),
                    )
        elif kind in ("checked", "dead") and reply:
            lost = reply if kind == "checked" else ([] if reply == 1 else ["?"])
            if lost:
                self.log.warning(
                    "consumer %s of group %s: %d events of %s were taken over by another "
                    "consumer before they were acknowledged; they will be handled again there",
                    self.name,
                    self.group,
                    len(lost),
                    self._sources[key].stream,
                )
        elif kind == "gc":
            source = self._sources[key]
            result = collected(source.pool, source.spec, source.groups, reply)
            # A stream still past its limits stays due, and is collected again soon.
            if not result.more:
                self._uncollected.pop(key, None)
            self._collect_at = time.monotonic() + COLLECT_EVERY
            if self.core.observer is not None:
                self.core.observer.collected(source.pool, source.stream, result.removed)
        elif kind == "renew" and not self._renewed(reply, read_at, self._renewal_after):
            raise LeaseLostError(
                self.group,
                self.name,
                f"consumer {self.name!r} of group {self.group!r} lost its lease (it was paused "
                f"or cut off longer than {self.options.lease} s) and another process took the "
                "name; stopping without acknowledging anything more",
            )

    def _renewed(self, reply: Any, sent_at: float, after: float) -> bool:
        """Take in the reply of a lease renewal sent at ``sent_at``, just arrived; False
        when another process took the name. ``after`` is when the renewal (or taking)
        that came back last before this one was timed was sent.

        That renewal set the lease after it was sent, and this one ran before its reply
        arrived (now): only when now is less than a lease after that sending did the
        lease vanish before it could expire. (This renewal's own sending time says
        nothing: the process may have been paused between taking it and sending. Nor
        does a renewal timed after this one and back first: the heartbeat thread and the
        loop renew independently, and one timed before a pause may retake the lease
        after the other found it.)
        """
        if reply == 0:
            self._lease_lost = True
            return False
        since = time.monotonic() - after
        if reply != LEASE_RETAKEN:
            self._loss_reported = False
        elif since < self.options.lease:
            self._report_loss(self._lease_pool, "its lease vanished")
        else:
            self.log.warning(
                "consumer %s of group %s: its lease expired (it was paused or cut off for "
                "%.1f s, longer than the lease) and nobody took the name; it goes on",
                self.name,
                self.group,
                since,
            )
        self._renewed_at = max(self._renewed_at, sent_at)
        return True

    def _screen(self, events: list[Event]) -> list[Event]:
        """Set aside events whose consumer died handling them on their last delivery
        (see :mod:`~streambroker.core.handing`); sort the rest."""
        kept = events
        # Events read for the first time (not redelivered) were delivered once.
        if self._redelivered and events and died_on_last_delivery(max(map(_DELIVERIES, events))):
            kept = []
            for event in events:
                if died_on_last_delivery(event.delivery_count):
                    self._bury(event, DIED_ON_LAST_DELIVERY)
                else:
                    kept.append(event)
        if len(set(map(_KEY, kept))) > 1:
            kept.sort(key=_id_key)
        return kept

    def _bury(self, event: Event, error: str) -> None:
        source = self._sources[event.key]
        deliveries = self.options.max_deliveries
        self.log.warning(
            "stream %s, group %s: event %s failed on its last allowed delivery (%d); moving it "
            "to the dead letters: %s",
            source.stream,
            self.group,
            event.id,
            deliveries,
            error,
            extra={"stream": source.stream, "ids": [event.id]},
        )
        command = dead_letter_command(
            source.spec, event.key, self.group, self.name, event.id, error, deliveries
        )
        self._outgoing[source.pool].dead.append((event.key, command))

    def _set_aside_oversized(self) -> Op[int]:
        """Measure this consumer's pending entries on the server; those larger than
        ``max_entry_size`` go to the dead letters (with the next round trip), unread.
        Returns how many."""
        limit = self.core.entry_limit
        found = 0
        for pool, sources in self._by_pool.items():
            cursors = {source.key: "-" for source in sources}
            while cursors:
                keys = list(cursors)
                commands = [
                    oversized_pending_command(key, self.group, self.name, cursors[key], limit)
                    for key in keys
                ]
                replies = yield Send(pool, commands)
                for key, (oversized, cursor) in zip(keys, replies, strict=True):
                    found += len(oversized)
                    for raw_id, size, deliveries in oversized:
                        self._set_aside(key, raw_id.decode(), int(size), int(deliveries))
                    if cursor:
                        cursors[key] = cursor.decode()
                    else:
                        del cursors[key]
        self._oversized = False
        return found

    def _set_aside(self, key: str, event_id: str, size: int, deliveries: int) -> None:
        """Move the pending entry ``event_id``, larger than ``max_entry_size``, to the dead
        letters without reading it (the server copies it)."""
        source = self._sources[key]
        limit = self.core.max_entry_size
        self.log.warning(
            "stream %s, group %s: entry %s is %d bytes, more than the max_entry_size limit of "
            "%d bytes; moving it to the dead letters without reading it",
            source.stream,
            self.group,
            event_id,
            size,
            limit,
            extra={"stream": source.stream, "ids": [event_id]},
        )
        command = dead_letter_command(
            source.spec,
            key,
            self.group,
            self.name,
            event_id,
            too_large(size, limit),
            deliveries,
        )
        self._outgoing[source.pool].dead.append((key, command))

    def _read_groups(self, pool: str, keys: list[str]) -> list[list[str]]:
        """``keys`` as the ``XREADGROUP`` commands reading them: one per hash slot on a
        cluster pool (a command's keys must share a slot there), else one."""
        if pool not in self._cluster_pools:
            return [keys]
        by_slot: dict[int, list[str]] = {}
        for key in keys:
            by_slot.setdefault(key_slot(key), []).append(key)
        return list(by_slot.values())

    def _budget(self, plan: list[tuple[str, str, Command]], count: int, reading: int) -> int:
        """The bytes the replies of ``plan`` may take (see :mod:`~streambroker.core.sizes`):
        room for the entries it may read (``reading`` new ones per stream), up to a
        budget's, and what each reply adds."""
        entries = 0
        slack = 0
        for kind, _, command in plan:
            if kind == "read":
                entries += reading * ((len(command) - command.index("STREAMS") - 1) // 2)
            elif kind in ("own", "reclaim"):
                entries += min(count, MAX_SCRIPT_BATCH)
            elif kind == "retry":
                entries += len(command) - 6  # the ids
            slack += reply_budget(command)
        return read_budget(entries, self.core.entry_limit) + slack

    # -- handling -----------------------------------------------------------------

    def _handle(self, events: list[Event], count: int) -> Op[int]:
        handled = 0
        limit = self.options.max_deliveries
        if self._redelivered or limit == 1:
            chunks: Iterable[list[Event]] = batches(events, count, limit)
        else:
            chunks = (events[start : start + count] for start in range(0, len(events), count))
        self._redelivered = False
        for chunk in chunks:
            last = chunk[0].delivery_count >= limit
            if last and not (yield from self._mark_last_delivery(chunk[0])):
                continue
            self._in_hand = chunk
            started = time.monotonic()
            traced = self._start_trace(chunk)
            try:
                yield Handle(chunk, self.heartbeat, self._heartbeat_every)
            except BaseException as exc:
                self._finish_trace(traced, exc)
                self._settle(chunk, exc)
                raise
            finally:
                self._in_hand = []
                if self.core.observer is not None:
                    self.core.observer.handled(self.group, self.name, time.monotonic() - started)
            self._finish_trace(traced, None)
            self._settle(chunk, None)
            if last:
                # Its acknowledgement goes out before anything else is handed: if this
                # process dies meanwhile, the mark must not outlive a success.
                yield from self._flush(final=False)
            handled += len(chunk)
            if self._lease_lost:
                raise LeaseLostError(
                    self.group,
                    self.name,
                    f"consumer {self.name!r} of group {self.group!r} lost its lease while "
                    "handling a batch; stopping",
                )
            if self.stopping:
                break  # the rest stays pending: this consumer reads it first next time
        return handled

    def _start_trace(self, events: list[Event]) -> tuple[Any, object] | None:
        """With tracing: start the batch's CONSUMER span, current while it is handled."""
        if self.core.tracing is None:
            return None
        pool = self._sources[events[0].key].pool
        server = self.core.registry.pools[pool].server_address
        return self.core.tracing.start_process(self.group, self.name, events, server)

    def _finish_trace(self, traced: tuple[Any, object] | None, error: BaseException | None) -> None:
        if traced is not None and self.core.tracing is not None:
            self.core.tracing.finish_process(*traced, error)

    def _mark_last_delivery(self, event: Event) -> Op[bool]:
        """Mark ``event``, about to be handed alone on its last delivery (see
        :mod:`~streambroker.core.handing`), sending what waits to go out with it; False
        when it is no longer this consumer's."""
        source = self._sources[event.key]
        command = set_delivery_count_command(
            event.key, self.group, self.name, [event.id], LAST_DELIVERY_MARK
        )
        lost = yield from self._flush(final=False, mark=(source.pool, event.key, command))
        if lost:
            self.log.warning(
                "consumer %s of group %s: event %s of %s was taken over by another consumer "
                "before it was handled; it will be handled there",
                self.name,
                self.group,
                event.id,
                source.stream,
            )
        return not lost

    def _settle(self, events: list[Event], failure: BaseException | None) -> None:
        """Queue what a handled batch leaves: acknowledgements, retries, dead letters.

        ``failure`` is what the handler raised (None when it returned).
        """
        now = time.monotonic()
        safe = self.options.retry_after * _SAFE_SHARE
        limit = self.options.max_deliveries
        keys = set(map(_KEY, events))
        if (
            failure is None
            and len(keys) == 1
            and not self._lost
            and now - min(map(_READ_AT, events)) < safe
            and list(map(_ERROR, events)).count(None) == len(events)
        ):
            # The common case, in one go: a whole fresh batch of one stream handled.
            (key,) = keys
            out = self._outgoing[self._sources[key].pool]
            out.acks.setdefault(key, []).extend(map(_ID, events))
            if self.core.observer is not None:
                self._observe({(key, "acked"): len(events)})
            return
        outcomes: Counter[tuple[str, Outcome]] = Counter()
        for event in events:
            source = self._sources[event.key]
            out = self._outgoing[source.pool]
            error = event.error
            if error is None and failure is not None and not event.acked:
                if event.delivery_count < limit:
                    outcomes[event.key, "failed"] += 1
                    continue  # stays pending: delivered again, in a smaller batch
                if not isinstance(failure, Exception):
                    # Not the handler's failure (a cancellation, an interrupt): the
                    # last delivery did not happen, so the mark comes off again.
                    command = set_delivery_count_command(
                        event.key, self.group, self.name, [event.id], event.delivery_count
                    )
                    out.restore.append((event.key, command))
                    continue
                error = failure
            if error is not None:
                if event.delivery_count >= limit:
                    self._bury(event, describe_failure(error))
                    outcomes[event.key, "dead_lettered"] += 1
                else:
                    delay = backoff(
                        event.delivery_count, self.options.retry_delay, self.options.retry_after
                    )
                    self._retries.setdefault(event.key, {})[event.id] = now + delay
                    outcomes[event.key, "failed"] += 1
                continue
            if now - event.read_at < safe and (event.key, event.id) not in self._lost:
                out.acks.setdefault(event.key, []).append(event.id)
            else:
                out.checked_acks.setdefault(event.key, []).append(event.id)
            outcomes[event.key, "acked"] += 1
        self._lost.clear()
        if self.core.observer is not None:
            self._observe(outcomes)

    def _observe(self, outcomes: Mapping[tuple[str, Outcome], int]) -> None:
        """Tell the broker's observer what became of a batch's events, per source key."""
        assert self.core.observer is not None
        for (key, outcome), count in outcomes.items():
            source = self._sources[key]
            self.core.observer.delivered(source.pool, source.stream, self.group, outcome, count)

    def heartbeat(self) -> Op[None]:
        """Keep the lease and the events in hand while a long handler runs."""
        by_key: dict[str, list[str]] = {}
        for event in self._in_hand:
            by_key.setdefault(event.key, []).append(event.id)
        sends = []
        for pool, sources in self._by_pool.items():
            commands = [
                touch_command(s.key, self.group, self.name, by_key[s.key])
                for s in sources
                if s.key in by_key
            ]
            if pool == self._lease_pool:
                ttl = int(self.options.lease * 1000)
                commands.append(
                    renew_command(self._prefix, self.group, self.name, self._token, ttl)
                )
            if commands:
                sends.append(Send(pool, commands))
        sent_at, after = time.monotonic(), self._renewed_at
        results = yield Parallel(sends)
        for send, replies in zip(sends, results, strict=True):
            touches = replies[:-1] if send.pool == self._lease_pool else replies
            for command, lost in zip(send.commands, touches, strict=False):
                for event_id in lost:
                    self._lost.add((str(command[3]), event_id.decode()))
            if send.pool == self._lease_pool:
                self._renewed(replies[-1], sent_at, after)
        self._renew_at = time.monotonic() + self.options.lease / 3

    def _flush(self, final: bool = True, mark: tuple[str, str, Command] | None = None) -> Op[Any]:
        """Send the acknowledgements and dead letters waiting to go out (and collect:
        always when ``final``, else when due), with ``mark`` (pool, key, command) if
        given; returns the mark's reply."""
        plans = {pool: self._outgoing_commands(pool, final) for pool in self._by_pool}
        if mark is not None:
            pool, key, command = mark
            plans[pool].append(("mark", key, command))
        plans = {pool: plan for pool, plan in plans.items() if plan}
        if not plans:
            return None
        sends = [
            Send(pool, [command for _, _, command in plan], allow_errors=True)
            for pool, plan in plans.items()
        ]
        results = yield Parallel(sends)
        self._sent(sends, list(plans.values()), results)
        answer = None
        for plan, replies in zip(plans.values(), results, strict=True):
            for (kind, key, _), reply in zip(plan, replies, strict=True):
                if kind == "mark":
                    answer = reply
                else:
                    self._reply(kind, key, reply, 0, 0.0, [])  # logs what was taken over
        return answer


def _lease_alive(core: BrokerCore, group: str, names: list[str]) -> Op[dict[str, bool]]:
    pool = core.group_streams(group)[0].pool
    prefix = core.registry.key_prefix
    replies = yield Send(pool, [("EXISTS", lease_key(prefix, group, name)) for name in names])
    return {name: bool(reply) for name, reply in zip(names, replies, strict=True)}


def claim(core: BrokerCore, group: str, source: str, target: str, force: bool = False) -> Op[int]:
    """Move every pending event of consumer ``source`` to ``target``; returns how many.

    Refuses (:class:`ConsumerBusyError`) while ``source`` is running, unless ``force``.
    """
    for name in (source, target):
        problem = check_name("consumer", name)
        if problem:
            raise InvalidArgumentError(f"consumer group {group}: {problem}")
    streams = core.group_streams(group)
    yield from core.ensure_groups(core.group_keys(group))
    if not force:
        yield from _refuse_running(core, group, source)
    moved = 0
    for spec in streams:
        for key in (spec.key, replay_key(spec, group)):
            while True:
                (count,) = yield single(spec.pool, *claim_all_command(key, group, source, target))
                moved += int(count)
                if not count:
                    break
    return moved


_DELCONSUMER = Script("""
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #rows > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
""")


def _refuse_running(core: BrokerCore, group: str, name: str) -> Op[None]:
    if (yield from _lease_alive(core, group, [name]))[name]:
        raise ConsumerBusyError(
            group, name, f"consumer {name!r} of group {group!r} is running: stop it first"
        )


def leave(core: BrokerCore, group: str, name: str) -> Op[list[str]]:
    """Delete the stopped consumer ``name`` from ``group`` wherever it holds nothing pending.

    Returns the streams where it stays because it holds pending events there (a live
    consumer reclaims them once they are idle for ``retry_after``).
    """
    yield from core.ensure_groups(core.group_keys(group))
    yield from _refuse_running(core, group, name)
    return (yield from _delete_consumer(core, group, name))


def remove_consumer(core: BrokerCore, group: str, name: str, to: str | None) -> Op[int]:
    """Move ``name``'s pending events to ``to`` (or a live consumer), then delete it.

    Returns how many pending events were moved. Never deletes a consumer that still
    has pending events.
    """
    yield from core.ensure_groups(core.group_keys(group))
    yield from _refuse_running(core, group, name)
    if to is None:
        to = yield from _live_consumer(core, group, exclude=name)
    moved = 0
    if to is not None:
        moved = yield from claim(core, group, name, to, force=True)
    kept = yield from _delete_consumer(core, group, name)
    if kept:
        raise BrokerError(
            f"consumer {name!r} of group {group!r} still holds pending events of "
            f"{kept[0]!r} and no live consumer can take them: pass to=<consumer>"
        )
    return moved


def _delete_consumer(core: BrokerCore, group: str, name: str) -> Op[list[str]]:
    """``XGROUP DELCONSUMER`` where ``name`` holds nothing pending; the streams where it stays."""
    kept: list[str] = []
    for spec in core.group_streams(group):
        for key in (spec.key, replay_key(spec, group)):
            (result,) = yield single(spec.pool, "EVALSHA", _DELCONSUMER.sha, 1, key, group, name)
            if result == -1 and spec.name not in kept:
                kept.append(spec.name)
    return kept


def _live_consumer(core: BrokerCore, group: str, exclude: str) -> Op[str | None]:
    spec = core.group_streams(group)[0]
    (rows,) = yield single(spec.pool, "XINFO", "CONSUMERS", spec.key, group)
    names = []
    for row in rows:
        info = dict(zip(row[::2], row[1::2], strict=True))
        consumer = info[b"name"].decode()
        if consumer != exclude:
            names.append(consumer)
    if not names:
        return None
    alive = yield from _lease_alive(core, group, names)
    return next((n for n in names if alive[n]), None)
