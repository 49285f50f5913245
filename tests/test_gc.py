"""Garbage collection: an event is removed exactly when every registered group acked it."""

from __future__ import annotations

import threading

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import streambroker as sb

from .conftest import OpenBroker, Server, wait_for

pytestmark = pytest.mark.anywhere


def ids_in(client: redis.Redis, stream: str) -> list[str]:
    return [entry_id.decode() for entry_id, _ in client.xrange(stream)]


def fail_after_acking(count: int) -> sb.Handler:
    """A handler that acks its first ``count`` events, then raises."""

    def handler(events: list[sb.Event]) -> None:
        for event in events[:count]:
            event.ack()
        raise RuntimeError("handler failed")

    return handler


#: Which of the pending events a rule takes: drawn as a number, before the pending events
#: are known, so that what is drawn does not depend on the server's state (on a replay,
#: timing may leave other events pending, and hypothesis must draw the same).
PICK = st.integers(0, 1 << 16)


def _picked(pending: list[tuple[str, str]], pick: int) -> tuple[str, str]:
    return pending[pick % len(pending)]


def ignore(events: list[sb.Event]) -> None:
    """A handler that returns at once (so every event is acknowledged)."""


def test_stream_drains_once_every_group_acked(broker: sb.Broker, server: Server) -> None:
    ids = [broker.publish("stream-a", n) for n in range(50)]
    client = server.client()
    broker.consumer("read-group-a").consume(ignore, count=7, block=False)
    assert ids_in(client, "stream-a") == ids  # read-group-ab has read nothing yet
    broker.consumer("read-group-ab").consume(ignore, count=7, block=False)
    assert client.xlen("stream-a") == 0


def test_a_waiting_consumer_collects_soon_after_its_last_ack(
    broker: sb.Broker, server: Server
) -> None:
    """Collecting is spread over round trips, yet a consumer left waiting for events (here
    up to 8 s in one read) still collects what it acknowledged, well before that read
    ends."""
    client = server.client(3)
    consumer = broker.consumer("read-group-c", block_timeout=8.0)
    thread = threading.Thread(target=consumer.consume, args=(ignore,), kwargs={"count": 3})
    thread.start()
    try:
        for n in range(10):
            broker.publish("stream-c", n)
        wait_for(lambda: client.xlen("stream-c") == 0, timeout=6.0, what="the stream drained")
        assert broker.group_stats("stream-c", "read-group-c").pending == 0
    finally:
        consumer.stop()
        broker.publish("stream-c", "ends the wait")
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_pending_and_undelivered_events_stay(broker: sb.Broker, server: Server) -> None:
    ids = [broker.publish("stream-a", n) for n in range(6)]
    client = server.client()
    broker.consumer("read-group-ab").consume(ignore, block=False)
    with pytest.raises(RuntimeError):
        broker.consumer("read-group-a", collect=False).consume(
            fail_after_acking(2), count=4, block=False
        )
    assert ids_in(client, "stream-a") == ids
    # read-group-a: ids[0:2] acked, ids[2:4] pending, ids[4:6] never delivered.
    assert broker.collect_garbage("stream-a") == {"stream-a": 2}
    assert ids_in(client, "stream-a") == ids[2:]


def test_acks_out_of_order_are_collected_around_a_pending_event(
    broker: sb.Broker, server: Server
) -> None:
    ids = [broker.publish("stream-b", n) for n in range(5)]
    client = server.client()

    def skip_first(events: list[sb.Event]) -> None:
        for event in events[1:]:
            event.ack()
        raise RuntimeError("the first one failed")

    with pytest.raises(RuntimeError):
        broker.consumer("read-group-ab").consume(skip_first, count=5, block=False)
    assert ids_in(client, "stream-b") == ids[:1]  # collected as the acks went out


def test_collect_garbage_on_demand(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, server: Server
) -> None:
    with open_broker(config) as broker:
        for n in range(30):
            broker.publish("stream-a", n)
            broker.publish("stream-c", n)
        for group in ("read-group-a", "read-group-ab", "read-group-c"):
            broker.consumer(group, collect=False).consume(ignore, count=8, block=False)
        assert server.client().xlen("stream-a") == 30  # consumers told not to collect
        assert broker.collect_garbage() == {"stream-a": 30, "stream-b": 0, "stream-c": 30}
        assert server.client().xlen("stream-a") == 0
        assert server.client(3).xlen("stream-c") == 0
        assert broker.collect_garbage("stream-c") == {"stream-c": 0}
        with pytest.raises(sb.UnknownStreamError, match="nope"):
            broker.collect_garbage("nope")


def test_a_group_that_has_not_started_holds_everything(broker: sb.Broker, server: Server) -> None:
    for n in range(10):
        broker.publish("stream-a", n)
    broker.consumer("read-group-a").consume(ignore, block=False)
    assert broker.collect_garbage("stream-a") == {"stream-a": 0}
    assert server.client().xlen("stream-a") == 10


def test_a_registered_group_missing_on_the_server_holds_everything(
    broker: sb.Broker, server: Server
) -> None:
    for n in range(10):
        broker.publish("stream-a", n)
    broker.consumer("read-group-a").consume(ignore, block=False)
    server.client().xgroup_destroy("stream-a", "read-group-ab")
    assert broker.collect_garbage("stream-a") == {"stream-a": 0}
    assert server.client().xlen("stream-a") == 10


def test_unregistered_groups_do_not_hold_events_back(broker: sb.Broker, server: Server) -> None:
    broker.publish("stream-c", "first")
    server.client(3).xgroup_create("stream-c", "orphan", id="0")
    broker.publish("stream-c", "second")
    broker.consumer("read-group-c").consume(ignore, block=False)
    assert server.client(3).xlen("stream-c") == 0


def test_a_large_acknowledged_backlog_goes_in_one_call(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, server: Server
) -> None:
    client = server.client(3)
    with open_broker(config) as broker:
        broker.consumer("read-group-c").consume(lambda events: None, block=False)  # the group
        pipe = client.pipeline(transaction=False)
        for n in range(20_000):
            pipe.xadd("stream-c", {"n": str(n)})
        pipe.execute()
        client.execute_command("XGROUP", "SETID", "stream-c", "read-group-c", "$")
        assert broker.collect_garbage("stream-c") == {"stream-c": 20_000}
    assert client.xlen("stream-c") == 0


def test_a_stream_that_is_not_a_stream_is_a_clear_error(broker: sb.Broker, server: Server) -> None:
    broker.publish("stream-a", 1)
    server.client().delete("stream-b")
    server.client().set("stream-b", "not a stream")
    with pytest.raises(sb.ServerReplyError, match="stream-b"):
        broker.collect_garbage("stream-b")


STREAM_GROUPS = {"stream-a": ("read-group-a", "read-group-ab"), "stream-b": ("read-group-ab",)}
GROUPS = ("read-group-a", "read-group-ab")
CONSUMERS = ("c1", "c2")


@pytest.mark.redis8
def test_no_event_is_removed_before_every_group_acked_it(
    open_broker: OpenBroker, server: Server
) -> None:
    """Random interleavings of publish, read, ack, fail, claim, dead-letter, leave, forget
    and collect (on Redis 8.2 too)."""
    registry = sb.Registry()
    registry.register_redis(server.pool_address(5))
    for stream, groups in STREAM_GROUPS.items():
        registry.register_stream(stream, "default", list(groups))
    config = registry.validate()

    class Interleavings(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.client = server.client(5)
            self.client.flushdb()
            self.broker = open_broker(config)
            self.published: dict[str, list[str]] = {s: [] for s in STREAM_GROUPS}
            self.acked: dict[tuple[str, str], set[str]] = {
                (s, g): set() for s, groups in STREAM_GROUPS.items() for g in groups
            }

        def teardown(self) -> None:
            self.broker.close()
            self.client.close()

        @initialize()
        def create_groups(self) -> None:
            for group in GROUPS:  # a consumer creates its group
                self.broker.consumer(group, "c1").consume(lambda events: None, block=False)

        def _settled(self, stream: str, event_id: str) -> bool:
            return all(event_id in self.acked[stream, g] for g in STREAM_GROUPS[stream])

        def _pending(self, stream: str, group: str) -> list[tuple[str, str]]:
            if group not in STREAM_GROUPS[stream]:
                return []
            rows = self.client.xpending_range(stream, group, "-", "+", 10_000)
            return [(r["message_id"].decode(), r["consumer"].decode()) for r in rows]

        @rule(stream=st.sampled_from(sorted(STREAM_GROUPS)), n=st.integers(1, 4))
        def publish(self, stream: str, n: int) -> None:
            with self.broker.batch() as batch:
                for i in range(n):
                    batch.publish(stream, i)
            self.published[stream].extend(batch.ids)

        @rule(
            group=st.sampled_from(GROUPS),
            consumer=st.sampled_from(CONSUMERS),
            count=st.integers(1, 5),
        )
        def read_without_ack(self, group: str, consumer: str, count: int) -> None:
            for stream in [s for s in STREAM_GROUPS if group in STREAM_GROUPS[s]]:
                # One stream at a time: on a cluster, the streams hash to other slots.
                self.client.xreadgroup(group, consumer, {stream: ">"}, count=count)

        @rule(
            group=st.sampled_from(GROUPS),
            consumer=st.sampled_from(CONSUMERS),
            count=st.integers(1, 5),
            acks=st.integers(0, 5),
            fails=st.booleans(),
            forget_after=st.sampled_from([0, 0.001]),
        )
        def consume(
            self, group: str, consumer: str, count: int, acks: int, fails: bool, forget_after: float
        ) -> None:
            """Our consumer: the handler acks some events and then fails, or returns. As it
            reclaims it may forget the other consumers (only those holding nothing)."""
            delivered: list[sb.Event] = []

            def handler(events: list[sb.Event]) -> None:
                delivered.extend(events)
                if fails:
                    fail_after_acking(acks)(events)

            consumer_ = self.broker.consumer(group, name=consumer, forget_after=forget_after)
            try:
                consumer_.consume(handler, count=count, block=False)
            except RuntimeError:
                assert fails
            else:
                assert not (fails and delivered)
            for event in delivered:
                if event.acked or not fails:
                    self.acked[event.stream, group].add(event.id)
            # An event the handler failed on its last allowed delivery is settled too.
            for stream in (s for s in STREAM_GROUPS if group in STREAM_GROUPS[s]):
                for letter in self.broker.dead_letters(stream, group):
                    self.acked[stream, group].add(letter.event.id)

        @rule(data=st.data(), stream=st.sampled_from(sorted(STREAM_GROUPS)))
        def ack_some(self, data: st.DataObject, stream: str) -> None:
            group = data.draw(st.sampled_from(STREAM_GROUPS[stream]))
            picks = data.draw(st.lists(PICK, max_size=3))
            pending = self._pending(stream, group)
            if pending:
                chosen = list(dict.fromkeys(_picked(pending, pick) for pick in picks))
                if chosen:
                    self.client.xack(stream, group, *[i for i, _ in chosen])
                    self.acked[stream, group].update(i for i, _ in chosen)

        @rule(group=st.sampled_from(GROUPS), consumer=st.sampled_from(CONSUMERS))
        def leave(self, group: str, consumer: str) -> None:
            streams = [s for s in STREAM_GROUPS if group in STREAM_GROUPS[s]]
            before = {s: self._pending(s, group) for s in streams}
            kept = self.broker.consumer(group, name=consumer).leave()
            assert {s: self._pending(s, group) for s in streams} == before
            assert kept == [s for s in streams if any(c == consumer for _, c in before[s])]

        @rule(data=st.data(), stream=st.sampled_from(sorted(STREAM_GROUPS)))
        def claim(self, data: st.DataObject, stream: str) -> None:
            """Another consumer takes pending events over (as after a crash)."""
            group = data.draw(st.sampled_from(STREAM_GROUPS[stream]))
            pick = data.draw(PICK)
            pending = self._pending(stream, group)
            if pending:
                event_id, owner = _picked(pending, pick)
                target = next(c for c in CONSUMERS if c != owner)
                self.client.xclaim(stream, group, target, 0, [event_id])

        @rule(data=st.data(), stream=st.sampled_from(sorted(STREAM_GROUPS)))
        def dead_letter(self, data: st.DataObject, stream: str) -> None:
            """Settle a poison event: copied aside, then acknowledged for its group."""
            group = data.draw(st.sampled_from(STREAM_GROUPS[stream]))
            pick = data.draw(PICK)
            pending = self._pending(stream, group)
            if pending:
                event_id, _ = _picked(pending, pick)
                entry = self.client.xrange(stream, event_id, event_id)
                if entry:
                    self.client.xadd(f"dead:{stream}:{group}", entry[0][1])
                self.client.xack(stream, group, event_id)
                self.acked[stream, group].add(event_id)

        @precondition(lambda self: any(self.published.values()))
        @rule(streams=st.lists(st.sampled_from(sorted(STREAM_GROUPS)), unique=True))
        def collect(self, streams: list[str]) -> None:
            self.broker.collect_garbage(*streams)
            for stream in streams or STREAM_GROUPS:
                present = set(ids_in(self.client, stream))
                settled = {i for i in self.published[stream] if self._settled(stream, i)}
                assert not (settled & present), "acknowledged events were left behind"

        @invariant()
        def nothing_unacknowledged_is_gone(self) -> None:
            for stream, ids in self.published.items():
                present = set(ids_in(self.client, stream))
                missing = [i for i in ids if i not in present and not self._settled(stream, i)]
                assert not missing, f"{stream} lost unacknowledged events {missing}"

    run_state_machine_as_test(
        Interleavings,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
