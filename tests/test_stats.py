"""Statistics: every figure checked against a scenario where the value is known."""

from __future__ import annotations

import threading

import pytest

import streambroker as sb
from streambroker.core.stats import holding_back_warning

from .conftest import Server, wait_for
from .test_gc import fail_after_acking

FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.2, "retry_delay": 0.01}


def test_figures_of_a_known_scenario(broker: sb.Broker, server: Server) -> None:
    ids = [broker.publish("stream-a", n) for n in range(10)]
    broker.consumer("read-group-a", "c1").consume(lambda events: None, count=4, block=False)
    # c1 handled everything; publish more, c2 takes three and crashes after acking one.
    more = [broker.publish("stream-a", n) for n in range(10, 16)]
    with pytest.raises(RuntimeError):
        broker.consumer("read-group-a", "c2").consume(fail_after_acking(1), count=3, block=False)
    server.client().xgroup_create("stream-a", "orphan", id="0")

    stats = broker.stream_stats("stream-a")
    assert stats.stream == "stream-a"
    assert stats.pool == "default"
    assert stats.length == 16  # read-group-ab has not read anything: nothing removed
    assert stats.oldest_event_age is not None
    assert 0 <= stats.oldest_event_age < 60
    assert stats.orphan_groups == ("orphan",)
    a, ab = stats.groups
    assert a.group == "read-group-a"
    assert a.lag == 3
    assert a.pending == 2
    assert a.last_delivered_id == more[2]
    assert a.last_delivered_age is not None
    assert 0 <= a.last_delivered_age < 60
    assert a.lowest_pending_id == more[1]
    assert a.lowest_pending_age is not None
    assert a.dead_letters == 0
    assert [(c.name, c.pending, c.alive) for c in a.consumers] == [
        ("c1", 0, False),
        ("c2", 2, False),
    ]
    assert all(0 <= c.idle < 60 for c in a.consumers)
    assert ab.group == "read-group-ab"
    assert (ab.lag, ab.pending, ab.consumers) == (16, 0, ())
    assert ab.last_delivered_id == "0-0"
    assert ab.last_delivered_age is None
    assert (ab.lowest_pending_id, ab.lowest_pending_age) == (None, None)
    again = broker.group_stats("stream-a", "read-group-a")
    assert (again.group, again.lag, again.pending, again.lowest_pending_id) == (
        a.group,
        a.lag,
        a.pending,
        a.lowest_pending_id,
    )
    del ids


def test_an_empty_stream(broker: sb.Broker) -> None:
    stats = broker.stream_stats("stream-c")
    assert (stats.length, stats.oldest_event_age, stats.orphan_groups) == (0, None, ())
    (group,) = stats.groups
    assert (group.lag, group.pending, group.dead_letters) == (0, 0, 0)


def test_all_streams_in_registration_order(broker: sb.Broker) -> None:
    broker.publish("stream-c", 1)
    assert [s.stream for s in broker.stats()] == ["stream-a", "stream-b", "stream-c"]
    assert [s.length for s in broker.stats("stream-c", "stream-a")] == [1, 0]
    with pytest.raises(sb.UnknownStreamError):
        broker.stats("nope")
    with pytest.raises(sb.InvalidArgumentError, match="read-group-c"):
        broker.group_stats("stream-a", "read-group-c")


def test_lag_after_deletions_in_the_middle(broker: sb.Broker, server: Server) -> None:
    ids = [broker.publish("stream-b", n) for n in range(6)]
    broker.consumer("read-group-ab").consume(lambda events: None, count=1, block=False)
    more = [broker.publish("stream-b", n) for n in range(5)]
    server.client().xdel("stream-b", more[2])
    assert broker.group_stats("stream-b", "read-group-ab").lag == 4
    del ids


def test_dead_letters_and_liveness(broker: sb.Broker, server: Server) -> None:
    broker.publish("stream-c", "poison")

    def refuse(events: list[sb.Event]) -> None:
        for event in events:
            event.fail("no")

    broker.consumer("read-group-c", "w", max_deliveries=1, **FAST).consume(refuse, block=False)
    assert broker.group_stats("stream-c", "read-group-c").dead_letters == 1
    assert broker.stream_stats("stream-c").length == 0  # settled by the dead letter

    consumer = broker.consumer("read-group-c", "live", **FAST)
    thread = threading.Thread(target=consumer.consume, args=(lambda events: None,))
    thread.start()
    try:
        wait_for(
            lambda: any(c.alive for c in broker.group_stats("stream-c", "read-group-c").consumers),
            what="a live consumer",
        )
        alive = {c.name: c.alive for c in broker.group_stats("stream-c", "read-group-c").consumers}
        assert alive == {"w": False, "live": True}
    finally:
        consumer.stop()
        thread.join(timeout=10)
    assert not any(c.alive for c in broker.group_stats("stream-c", "read-group-c").consumers)


def test_replayed_events_count_in_lag(broker: sb.Broker) -> None:
    broker.publish("stream-c", "x")

    def refuse(events: list[sb.Event]) -> None:
        for event in events:
            event.fail("no")

    broker.consumer("read-group-c", max_deliveries=1).consume(refuse, block=False)
    assert broker.replay_dead_letters("stream-c", "read-group-c") == 1
    group = broker.group_stats("stream-c", "read-group-c")
    assert (group.lag, group.dead_letters) == (1, 0)


def test_a_group_with_no_consumer_running_is_said_to_hold_its_stream_back(
    broker: sb.Broker,
) -> None:
    for n in range(3):
        broker.publish("stream-a", n)
    # read-group-a consumes and stops (its lease is released: it does not run any more);
    # read-group-ab never ran.
    broker.consumer("read-group-a", "gone").consume(lambda events: None, block=False)
    broker.publish("stream-a", 3)
    stream = broker.stream_stats("stream-a")
    held = {group.group: group for group in stream.held_back_by}
    assert sorted(held) == ["read-group-a", "read-group-ab"]
    assert (held["read-group-a"].held_back, held["read-group-ab"].held_back) == (1, 4)
    assert stream.memory is not None
    assert stream.memory > 0
    warning = holding_back_warning(stream, held["read-group-ab"])
    assert warning.startswith(
        "consumer group read-group-ab holds back 4 events of stream stream-a, the oldest "
    )
    assert "none of its consumers runs" in warning
    # A stream nobody holds back costs no MEMORY USAGE round trip, and says None.
    other = broker.stream_stats("stream-c")
    assert other.held_back_by == ()
    assert other.memory is None
