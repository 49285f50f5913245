"""Operators' tools of the API, on both faces: one dead letter replayed or deleted by id,
a group moved or deleted, a stream purged, the newest events read."""

from __future__ import annotations

import pytest

import streambroker as sb
from streambroker.wire.keys import dead_letter_key, replay_key

from .conftest import Server
from .test_limits import MAX_COPIED_FIELDS, packed_dead_letter


def _spec(stream: str) -> sb.StreamSpec:
    """A stream of the seed's registry, for the names of its side keys."""
    return sb.StreamSpec(stream, "default", ())


def bodies(consumer: sb.Consumer) -> list[object]:
    """The bodies ``consumer`` is handed now (acknowledging them)."""
    seen: list[object] = []
    consumer.consume(lambda events: seen.extend(e.body for e in events), block=False)
    return seen


def bury_all(broker: sb.Broker, group: str = "read-group-a") -> None:
    def reject(events: list[sb.Event]) -> None:
        for event in events:
            event.fail("rejected")

    broker.consumer(group, "burier", max_deliveries=1).consume(reject, block=False)


def test_one_dead_letter_is_replayed_or_deleted_by_its_id(broker: sb.Broker) -> None:
    for n in range(3):
        broker.publish("stream-a", n)
    bury_all(broker)
    first, second, third = broker.dead_letters("stream-a", "read-group-a")

    assert broker.replay_dead_letter("stream-a", "read-group-a", second.id) is True
    assert broker.replay_dead_letter("stream-a", "read-group-a", second.id) is False
    assert broker.delete_dead_letter("stream-a", "read-group-a", first.id) is True
    assert broker.delete_dead_letter("stream-a", "read-group-a", first.id) is False

    assert [d.id for d in broker.dead_letters("stream-a", "read-group-a")] == [third.id]
    # Only the replayed one comes back, and only to its group.
    assert bodies(broker.consumer("read-group-a")) == [1]
    assert broker.group_stats("stream-a", "read-group-ab").dead_letters == 0
    with pytest.raises(sb.InvalidArgumentError, match="a dead letter id is a stream entry id"):
        broker.delete_dead_letter("stream-a", "read-group-a", "1")
    with pytest.raises(sb.InvalidArgumentError, match="does not read stream 'stream-c'"):
        broker.replay_dead_letter("stream-c", "read-group-a", third.id)


def test_a_packed_dead_letter_is_replayed_whole_by_its_id(
    broker: sb.Broker, server: Server
) -> None:
    client = server.client(3)
    letter_id, _ = packed_dead_letter(broker, client)

    assert broker.replay_dead_letter("stream-c", "read-group-c", letter_id) is True

    assert client.xlen(dead_letter_key(_spec("stream-c"), "read-group-c")) == 0
    ((_, fields),) = client.xrange(replay_key(_spec("stream-c"), "read-group-c"))
    assert sum(not name.startswith(b"$") for name in fields) == MAX_COPIED_FIELDS


def test_reset_group_moves_its_position(broker: sb.Broker) -> None:
    ids = [broker.publish("stream-a", n) for n in range(3)]
    consumer = broker.consumer("read-group-a", collect=False)
    assert bodies(consumer) == [0, 1, 2]

    broker.reset_group("stream-a", "read-group-a", "0")
    assert broker.group_stats("stream-a", "read-group-a").lag == 3
    assert bodies(consumer) == [0, 1, 2]
    broker.reset_group("stream-a", "read-group-a", ids[1])
    assert bodies(consumer) == [2]
    broker.reset_group("stream-a", "read-group-a", "0")
    broker.reset_group("stream-a", "read-group-a", "$")
    assert broker.group_stats("stream-a", "read-group-a").lag == 0
    assert bodies(consumer) == []
    with pytest.raises(sb.InvalidArgumentError, match="the position is an event id"):
        broker.reset_group("stream-a", "read-group-a", "yesterday")


def test_delete_group_removes_an_orphan_group_and_its_keys(
    broker: sb.Broker, server: Server
) -> None:
    client = server.client()
    broker.publish("stream-a", "x")
    for group in ("read-group-a", "read-group-ab"):  # as their first consumers would
        client.xgroup_create("stream-a", group, "0")
    client.xgroup_create("stream-a", "old-group", "0")
    client.xadd(dead_letter_key(_spec("stream-a"), "old-group"), {"$dead:error": "x"})

    assert broker.delete_group("stream-a", "old-group") is True

    assert [g["name"] for g in client.xinfo_groups("stream-a")] == [
        b"read-group-a",
        b"read-group-ab",
    ]
    assert client.exists(dead_letter_key(_spec("stream-a"), "old-group")) == 0
    assert broker.delete_group("stream-a", "old-group") is False
    with pytest.raises(sb.InvalidArgumentError, match="is registered for stream 'stream-a'"):
        broker.delete_group("stream-a", "read-group-a")
    assert len(client.xinfo_groups("stream-a")) == 2
    client.delete("stream-b")
    assert broker.delete_group("stream-b", "old-group") is False  # no stream, no group


def test_purge_deletes_every_event_and_keeps_the_groups(broker: sb.Broker) -> None:
    for n in range(4):
        broker.publish("stream-a", n)
    bury_all(broker)  # four dead letters of read-group-a
    broker.replay_dead_letter(
        "stream-a", "read-group-a", broker.dead_letters("stream-a", "read-group-a")[0].id
    )
    with pytest.raises(RuntimeError):
        broker.consumer("read-group-ab", "c1").consume(_crash, block=False)

    assert broker.purge("stream-a") == 5  # the four events and the replayed one

    figures = broker.stream_stats("stream-a")
    assert figures.length == 0
    assert [g.group for g in figures.groups] == ["read-group-a", "read-group-ab"]
    assert broker.group_stats("stream-a", "read-group-a").dead_letters == 3
    after = broker.publish("stream-a", "after")
    assert bodies(broker.consumer("read-group-ab", "c1")) == ["after"]
    assert broker.stream_stats("stream-a").last_id == after


def _crash(events: list[sb.Event]) -> None:
    raise RuntimeError("crash")


def test_latest_reads_the_newest_events_oldest_first(broker: sb.Broker) -> None:
    assert broker.latest("stream-b", 3) == []
    ids = [broker.publish("stream-b", n) for n in range(5)]
    assert [(e.id, e.body) for e in broker.latest("stream-b", 2)] == [(ids[3], 3), (ids[4], 4)]
    assert [e.id for e in broker.latest("stream-b", 10)] == ids
    assert broker.stream_stats("stream-b").entries_added == 5
    with pytest.raises(sb.InvalidArgumentError, match="count must be an integer >= 1"):
        broker.latest("stream-b", 0)
