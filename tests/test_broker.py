"""Publishing and consuming on the real servers: the foundation's semantics."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import pytest

import streambroker as sb

from .conftest import OpenBroker, Server, free_port, wait_for

pytestmark = pytest.mark.anywhere

ID = re.compile(r"^\d+-\d+$")


class Recorder:
    """A handler that records every call."""

    def __init__(self) -> None:
        self.calls: list[list[sb.Event]] = []

    def __call__(self, events: list[sb.Event]) -> None:
        self.calls.append(list(events))

    @property
    def events(self) -> list[sb.Event]:
        return [event for call in self.calls for event in call]

    def bodies(self, stream: str | None = None) -> list[object]:
        return [e.body for e in self.events if stream is None or e.stream == stream]


def pending(server: Server, stream: str, group: str, db: int = 0) -> int:
    client = server.client(db)
    try:
        summary = client.xpending(stream, group)
    finally:
        client.close()
    return int(summary["pending"])


def test_publish_returns_the_entry_id(broker: sb.Broker, server: Server) -> None:
    event_id = broker.publish("stream-a", "hello")
    assert ID.match(event_id)
    entries = server.client().xrange("stream-a")
    assert [entry_id.decode() for entry_id, _ in entries] == [event_id]


def test_event_published_before_any_consumer_reaches_every_group(broker: sb.Broker) -> None:
    first = broker.publish("stream-a", "before")
    for group in ("read-group-a", "read-group-ab"):
        recorder = Recorder()
        broker.consumer(group).consume(recorder, block=False)
        assert [(e.id, e.body) for e in recorder.events] == [(first, "before")]


def test_batch_sends_everything_on_exit_in_publish_order(broker: sb.Broker, server: Server) -> None:
    with broker.batch() as batch:
        for n in range(5):
            batch.publish("stream-a", n)
            batch.publish("stream-c", {"n": n}, meta={"k": str(n)})
        assert len(batch) == 10
        assert server.client().exists("stream-a") == 0  # nothing sent before the end
    assert len(batch.ids) == 10
    assert all(ID.match(i) for i in batch.ids)
    a_ids = [i.decode() for i, _ in server.client().xrange("stream-a")]
    c_ids = [i.decode() for i, _ in server.client(3).xrange("stream-c")]
    assert batch.ids[0::2] == a_ids
    assert batch.ids[1::2] == c_ids


def test_batch_that_raises_sends_nothing(broker: sb.Broker, server: Server) -> None:
    batch = broker.batch()

    def publish_then_fail() -> None:
        with batch:
            batch.publish("stream-a", "x")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        publish_then_fail()
    assert batch.ids == []
    assert server.client().exists("stream-a") == 0


def test_batch_rejects_a_bad_event_at_once(broker: sb.Broker, server: Server) -> None:
    with broker.batch() as batch:
        batch.publish("stream-a", "fine")
        with pytest.raises(sb.UnknownStreamError, match="stream-z"):
            batch.publish("stream-z", "lost?")
    assert len(batch.ids) == 1
    assert server.client().xlen("stream-a") == 1


def _last_id(server: Server, stream: str, db: int = 0) -> str:
    ((entry_id, _),) = server.client(db).xrevrange(stream, count=1)
    return str(entry_id.decode())


def _assert_in_step(broker: sb.Broker, server: Server) -> None:
    """A publish and a batch over both pools get the ids of the events they stored."""
    assert broker.publish("stream-a", "check") == _last_id(server, "stream-a")
    with broker.batch() as batch:
        batch.publish("stream-a", "check")
        batch.publish("stream-c", "check")
    assert batch.ids == [_last_id(server, "stream-a"), _last_id(server, "stream-c", 3)]


def test_an_error_reply_in_a_batch_names_the_command_and_the_rest_stays_in_step(
    broker: sb.Broker, server: Server
) -> None:
    broker.publish("stream-a", 0)  # the pool's groups exist from here on
    admin = server.client()
    admin.delete("stream-b")
    admin.set("stream-b", "not a stream")
    batch = broker.batch()
    batch.publish("stream-a", 1)
    batch.publish("stream-b", 2)
    batch.publish("stream-a", 3)
    with pytest.raises(sb.ServerReplyError, match=r"'default': XADD stream-b: WRONGTYPE"):
        batch.flush()
    # Not a transaction: the events around the refused one were published.
    assert admin.xlen("stream-a") == 3
    # Every reply of that round trip was read: the next ones answer the next commands.
    _assert_in_step(broker, server)


def test_an_error_reply_to_publish_names_the_stream(broker: sb.Broker, server: Server) -> None:
    broker.publish("stream-a", 0)
    admin = server.client()
    admin.delete("stream-b")
    admin.set("stream-b", "not a stream")
    with pytest.raises(sb.ServerReplyError, match=r"'default': XADD stream-b: WRONGTYPE"):
        broker.publish("stream-b", 1)
    assert broker.publish("stream-a", 2) == _last_id(server, "stream-a")


def test_connections_killed_between_calls_are_replaced(broker: sb.Broker, server: Server) -> None:
    broker.publish("stream-a", 0)
    with broker.batch() as batch:
        batch.publish("stream-c", 0)
    server.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    _assert_in_step(broker, server)


def test_read_browses_a_stream_without_a_group(broker: sb.Broker, server: Server) -> None:
    assert broker.stream_stats("stream-a").last_id == "0-0"
    ids = [broker.publish("stream-a", n, meta={"n": str(n)}) for n in range(5)]

    first = broker.read("stream-a", count=3)

    assert [(e.stream, e.id, e.body, e.tag("n")) for e in first] == [
        ("stream-a", ids[n], n, str(n)) for n in range(3)
    ]
    assert [e.id for e in broker.read("stream-a", first[-1].id)] == ids[3:]
    assert broker.read("stream-a", ids[-1]) == []
    assert broker.stream_stats("stream-a").last_id == ids[-1]
    # Nothing was delivered to a group or acknowledged: both groups still have it all to read.
    for group in broker.stream_stats("stream-a").groups:
        assert (group.lag, group.pending, group.last_delivered_id) == (5, 0, "0-0")
    assert server.client().xlen("stream-a") == 5


def test_read_waits_for_the_next_event(broker: sb.Broker) -> None:
    after = broker.stream_stats("stream-c").last_id
    publisher = threading.Timer(0.1, broker.publish, ("stream-c", "late"))
    publisher.start()
    try:
        events = broker.read("stream-c", after, block=5.0)
    finally:
        publisher.join()
    assert [e.body for e in events] == ["late"]
    assert broker.read("stream-c", events[0].id, block=0.05) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"after": "latest"}, "after must be an event id such as '1518951480106-0' or '0', got "),
        ({"count": 0}, "count must be an integer >= 1, got 0"),
        ({"block": 0}, "block must be a positive number of seconds or None, got 0"),
        ({"block": 10.0}, "block (10.0 s) must be shorter than the broker's socket_timeout"),
    ],
)
def test_read_refuses_bad_arguments_naming_the_stream(
    broker: sb.Broker, arguments: dict[str, object], message: str
) -> None:
    with pytest.raises(
        sb.InvalidArgumentError, match=re.escape(f"reading stream stream-a: {message}")
    ):
        broker.read("stream-a", **arguments)  # type: ignore[arg-type]
    with pytest.raises(sb.UnknownStreamError, match="stream-z"):
        broker.read("stream-z")


def test_count_bounds_each_call_across_streams_and_keeps_order(broker: sb.Broker) -> None:
    a = [broker.publish("stream-a", f"a{n}") for n in range(7)]
    b = [broker.publish("stream-b", f"b{n}") for n in range(5)]
    recorder = Recorder()
    handled = broker.consumer("read-group-ab").consume(recorder, count=3, block=False)
    assert handled == 12
    assert recorder.calls
    assert all(1 <= len(call) <= 3 for call in recorder.calls)
    assert [e.id for e in recorder.events if e.stream == "stream-a"] == a
    assert [e.id for e in recorder.events if e.stream == "stream-b"] == b
    # Each call is in id order, so events of both streams come in publish order.
    for call in recorder.calls:
        assert [e.id for e in call] == sorted((e.id for e in call), key=_id_key)


def _id_key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def test_one_shot_consumption_acks_and_returns(broker: sb.Broker, server: Server) -> None:
    for n in range(25):
        broker.publish("stream-a", n)
    recorder = Recorder()
    consumer = broker.consumer("read-group-a")
    assert consumer.consume(recorder, count=10, block=False) == 25
    assert recorder.bodies() == list(range(25))
    assert pending(server, "stream-a", "read-group-a") == 0
    # Nothing left: a second one-shot run returns at once without calling the handler.
    again = Recorder()
    assert consumer.consume(again, block=False) == 0
    assert again.calls == []
    # The other group of the stream is not affected.
    other = Recorder()
    assert broker.consumer("read-group-ab").consume(other, block=False) == 25


@pytest.fixture
def running() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a consumer thread did not stop"


def test_blocking_consumption_waits_for_events_until_stopped(
    broker: sb.Broker, running: list[threading.Thread]
) -> None:
    consumer = broker.consumer("read-group-c", block_timeout=0.2)
    recorder = Recorder()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(consumer.consume(recorder, count=2)))
    running.append(thread)
    thread.start()
    for n in range(5):
        broker.publish("stream-c", n)
    wait_for(lambda: len(recorder.events) == 5, what="5 events handled")
    assert thread.is_alive()  # still blocking, waiting for more
    broker.publish("stream-c", 5)
    wait_for(lambda: len(recorder.events) == 6, what="the 6th event handled")
    consumer.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert result == [6]
    assert recorder.bodies() == list(range(6))


def test_handler_error_propagates_and_leaves_unacked_events_pending(
    broker: sb.Broker, server: Server
) -> None:
    ids = [broker.publish("stream-a", n) for n in range(4)]
    error = ValueError("handler failed")

    def failing(events: list[sb.Event]) -> None:
        events[0].ack()
        events[1].ack()
        raise error

    consumer = broker.consumer("read-group-a", name="worker")
    with pytest.raises(ValueError, match="handler failed") as caught:
        consumer.consume(failing, count=4, block=False)
    assert caught.value is error
    assert pending(server, "stream-a", "read-group-a") == 2
    detail = server.client().xpending_range("stream-a", "read-group-a", "-", "+", 10)
    assert [d["message_id"].decode() for d in detail] == ids[2:]
    assert {d["consumer"] for d in detail} == {b"worker"}


def test_restarted_consumer_rereads_its_pending_events_first(
    broker: sb.Broker, server: Server
) -> None:
    old = [broker.publish("stream-b", f"old{n}") for n in range(3)]

    def crash(events: list[sb.Event]) -> None:
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        broker.consumer("read-group-ab", name="c1").consume(crash, count=10, block=False)
    new = [broker.publish("stream-b", f"new{n}") for n in range(2)]

    # Another consumer name does not get c1's pending events, only the new ones.
    other = Recorder()
    broker.consumer("read-group-ab", name="c2").consume(other, block=False)
    assert [e.id for e in other.events] == new
    assert pending(server, "stream-b", "read-group-ab") == 3

    more = broker.publish("stream-b", "newest")
    recorder = Recorder()
    with sb.Registry.from_yaml(_yaml_for(broker)).validate().broker() as restarted:
        restarted.consumer("read-group-ab", name="c1").consume(recorder, count=2, block=False)
    assert [e.id for e in recorder.events] == [*old, more]
    # Delivered a second time, they come in batches of half the count.
    assert [[e.id for e in call] for call in recorder.calls[:3]] == [[old[0]], [old[1]], [old[2]]]
    assert pending(server, "stream-b", "read-group-ab") == 0


def _yaml_for(broker: sb.Broker) -> str:
    lines = []
    for pool in broker.registry.pools.values():
        address = pool.url or f"{pool.host}:{pool.port}:{pool.db}"
        lines.append(f"{pool.name}:\n  redis: {address}\n  streams:")
        for stream in broker.registry.streams.values():
            if stream.pool == pool.name:
                lines.append(f"    {stream.name}: [{', '.join(stream.groups)}]")
    return "\n".join(lines) + "\n"


def test_pending_entry_deleted_meanwhile_is_acknowledged_and_skipped(
    broker: sb.Broker, server: Server
) -> None:
    ids = [broker.publish("stream-a", n) for n in range(3)]

    def crash(events: list[sb.Event]) -> None:
        raise RuntimeError("crash")

    consumer = broker.consumer("read-group-a")
    with pytest.raises(RuntimeError):
        consumer.consume(crash, block=False)
    server.client().xdel("stream-a", ids[1])
    recorder = Recorder()
    assert consumer.consume(recorder, block=False) == 2
    assert [e.id for e in recorder.events] == [ids[0], ids[2]]
    assert pending(server, "stream-a", "read-group-a") == 0


def _two_pool_config(address_one: str, address_two: str) -> sb.ValidatedRegistry:
    registry = sb.Registry()
    registry.register_redis(address_one, pool="one")
    registry.register_redis(address_two, pool="two")
    registry.register_stream("orders", "one", ["audit", "billing"])
    registry.register_stream("refunds", "two", ["audit"])
    return registry.validate()


def _check_group_across_pools(config: sb.ValidatedRegistry, open_broker: OpenBroker) -> None:
    with open_broker(config) as broker:
        published = []
        for n in range(6):
            published.append(broker.publish("orders", {"order": n}))
            published.append(broker.publish("refunds", {"refund": n}))
        recorder = Recorder()
        assert broker.consumer("audit").consume(recorder, count=4, block=False) == 12
        assert sorted(e.id for e in recorder.events) == sorted(published)
        assert [e.body for e in recorder.events if e.stream == "orders"] == [
            {"order": n} for n in range(6)
        ]
        assert [e.body for e in recorder.events if e.stream == "refunds"] == [
            {"refund": n} for n in range(6)
        ]
        assert all(len(call) <= 4 for call in recorder.calls)
        billing = Recorder()
        broker.consumer("billing").consume(billing, block=False)
        assert {e.stream for e in billing.events} == {"orders"}


def test_group_reading_streams_in_two_pools(server: Server, open_broker: OpenBroker) -> None:
    config = _two_pool_config(server.pool_address(1), server.pool_address(2))
    _check_group_across_pools(config, open_broker)


def test_group_reading_streams_on_two_servers(
    valkey: Server, redis_server: Server, open_broker: OpenBroker
) -> None:
    config = _two_pool_config(f"{valkey.address}:0", f"{redis_server.address}:0")
    _check_group_across_pools(config, open_broker)


def test_blocking_read_across_two_pools_delivers_from_either(
    server: Server, running: list[threading.Thread], open_broker: OpenBroker
) -> None:
    config = _two_pool_config(server.pool_address(1), server.pool_address(2))
    with open_broker(config) as broker:
        consumer = broker.consumer("audit", block_timeout=0.2)
        recorder = Recorder()
        thread = threading.Thread(target=consumer.consume, args=(recorder,))
        running.append(thread)
        thread.start()
        broker.publish("refunds", "r1")
        wait_for(lambda: recorder.bodies() == ["r1"], what="the refund")
        broker.publish("orders", "o1")
        wait_for(lambda: recorder.bodies() == ["r1", "o1"], what="the order")
        consumer.stop()
        thread.join(timeout=30)  # before the broker closes


@pytest.mark.parametrize("count", [0, -1, "5", 2.5, True, None])
def test_invalid_count_is_refused(broker: sb.Broker, count: object) -> None:
    consumer = broker.consumer("read-group-a")
    with pytest.raises(sb.InvalidArgumentError, match=re.escape(repr(count))):
        consumer.consume(lambda events: None, count=count, block=False)  # type: ignore[arg-type]


def test_unknown_stream_and_group_are_named(broker: sb.Broker) -> None:
    with pytest.raises(sb.UnknownStreamError, match="stream 'nope' is not registered"):
        broker.publish("nope", "x")
    with pytest.raises(sb.UnknownGroupError, match="consumer group 'ghosts'"):
        broker.consumer("ghosts")


@pytest.mark.parametrize("name", ["", "has space", "star*", "x" * 129, "tab\there"])
def test_invalid_consumer_name_is_refused(broker: sb.Broker, name: str) -> None:
    with pytest.raises(sb.InvalidArgumentError, match="consumer"):
        broker.consumer("read-group-a", name=name)


def test_unreachable_pool_is_a_clear_error(open_broker: OpenBroker) -> None:
    registry = sb.Registry()
    registry.register_redis(f"127.0.0.1:{free_port()}", pool="gone")
    registry.register_stream("s", "gone", ["g"])
    with open_broker(registry.validate(), connect_timeout=2) as broker:
        with pytest.raises(sb.PoolConnectionError, match="redis pool 'gone'") as caught:
            broker.publish("s", "x")
        assert isinstance(caught.value, sb.BrokerError)


@pytest.mark.one_server
def test_wrong_password_is_an_authentication_error_without_the_password(
    server: Server, open_broker: OpenBroker
) -> None:
    registry = sb.Registry()
    registry.register_redis(f"redis://nobody:s3cr3t-pw@{server.address}/0", pool="locked")
    registry.register_stream("s", "locked", ["g"])
    with (
        open_broker(registry.validate()) as broker,
        pytest.raises(sb.PoolAuthenticationError) as caught,
    ):
        broker.publish("s", "x")
    assert "s3cr3t-pw" not in str(caught.value)
    assert "locked" in str(caught.value)


def test_closing_the_broker_closes_its_connections(
    config: sb.ValidatedRegistry, server: Server, open_broker: OpenBroker
) -> None:
    def ours() -> int:
        clients = server.client().client_list()
        return sum(1 for c in clients if c.get("name") == "streambroker")

    with open_broker(config) as broker:
        broker.publish("stream-a", 1)
        broker.publish("stream-c", 2)
        assert ours() >= 2
    wait_for(lambda: ours() == 0, what="connections closed")


@pytest.mark.one_server
def test_reprs_show_what_helps(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, server: Server
) -> None:
    with open_broker(config, codec="json") as broker:
        face = "Broker" if isinstance(broker, sb.Broker) else "AsyncBroker"
        assert repr(broker) == (
            f"{face}(pools={{'default': '{server.address}/0', 'second': '{server.address}/3'}}, "
            "codec='json')"
        )
        broker.publish("stream-a", 1, meta={"kind": "order"})
        seen: list[str] = []
        broker.consumer("read-group-a").consume(
            lambda events: seen.extend(map(repr, events)), block=False
        )
    (text,) = seen
    assert re.fullmatch(
        r"Event\(stream='stream-a', id='\d+-\d+', meta=\{'kind': 'order'\}, delivery_count=1\)",
        text,
    )
    client = server.client()
    client.xadd("stream-a", {b"\xff": b"x"})
    with open_broker(config) as broker:
        broker.consumer("read-group-a").consume(
            lambda events: seen.extend(map(repr, events)), block=False
        )
    assert "meta='<not UTF-8>'" in seen[-1]
