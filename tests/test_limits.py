"""Limits: what one event may hold, and server-side scripts that take lists and entries
of any size (Lua cannot pass more than about 8,000 values to one call)."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
import redis

import streambroker as sb
from streambroker.core.deadletters import MAX_COPIED_FIELDS, _replay_whole
from streambroker.core.delivery import (
    MAX_SCRIPT_BATCH,
    ack_owned_command,
    claim_all_command,
    own_pending_command,
    reclaim_command,
    retry_command,
    set_delivery_count_command,
    touch_command,
)
from streambroker.core.effects import with_text
from streambroker.wire.codecs import get_codec
from streambroker.wire.entry import MAX_META_TAGS

from .conftest import OpenBroker, Server, wait_for
from .faces import Loop

FAST = {"retry_after": 30.0, "lease": 5.0, "block_timeout": 0.2, "retry_delay": 0.01}
MANY = 10_000
DEAD_C = "{stream-c}:sb:dead:8:stream-c:read-group-c"
REPLAY_C = "{stream-c}:sb:replay:8:stream-c:read-group-c"


def xlen(server: Server, stream: str = "stream-a", db: int = 0) -> int:
    return int(server.client(db).xlen(stream))


# --- publish limits ------------------------------------------------------------------


def test_meta_tags_beyond_the_limit_are_refused_before_anything_is_sent(
    broker: sb.Broker, server: Server
) -> None:
    most = {f"tag{i}": str(i) for i in range(MAX_META_TAGS)}
    kept = broker.publish("stream-a", None, meta=most)
    too_many = {**most, "one-more": "x"}
    with pytest.raises(sb.PayloadTooLargeError, match="stream-a") as caught:
        broker.publish("stream-a", None, meta=too_many)
    assert f"{MAX_META_TAGS + 1} meta tags" in str(caught.value)
    assert f"limit of {MAX_META_TAGS}" in str(caught.value)

    def publish_batch() -> None:
        with broker.batch() as batch:
            batch.publish("stream-a", "queued")
            batch.publish("stream-a", None, meta=too_many)

    with pytest.raises(sb.PayloadTooLargeError, match="meta tags"):
        publish_batch()
    assert xlen(server) == 1
    (event,) = broker.read("stream-a")
    assert (event.id, dict(event.meta)) == (kept, most)


def test_a_large_meta_value_is_refused_like_a_large_body(broker: sb.Broker, server: Server) -> None:
    two_mib = 2 << 20
    with pytest.raises(sb.PayloadTooLargeError, match="stream-a") as meta_refused:
        broker.publish("stream-a", None, meta={"blob": "m" * two_mib})
    assert "max_body_size limit of 1048576 bytes" in str(meta_refused.value)
    assert f"meta tags alone are {two_mib + 4} bytes" in str(meta_refused.value)
    with pytest.raises(sb.PayloadTooLargeError, match="max_body_size") as body_refused:
        broker.publish("stream-a", b"b" * two_mib)
    assert "stream-a" in str(body_refused.value)
    # Under the limit each, over it together.
    half = 600_000
    with pytest.raises(sb.PayloadTooLargeError, match=r"body 600005 \+ meta 600004"):
        broker.publish("stream-a", b"b" * half, meta={"blob": "m" * half})
    assert xlen(server) == 0


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_an_entry_of_exactly_max_body_size_is_accepted(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, server: Server, codec: str
) -> None:
    limit = 1000
    with open_broker(config, codec=codec, max_body_size=limit) as broker:
        body = "x" * 400
        size = len(get_codec(codec).encode(body))
        # "é" is two bytes: sizes count UTF-8 bytes, not characters.
        rest = limit - size - len("name")
        meta = {"name": "é" * (rest // 2) + "e" * (rest % 2)}
        assert size + 4 + len(meta["name"].encode()) == limit
        fits = broker.publish("stream-a", body, meta=meta)
        over = {"name": meta["name"] + "e"}
        with pytest.raises(sb.PayloadTooLargeError, match=f"is {limit + 1} bytes"):
            broker.publish("stream-a", body, meta=over)
        with (
            pytest.raises(sb.PayloadTooLargeError, match=f"is {limit + 1} bytes"),
            broker.batch() as batch,
        ):
            batch.publish("stream-a", body, meta=over)
        only_meta = broker.publish("stream-a", None, meta={"k": "v" * (limit - 1)})
        with pytest.raises(sb.PayloadTooLargeError, match=f"alone are {limit + 1} bytes"):
            broker.publish("stream-a", None, meta={"k": "v" * limit})
        with broker.batch() as batch:
            batch.publish("stream-a", body, meta=meta)
        assert xlen(server) == 3
        events = broker.read("stream-a")
    assert [event.id for event in events[:2]] == [fits, only_meta]
    assert (events[0].body, dict(events[0].meta)) == (body, meta)


# --- scripts given 10,000 ids ------------------------------------------------------------


def pending_of(client: redis.Redis, key: str = "s", group: str = "g") -> dict[str, tuple[str, int]]:
    """Each pending id: (its consumer, its delivery count)."""
    rows = client.xpending_range(key, group, "-", "+", MANY + 10)
    return {
        row["message_id"].decode(): (row["consumer"].decode(), row["times_delivered"])
        for row in rows
    }


def run(client: redis.Redis, command: tuple[Any, ...]) -> Any:
    return client.execute_command(*with_text(command))


@pytest.fixture
def many_pending(server: Server) -> tuple[redis.Redis, list[str]]:
    """Stream ``s`` with 10,000 entries, all pending for consumer ``c`` of group ``g``
    (delivered once), and one more pending for consumer ``other``."""
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for n in range(MANY + 1):
        pipe.xadd("s", {"n": n})
    ids = [raw.decode() for raw in pipe.execute()]
    client.xgroup_create("s", "g", "0")
    client.xreadgroup("g", "c", {"s": ">"}, count=MANY)
    client.xreadgroup("g", "other", {"s": ">"}, count=1)
    return client, ids


def test_retry_touch_and_ack_scripts_take_ten_thousand_ids(
    many_pending: tuple[redis.Redis, list[str]],
) -> None:
    client, ids = many_pending
    mine, theirs = ids[:MANY], ids[MANY]

    entries, counts, gone, _ = run(client, retry_command("s", "g", "c", ids))
    assert [raw.decode() for raw, _ in entries] == mine
    assert set(counts) == {2}
    assert [raw.decode() for raw in gone] == [theirs]  # not c's: reported, not touched
    pending = pending_of(client)
    assert all(pending[i] == ("c", 2) for i in mine)
    assert pending[theirs] == ("other", 1)

    assert [raw.decode() for raw in run(client, touch_command("s", "g", "c", ids))] == [theirs]
    pending = pending_of(client)
    assert all(pending[i] == ("c", 2) for i in mine)  # not counted as deliveries

    assert [raw.decode() for raw in run(client, ack_owned_command("s", "g", "c", ids))] == [theirs]
    assert pending_of(client) == {theirs: ("other", 1)}


def test_set_delivery_count_keeps_the_owner_and_leaves_others_alone(
    many_pending: tuple[redis.Redis, list[str]],
) -> None:
    client, ids = many_pending
    mine, theirs = ids[:MANY], ids[MANY]
    lost = run(client, set_delivery_count_command("s", "g", "c", ids, 7))
    assert [raw.decode() for raw in lost] == [theirs]
    pending = pending_of(client)
    assert all(pending[i] == ("c", 7) for i in mine)
    assert pending[theirs] == ("other", 1)
    # Down as well as up; a consumer that holds none of the ids changes nothing.
    assert run(client, set_delivery_count_command("s", "g", "c", mine[:3], 1)) == []
    pending = pending_of(client)
    assert [pending[i] for i in mine[:4]] == [("c", 1)] * 3 + [("c", 7)]
    lost = run(client, set_delivery_count_command("s", "g", "nobody", mine[:5], 3))
    assert [raw.decode() for raw in lost] == mine[:5]
    assert pending_of(client)[mine[0]] == ("c", 1)


def test_claim_all_reclaim_and_own_pending_page_through_ten_thousand(
    many_pending: tuple[redis.Redis, list[str]],
) -> None:
    client, ids = many_pending
    mine = ids[:MANY]
    moved = []
    while count := run(client, claim_all_command("s", "g", "c", "d")):
        moved.append(count)
    assert moved == [MAX_SCRIPT_BATCH] * (MANY // MAX_SCRIPT_BATCH)
    assert {owner for owner, _ in pending_of(client).values()} == {"d", "other"}

    handed: list[str] = []
    cursor = "-"
    while cursor:
        entries, _, gone, raw = run(client, own_pending_command("s", "g", "d", cursor, MANY))
        assert len(entries) <= MAX_SCRIPT_BATCH
        assert not gone
        handed += [entry_id.decode() for entry_id, _ in entries]
        cursor = raw.decode()
    assert handed == mine

    reclaimed: list[str] = []
    cursor = "0-0"
    while True:
        reply = run(client, reclaim_command("s", "g", "e", 0, cursor, MANY, 0))
        entries, _, _, raw, _ = reply
        reclaimed += [entry_id.decode() for entry_id, _ in entries]
        cursor = raw.decode()
        if cursor == "0-0":
            break
    assert reclaimed == ids
    assert {owner for owner, _ in pending_of(client).values()} == {"e"}


# --- consumers of 10,000 events at a time ------------------------------------------------


class Handler:
    """Records every delivery; fails the events ``fail`` picks (thread-safe)."""

    def __init__(self, fail: Callable[[sb.Event], bool] = lambda event: False) -> None:
        self.deliveries: list[tuple[str, int]] = []
        self.handled: dict[str, sb.Event] = {}
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, events: list[sb.Event]) -> None:
        with self._lock:
            for event in events:
                self.deliveries.append((event.id, event.delivery_count))
                if self.fail(event):
                    event.fail(ValueError(f"cannot handle {event.id}"))
                else:
                    self.handled[event.id] = event

    def count(self) -> int:
        with self._lock:
            return len(self.deliveries)


@contextmanager
def consuming(consumer: sb.Consumer, handler: Handler, count: int = 10) -> Iterator[None]:
    """``consumer`` consumes (blocking) in a thread within the block; stopped at its end."""
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            consumer.consume(handler, count=count)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        yield
    finally:
        consumer.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert not errors, errors


def publish_many(broker: sb.Broker, stream: str, count: int) -> list[str]:
    with broker.batch() as batch:
        for n in range(count):
            batch.publish(stream, n)
    return batch.ids


def test_a_consumer_of_ten_thousand_retries_and_buries_them(
    broker: sb.Broker, server: Server
) -> None:
    ids = publish_many(broker, "stream-c", MANY)
    handler = Handler(lambda event: event.delivery_count == 1 or event.body % 2 == 1)
    consumer = broker.consumer("read-group-c", "w", max_deliveries=2, **FAST)
    with consuming(consumer, handler, count=MANY):
        wait_for(lambda: handler.count() == 2 * MANY, timeout=60, what="two deliveries of each")
        client = server.client(3)
        wait_for(lambda: client.xlen("stream-c") == 0, timeout=30, what="the stream to drain")
    assert sorted(handler.deliveries) == sorted((i, n) for i in ids for n in (1, 2))
    assert set(handler.handled) == set(ids[::2])
    letters = broker.dead_letters("stream-c", "read-group-c", limit=MANY)
    assert len(letters) == MANY // 2
    assert {letter.event.id for letter in letters} == set(ids[1::2])
    assert {letter.deliveries for letter in letters} == {2}
    assert client.xpending("stream-c", "read-group-c")["pending"] == 0


def test_a_slow_handler_of_ten_thousand_keeps_and_acks_them(
    broker: sb.Broker, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Handled for longer than retry_after: heartbeats touch the 10,000 events, and their
    acknowledgement checks that each is still this consumer's."""
    caplog.set_level(logging.WARNING, logger="streambroker")
    ids = publish_many(broker, "stream-c", MANY)
    handler = Handler()

    def slow(events: list[sb.Event]) -> None:
        time.sleep(0.7)  # past retry_after, and past the share of it acked unchecked
        handler(events)

    consumer = broker.consumer("read-group-c", "w", **{**FAST, "retry_after": 0.5, "lease": 3})
    assert consumer.consume(slow, count=MANY, block=False) == MANY
    assert sorted(handler.deliveries) == sorted((i, 1) for i in ids)
    assert server.client(3).xpending("stream-c", "read-group-c")["pending"] == 0
    assert xlen(server, "stream-c", 3) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_heartbeats_touch_a_slow_batch_that_follows_quick_ones(
    broker: sb.Broker, server: Server
) -> None:
    """The heartbeat thread, left waiting for a beat of a quick batch, still beats while
    a later batch is handled: the events in hand are touched (their idle time, which
    only grows otherwise, falls)."""
    publish_many(broker, "stream-c", 30)
    client = server.client(3)
    batches = 0
    seen: list[int] = []

    def touched() -> bool:
        rows = client.xpending_range("stream-c", "read-group-c", "-", "+", 10, consumername="w")
        seen.append(max(row["time_since_delivered"] for row in rows))
        return len(seen) > 1 and seen[-1] < seen[-2]

    def handler(events: list[sb.Event]) -> None:
        nonlocal batches
        batches += 1
        if batches == 3:
            wait_for(touched, what="a heartbeat touching the events in hand")

    consumer = broker.consumer("read-group-c", "w", **{**FAST, "retry_after": 0.3, "lease": 3})
    assert consumer.consume(handler, count=10, block=False) == 30
    assert batches == 3


def test_ten_thousand_pending_events_are_claimed_and_reclaimed(
    config: sb.ValidatedRegistry, server: Server
) -> None:
    with config.broker() as broker:  # the scripts are tested here: one face will do
        ids = publish_many(broker, "stream-c", MANY)

        def crash(events: list[sb.Event]) -> None:
            raise RuntimeError("crash")

        with pytest.raises(RuntimeError):
            broker.consumer("read-group-c", "crashed").consume(crash, count=MANY, block=False)
        consumer = broker.consumer("read-group-c", "taker", **{**FAST, "retry_after": 0.2})
        assert consumer.claim("crashed", "idle") == MANY
        client = server.client(3)
        rows = client.xpending_range("stream-c", "read-group-c", "-", "+", MANY)
        assert {row["consumer"] for row in rows} == {b"idle"}
        handler = Handler()
        with consuming(consumer, handler, count=MANY):  # takes them over from "idle"
            wait_for(lambda: len(handler.handled) == MANY, timeout=60, what="the reclaimed events")
        assert set(handler.handled) == set(ids)
        assert min(count for _, count in handler.deliveries) == 3  # read, claimed, reclaimed
        assert client.xpending("stream-c", "read-group-c")["pending"] == 0


# --- entries with more fields than a script can pass on ---------------------------------


def foreign_entry(fields: int) -> dict[str, bytes]:
    """An entry another program wrote: ``fields`` tags, and a body the broker reads."""
    entry = {f"f{i}": f"v{i}".encode() for i in range(fields)}
    entry.update({"$body": msgspec.msgpack.encode({"fields": fields}), "$codec": b"msgpack"})
    return entry


def meta_of(entry: dict[str, bytes]) -> dict[str, str]:
    return {name: value.decode() for name, value in entry.items() if not name.startswith("$")}


@pytest.mark.parametrize("fields", [5_000, 20_000])
def test_a_huge_foreign_entry_becomes_a_dead_letter_and_is_replayed(
    broker: sb.Broker, server: Server, fields: int
) -> None:
    client = server.client(3)
    before = broker.publish("stream-c", "before")
    entry = foreign_entry(fields)
    huge = client.xadd("stream-c", entry).decode()
    handler = Handler(lambda event: len(event.meta) == fields)
    consumer = broker.consumer("read-group-c", "w", max_deliveries=2, **FAST)
    with consuming(consumer, handler):
        wait_for(
            lambda: broker.dead_letters("stream-c", "read-group-c"),
            timeout=60,
            what="the dead letter",
        )
        after = broker.publish("stream-c", "after")  # the group goes on
        wait_for(lambda: after in handler.handled, timeout=60, what="the event published after")
    assert before in handler.handled
    assert [count for event_id, count in handler.deliveries if event_id == huge] == [1, 2]
    (letter,) = broker.dead_letters("stream-c", "read-group-c")
    assert (letter.event.id, letter.event.stream, letter.deliveries) == (huge, "stream-c", 2)
    assert dict(letter.event.meta) == meta_of(entry)
    assert letter.event.body == {"fields": fields}
    assert letter.error == f"ValueError: cannot handle {huge}"
    # Kept as one packed field beside the five $dead:* ones.
    ((_, raw),) = client.xrange(DEAD_C)
    assert len(raw) == 6
    assert b"$dead:fields" in raw
    assert client.xpending("stream-c", "read-group-c")["pending"] == 0

    # Replayed whole; failing again, it is buried again under its first id.
    assert broker.replay_dead_letters("stream-c", "read-group-c") == 1
    assert broker.dead_letters("stream-c", "read-group-c") == []
    handler.deliveries.clear()
    with consuming(consumer, handler):
        wait_for(
            lambda: broker.dead_letters("stream-c", "read-group-c"),
            timeout=60,
            what="the dead letter",
        )
    (again,) = broker.dead_letters("stream-c", "read-group-c")
    assert (again.event.id, dict(again.event.meta)) == (huge, meta_of(entry))
    assert [count for _, count in handler.deliveries] == [1, 2]

    # Replayed and handled this time: everything drains.
    assert broker.replay_dead_letters("stream-c", "read-group-c") == 1
    handler.fail = lambda event: False
    handler.handled.clear()
    with consuming(consumer, handler):
        wait_for(lambda: len(handler.handled) == 1, timeout=60, what="the replayed event")
        wait_for(lambda: client.xlen(REPLAY_C) == 0, timeout=60, what="the replay stream to drain")
    (replayed,) = handler.handled.values()
    assert replayed.key == REPLAY_C
    assert replayed.id != huge
    assert dict(replayed.meta) == meta_of(entry)
    assert replayed.body == {"fields": fields}
    assert broker.dead_letters("stream-c", "read-group-c") == []
    assert client.xlen("stream-c") == 0


@pytest.mark.parametrize("extra", [0, 1])
def test_entries_are_copied_field_by_field_up_to_the_limit(
    broker: sb.Broker, server: Server, extra: int
) -> None:
    """Up to MAX_COPIED_FIELDS fields a dead letter holds them as they were; one more and
    they are packed. Both list and replay the same."""
    assert MAX_META_TAGS + 2 <= MAX_COPIED_FIELDS  # what the broker publishes is never packed
    client = server.client(3)
    entry = foreign_entry(MAX_COPIED_FIELDS - 2 + extra)  # with $body and $codec
    huge = client.xadd("stream-c", entry).decode()
    consumer = broker.consumer("read-group-c", "w", max_deliveries=1, **FAST)
    handler = Handler(lambda event: event.id == huge)
    assert consumer.consume(handler, block=False) == 1
    ((_, raw),) = client.xrange(DEAD_C)
    assert (b"$dead:fields" in raw) == bool(extra)
    assert len(raw) == (6 if extra else MAX_COPIED_FIELDS + 5)  # with the five $dead:*
    (letter,) = broker.dead_letters("stream-c", "read-group-c")
    assert (letter.event.id, dict(letter.event.meta)) == (huge, meta_of(entry))
    assert broker.replay_dead_letters("stream-c", "read-group-c") == 1
    ((_, replayed),) = client.xrange(REPLAY_C)
    assert list(replayed.items())[: len(entry)] == [(n.encode(), v) for n, v in entry.items()]
    assert client.xlen(DEAD_C) == 0


def drive(broker: sb.Broker, op: Any, loop: Loop) -> Any:
    """Run an operation of the core with the broker's own driver, of either face."""
    done = broker._driver.run(op)
    return loop.run(done) if inspect.isawaitable(done) else done


def packed_dead_letter(broker: sb.Broker, client: redis.Redis) -> tuple[str, list[bytes]]:
    """A foreign entry too large to copy, set aside as a dead letter: (its id, its fields)."""
    huge = client.xadd("stream-c", foreign_entry(MAX_COPIED_FIELDS)).decode()
    consumer = broker.consumer("read-group-c", "w", max_deliveries=1, **FAST)
    consumer.consume(Handler(lambda event: event.id == huge), block=False)
    ((letter_id, fields),) = client.xrange(DEAD_C)
    return letter_id.decode(), [word for pair in fields.items() for word in pair]


def test_replaying_a_packed_letter_another_replay_took_adds_nothing(
    broker: sb.Broker, server: Server, event_loop_thread: Loop
) -> None:
    client = server.client(3)
    letter_id, fields = packed_dead_letter(broker, client)
    client.xdel(DEAD_C, letter_id)  # as if another replay had just moved it
    replay = _replay_whole(
        "second", broker.registry.streams["stream-c"], "read-group-c", letter_id, fields
    )
    assert drive(broker, replay, event_loop_thread) == 0
    assert client.xlen(REPLAY_C) == 0


def test_a_packed_letter_that_cannot_be_written_stays_a_dead_letter(
    broker: sb.Broker, server: Server, event_loop_thread: Loop
) -> None:
    client = server.client(3)
    letter_id, fields = packed_dead_letter(broker, client)
    client.delete(REPLAY_C)
    client.set(REPLAY_C, "not a stream")
    replay = _replay_whole(
        "second", broker.registry.streams["stream-c"], "read-group-c", letter_id, fields
    )
    with pytest.raises(sb.ServerReplyError, match="WRONGTYPE") as caught:
        drive(broker, replay, event_loop_thread)
    assert f"dead letter {letter_id} of group 'read-group-c'" in str(caught.value)
    assert caught.value.pool == "second"
    assert [entry_id.decode() for entry_id, _ in client.xrange(DEAD_C)] == [letter_id]
