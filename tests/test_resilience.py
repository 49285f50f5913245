"""Consumers under failure: crashes, pauses, duplicates, poison events, restarts, scaling."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import streambroker as sb

from .conftest import OpenBroker, Server, _require_binary, wait_for

WORKER = str(Path(__file__).with_name("worker.py"))
FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.2, "retry_delay": 0.01}

Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn(server: Server) -> Iterator[Spawn]:
    """Start consumer processes (tests/worker.py); every one is killed at the end."""
    processes: list[subprocess.Popen[str]] = []

    def start(
        group: str, name: str, mode: str = "record", **settings: Any
    ) -> subprocess.Popen[str]:
        settings = {
            "address": server.address,
            "group": group,
            "name": name,
            "mode": mode,
            "options": FAST,
            **settings,
        }
        process = subprocess.Popen(
            [sys.executable, WORKER, json.dumps(settings)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")},
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def ids_of(client: redis.Redis, key: str) -> list[str]:
    return [raw.decode() for raw in client.lrange(key, 0, -1)]


class Collector:
    """A thread-safe handler recording the ids it handled."""

    def __init__(self, fail: Callable[[sb.Event], bool] = lambda e: False) -> None:
        self.ids: list[str] = []
        self.deliveries: dict[str, list[int]] = {}
        self._fail = fail
        self._lock = threading.Lock()

    def __call__(self, events: list[sb.Event]) -> None:
        with self._lock:
            for event in events:
                self.deliveries.setdefault(event.id, []).append(event.delivery_count)
                if self._fail(event):
                    event.fail(ValueError(f"cannot handle {event.body!r}"))
                else:
                    self.ids.append(event.id)


class Running:
    """Consumers run in threads of this process; all are stopped at the end."""

    def __init__(self) -> None:
        self.threads: list[tuple[sb.Consumer, threading.Thread]] = []
        self.errors: list[BaseException] = []

    def start(self, consumer: sb.Consumer, handler: sb.Handler, count: int = 10) -> None:
        def run() -> None:
            try:
                consumer.consume(handler, count=count)
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append((consumer, thread))
        thread.start()

    def stop(self, consumer: sb.Consumer) -> None:
        consumer.stop()
        for known, thread in self.threads:
            if known is consumer:
                thread.join(timeout=30)
                assert not thread.is_alive()


@pytest.fixture
def running() -> Iterator[Running]:
    pool = Running()
    yield pool
    for consumer, _ in pool.threads:
        consumer.stop()
    for _, thread in pool.threads:
        thread.join(timeout=30)
    assert not pool.errors, pool.errors


def test_events_of_a_killed_consumer_are_handled_by_another(
    broker: sb.Broker, server: Server, spawn: Spawn, running: Running
) -> None:
    published = [broker.publish("stream-a", n) for n in range(30)]
    client = server.client()
    crashed = spawn("read-group-a", "doomed", mode="hang", count=7)
    wait_for(lambda: len(ids_of(client, "started:doomed")) == 7, what="the batch to start")
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=10)
    in_flight = ids_of(client, "started:doomed")

    survivor = Collector()
    running.start(broker.consumer("read-group-a", "survivor", **FAST), survivor)
    wait_for(lambda: set(published) <= set(survivor.ids), timeout=20, what="all events handled")
    assert set(in_flight) <= set(survivor.ids)
    assert all(survivor.deliveries[i][-1] >= 2 for i in in_flight)  # reclaim counted
    wait_for(lambda: client.xpending("stream-a", "read-group-a")["pending"] == 0)


def test_one_process_per_consumer_name(broker: sb.Broker, server: Server, spawn: Spawn) -> None:
    broker.publish("stream-a", "x")
    client = server.client()
    first = spawn("read-group-a", "only-one")
    wait_for(lambda: ids_of(client, "handled:only-one"), what="the first process to run")
    second = spawn("read-group-a", "only-one", block=False)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 3
    assert "busy:consumer 'only-one' of group 'read-group-a' is already running" in out

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    # The name is free once the lease (1 s here) expires, without any clean-up.
    wait_for(lambda: not client.exists("{sb:lease:12:read-group-a}:only-one"), what="lease expiry")
    third = spawn("read-group-a", "only-one", block=False)
    out, _ = third.communicate(timeout=30)
    assert third.returncode == 0, out
    assert out.startswith("exit:")


def test_same_name_in_one_process_is_busy_too(broker: sb.Broker, running: Running) -> None:
    first = broker.consumer("read-group-a", "twin", **FAST)
    collector = Collector()
    running.start(first, collector)
    broker.publish("stream-a", 1)
    wait_for(lambda: collector.ids, what="the first consumer to run")
    with pytest.raises(sb.ConsumerBusyError) as caught:
        broker.consumer("read-group-a", "twin").consume(collector, block=False)
    assert caught.value.group == "read-group-a"
    assert caught.value.consumer == "twin"
    running.stop(first)
    assert broker.consumer("read-group-a", "twin").consume(collector, block=False) == 0


def test_poison_event_becomes_a_dead_letter_while_the_rest_flows(
    broker: sb.Broker, server: Server, running: Running
) -> None:
    poison = broker.publish("stream-a", "poison")
    good = [broker.publish("stream-a", n) for n in range(20)]
    collector = Collector(fail=lambda event: event.body == "poison")
    consumer = broker.consumer("read-group-a", "w", max_deliveries=3, **FAST)
    running.start(consumer, collector, count=4)
    wait_for(lambda: broker.dead_letters("stream-a", "read-group-a"), what="the dead letter")
    wait_for(lambda: set(good) <= set(collector.ids), what="the good events")
    assert collector.deliveries[poison] == [1, 2, 3]
    assert all(collector.deliveries[i] == [1] for i in good)
    (letter,) = broker.dead_letters("stream-a", "read-group-a")
    assert letter.event.id == poison
    assert letter.event.body == "poison"
    assert letter.deliveries == 3
    assert letter.error == "ValueError: cannot handle 'poison'"
    assert server.client().xpending("stream-a", "read-group-a")["pending"] == 0

    # The other group of the stream handles it once, like any event.
    other = Collector()
    broker.consumer("read-group-ab").consume(other, block=False)
    assert other.ids.count(poison) == 1

    # Replay delivers it again to read-group-a only.
    collector._fail = lambda event: False
    assert broker.replay_dead_letters("stream-a", "read-group-a") == 1
    assert broker.dead_letters("stream-a", "read-group-a") == []
    wait_for(lambda: len(collector.ids) == len(good) + 1, what="the replayed event")
    replayed = collector.ids[-1]
    assert replayed != poison  # a new entry, in the group's replay stream
    again = Collector()
    broker.consumer("read-group-ab").consume(again, block=False)
    assert again.ids == []


def test_a_handler_that_keeps_raising_ends_in_the_dead_letters(broker: sb.Broker) -> None:
    poison = broker.publish("stream-b", "boom")

    def explode(events: list[sb.Event]) -> None:
        raise RuntimeError("always")

    consumer = broker.consumer("read-group-ab", "w", max_deliveries=2, **FAST)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            consumer.consume(explode, block=False)
    assert consumer.consume(explode, block=False) == 0  # set aside on its last delivery
    (letter,) = broker.dead_letters("stream-b", "read-group-ab")
    assert letter.event.id == poison
    assert letter.deliveries == 2
    assert letter.error.startswith("RuntimeError: always\n  at ")
    assert "in explode" in letter.error


def test_fail_one_event_and_ack_the_rest(broker: sb.Broker, server: Server) -> None:
    ids = [broker.publish("stream-a", n) for n in range(5)]
    consumer = broker.consumer("read-group-a", "w", max_deliveries=1, **FAST)
    collector = Collector(fail=lambda event: event.body == 2)
    assert consumer.consume(collector, block=False) == 5
    assert collector.ids == ids[:2] + ids[3:]
    assert [letter.event.id for letter in broker.dead_letters("stream-a", "read-group-a")] == [
        ids[2]
    ]
    assert server.client().xpending("stream-a", "read-group-a")["pending"] == 0


def test_claim_moves_every_pending_event(broker: sb.Broker, server: Server) -> None:
    ids = [broker.publish("stream-a", n) for n in range(12)] + [
        broker.publish("stream-b", n) for n in range(3)
    ]

    def crash(events: list[sb.Event]) -> None:
        raise RuntimeError("crash")

    leaving = broker.consumer("read-group-ab", "leaving", **FAST)
    with pytest.raises(RuntimeError):
        leaving.consume(crash, count=100, block=False)
    assert leaving.claim("leaving", "staying") == 15
    client = server.client()
    owners = {
        row["consumer"]
        for stream in ("stream-a", "stream-b")
        for row in client.xpending_range(stream, "read-group-ab", "-", "+", 100)
    }
    assert owners == {b"staying"}
    collector = Collector()
    broker.consumer("read-group-ab", "staying", **FAST).consume(collector, block=False)
    assert sorted(collector.ids) == sorted(ids)


def test_claim_refuses_a_running_consumer(broker: sb.Broker, running: Running) -> None:
    busy = broker.consumer("read-group-a", "busy", **FAST)
    collector = Collector()
    running.start(busy, collector)
    broker.publish("stream-a", 1)
    wait_for(lambda: collector.ids, what="the consumer to run")
    with pytest.raises(sb.ConsumerBusyError, match="'busy'"):
        busy.claim("busy", "other")


def test_scaling_one_three_one_under_a_steady_publisher_loses_nothing(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, server: Server, running: Running
) -> None:
    published: list[str] = []
    done = threading.Event()

    def publish() -> None:
        with open_broker(config) as producer:
            n = 0
            while not done.is_set():
                published.append(producer.publish("stream-b", n))
                n += 1
                time.sleep(0.002)

    collector = Collector()
    brokers = [open_broker(config) for _ in range(3)]
    try:
        consumers = [b.consumer("read-group-ab", f"c{i}", **FAST) for i, b in enumerate(brokers)]
        producer = threading.Thread(target=publish)
        producer.start()
        running.start(consumers[0], collector, count=5)
        wait_for(lambda: len(collector.ids) > 30, what="one consumer")
        running.start(consumers[1], collector, count=5)
        running.start(consumers[2], collector, count=5)
        wait_for(lambda: len(collector.ids) > 150, what="three consumers")
        running.stop(consumers[1])
        running.stop(consumers[2])
        brokers[0].remove_consumer("read-group-ab", "c1")
        brokers[0].remove_consumer("read-group-ab", "c2")
        mark = len(collector.ids)
        wait_for(lambda: len(collector.ids) > mark + 30, what="one consumer again")
        done.set()
        producer.join(timeout=30)
        wait_for(lambda: set(published) <= set(collector.ids), timeout=30, what="everything")
        names = {c["name"] for c in server.client().xinfo_consumers("stream-b", "read-group-ab")}
        assert names == {b"c0"}
    finally:
        done.set()
        for consumer, _ in running.threads:
            consumer.stop()
        for _, thread in running.threads:
            thread.join(timeout=30)
        for b in brokers:
            b.close()


def test_remove_consumer_refuses_to_drop_pending_events(broker: sb.Broker) -> None:
    broker.publish("stream-a", 1)

    def crash(events: list[sb.Event]) -> None:
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        broker.consumer("read-group-a", "gone", **FAST).consume(crash, block=False)
    with pytest.raises(sb.BrokerError, match="still holds pending events"):
        broker.remove_consumer("read-group-a", "gone")
    assert broker.remove_consumer("read-group-a", "gone", to="heir") == 1


def test_a_stopped_consumer_leaves_its_group_but_not_its_pending_events(
    broker: sb.Broker, running: Running
) -> None:
    def names(stream: str) -> list[str]:
        return sorted(c.name for c in broker.group_stats(stream, "read-group-ab").consumers)

    def crash_on_a(events: list[sb.Event]) -> None:
        for event in events:
            if event.stream == "stream-b":
                event.ack()
        raise RuntimeError("crash")

    broker.publish("stream-a", 1)
    broker.publish("stream-b", 2)
    holder = broker.consumer("read-group-ab", "holder", **FAST)
    with pytest.raises(RuntimeError):
        holder.consume(crash_on_a, block=False)
    # Slow to reclaim, so that the holder keeps its event through the test.
    live = broker.consumer("read-group-ab", "live", **{**FAST, "retry_after": 60})
    running.start(live, lambda events: None)
    wait_for(lambda: "live" in names("stream-b"), what="the live consumer's first read")
    with pytest.raises(sb.ConsumerBusyError, match="'live' of group 'read-group-ab' is running"):
        broker.consumer("read-group-ab", "live").leave()

    # It holds stream-a's event, so it stays there; from stream-b it is gone.
    assert holder.leave() == ["stream-a"]
    assert names("stream-a") == ["holder", "live"]
    assert names("stream-b") == ["live"]
    assert broker.group_stats("stream-a", "read-group-ab").pending == 1
    running.stop(live)
    assert live.leave() == []
    assert (names("stream-a"), names("stream-b")) == (["holder"], [])


def test_a_slow_handler_keeps_its_events(
    broker: sb.Broker, server: Server, running: Running
) -> None:
    event_id = broker.publish("stream-a", "slow")
    release = threading.Event()
    seen: list[int] = []

    def slow(events: list[sb.Event]) -> None:
        seen.extend(e.delivery_count for e in events)
        release.wait(30)

    # Heartbeats every 0.33 s keep events that retry_after (1.5 s) would give away.
    patient = {**FAST, "retry_after": 1.5}
    slow_consumer = broker.consumer("read-group-a", "slow", **patient)
    running.start(slow_consumer, slow)
    wait_for(lambda: seen, what="the slow handler to start")
    other = Collector()
    running.start(broker.consumer("read-group-a", "other", **patient), other)
    # Several retry_after periods pass while the handler runs: the other consumer's
    # reclaims (every 0.75 s) find nothing idle.
    deadline = time.monotonic() + 4.5
    wait_for(lambda: time.monotonic() > deadline, timeout=10, what="several retry periods")
    assert other.ids == []
    rows = server.client().xpending_range("stream-a", "read-group-a", "-", "+", 10)
    assert [(r["message_id"].decode(), r["consumer"], r["times_delivered"]) for r in rows] == [
        (event_id, b"slow", 1)
    ]
    release.set()
    wait_for(lambda: server.client().xpending("stream-a", "read-group-a")["pending"] == 0)
    assert seen == [1]


def test_a_paused_consumer_does_not_ack_what_was_taken_over(
    broker: sb.Broker, server: Server, spawn: Spawn, running: Running
) -> None:
    ids = [broker.publish("stream-a", n) for n in range(3)]
    client = server.client()
    paused = spawn("read-group-a", "paused", mode="hang")
    wait_for(lambda: len(ids_of(client, "started:paused")) == 3, what="the batch to start")
    paused.send_signal(signal.SIGSTOP)

    release = threading.Event()
    taken: list[str] = []

    def hold(events: list[sb.Event]) -> None:
        taken.extend(e.id for e in events)
        release.wait(30)

    running.start(broker.consumer("read-group-a", "rescuer", **FAST), hold)
    wait_for(lambda: sorted(taken) == sorted(ids), timeout=20, what="the takeover")
    client.set("release:paused", 1)
    paused.send_signal(signal.SIGCONT)
    wait_for(lambda: len(ids_of(client, "handled:paused")) == 3, what="the paused handler")
    # Stopping it sends every acknowledgement it has left: it noticed that the events
    # were taken over and did not acknowledge them; they are still pending, in the
    # rescuer's hands.
    paused.send_signal(signal.SIGTERM)
    _, err = paused.communicate(timeout=30)
    assert "were taken over by another consumer before they were acknowledged" in err
    rows = client.xpending_range("stream-a", "read-group-a", "-", "+", 10)
    assert sorted(r["message_id"].decode() for r in rows) == sorted(ids)
    assert {r["consumer"] for r in rows} == {b"rescuer"}
    release.set()
    wait_for(lambda: client.xpending("stream-a", "read-group-a")["pending"] == 0)


def test_sigterm_during_a_batch_finishes_and_acks_it(
    broker: sb.Broker, server: Server, spawn: Spawn
) -> None:
    ids = [broker.publish("stream-a", n) for n in range(4)]
    client = server.client()
    worker = spawn("read-group-a", "graceful", mode="hang")
    wait_for(lambda: len(ids_of(client, "started:graceful")) == 4, what="the batch to start")
    worker.send_signal(signal.SIGTERM)
    client.set("release:graceful", 1)
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert out.strip() == "exit:4"
    assert ids_of(client, "handled:graceful") == ids
    assert client.xpending("stream-a", "read-group-a")["pending"] == 0
    assert not client.exists("{sb:lease:12:read-group-a}:graceful")  # the name is released


def test_stop_interrupts_a_blocking_read(broker: sb.Broker, server: Server) -> None:
    consumer = broker.consumer("read-group-c", "waiting", block_timeout=1.0)
    thread = threading.Thread(target=consumer.consume, args=(lambda events: None,))
    thread.start()
    lease = "{sb:lease:12:read-group-c}:waiting"
    wait_for(lambda: server.client(3).exists(lease), what="the consumer to start")
    consumer.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert not server.client(3).exists(lease)


def test_block_timeout_must_stay_below_the_socket_timeout(
    open_broker: OpenBroker,
    config: sb.ValidatedRegistry,
) -> None:
    with (
        open_broker(config, socket_timeout=2.0) as broker,
        pytest.raises(sb.InvalidArgumentError, match="block_timeout"),
    ):
        broker.consumer("read-group-a", block_timeout=2.0)


@pytest.mark.parametrize("value", [-1, "60", True, None])
def test_forget_after_must_be_seconds_or_zero(broker: sb.Broker, value: object) -> None:
    with pytest.raises(
        sb.InvalidArgumentError,
        match=r"consumer c of group read-group-a: forget_after must be a number of seconds >= 0 "
        rf"\(0: never\), got {re.escape(repr(value))}",
    ):
        broker.consumer("read-group-a", "c", forget_after=value)  # type: ignore[arg-type]


def test_consumers_idle_with_nothing_pending_are_forgotten(
    broker: sb.Broker, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streambroker")

    def consumers() -> dict[str, tuple[int, float]]:
        stats = broker.group_stats("stream-a", "read-group-a")
        return {c.name: (c.pending, c.idle) for c in stats.consumers}

    def crash(events: list[sb.Event]) -> None:
        raise RuntimeError("crash")

    broker.publish("stream-a", 1)
    broker.consumer("read-group-a", "done").consume(lambda events: None, block=False)
    broker.publish("stream-a", 2)
    with pytest.raises(RuntimeError):
        broker.consumer("read-group-a", "crashed").consume(crash, block=False)
    wait_for(lambda: consumers()["done"][1] >= 0.05, what="the consumer to be idle")

    # A one-shot consume reclaims (nothing: retry_after is 30 s) after its first read.
    broker.consumer("read-group-a", "keeper", forget_after=0).consume(lambda e: None, block=False)
    assert sorted(consumers()) == ["crashed", "done", "keeper"]  # 0: never
    broker.consumer("read-group-a", "keeper", forget_after=0.05).consume(
        lambda e: None, block=False
    )
    # "crashed" holds its event, so it stays (until a reclaim took the event over).
    assert {name: pending for name, (pending, _) in consumers().items()} == {
        "crashed": 1,
        "keeper": 0,
    }
    assert any(
        "forgot consumers idle for 0.05 s or more with nothing pending, from stream stream-a: done"
        in record.getMessage()
        for record in caplog.records
    )


def test_dropped_connections_are_survived(
    broker: sb.Broker, server: Server, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streambroker")
    collector = Collector()
    running.start(broker.consumer("read-group-a", "tough", **FAST), collector)
    first = broker.publish("stream-a", 1)
    wait_for(lambda: collector.ids == [first], what="the first event")
    admin = server.client()
    for _ in range(3):
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    later = [broker.publish("stream-a", n) for n in range(2, 6)]
    wait_for(lambda: set(later) <= set(collector.ids), timeout=20, what="events after the drop")


def test_lost_groups_are_recreated_and_consumption_goes_on(
    broker: sb.Broker, server: Server, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streambroker")
    collector = Collector()
    running.start(broker.consumer("read-group-a", "survivor", **FAST), collector)
    first = broker.publish("stream-a", 1)
    wait_for(lambda: collector.ids == [first], what="the first event")
    server.client().flushall()  # the server lost everything
    later = broker.publish("stream-a", 2)  # recreates the stream without groups
    wait_for(lambda: later in collector.ids, timeout=20, what="consumption after the loss")
    assert any("recreating" in record.getMessage() for record in caplog.records)


def test_pending_event_deleted_under_a_crashed_consumer_is_settled(
    broker: sb.Broker, server: Server
) -> None:
    ids = [broker.publish("stream-a", n) for n in range(3)]

    def crash(events: list[sb.Event]) -> None:
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        broker.consumer("read-group-a", "crashed", **FAST).consume(crash, block=False)
    client = server.client()
    client.xdel("stream-a", ids[0])
    wait_for(
        lambda: all(
            row["time_since_delivered"] >= 500
            for row in client.xpending_range("stream-a", "read-group-a", "-", "+", 10)
        ),
        what="the pending events to be idle for retry_after",
    )
    collector = Collector()
    broker.consumer("read-group-a", "heir", **FAST).consume(collector, block=False)
    assert collector.ids == ids[1:]
    assert client.xpending("stream-a", "read-group-a")["pending"] == 0


def test_auth_errors_are_not_retried(open_broker: OpenBroker, server: Server) -> None:
    registry = sb.Registry()
    registry.register_redis(f"redis://nobody:wrong@{server.address}/0")
    registry.register_stream("s", "default", ["g"])
    with open_broker(registry.validate()) as broker, pytest.raises(sb.PoolAuthenticationError):
        broker.consumer("g").consume(lambda events: None, block=True)


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[Server]:
    """A Valkey server with append-only persistence, for restart tests."""
    server = Server(
        "valkey",
        _require_binary("valkey"),
        tmp_path / "durable",
        extra_args=("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
    )
    server.start()
    yield server
    server.stop()


def test_server_restart_while_a_consumer_blocks(
    open_broker: OpenBroker, durable: Server, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streambroker")
    registry = sb.Registry()
    registry.register_redis(durable.address)
    registry.register_stream("stream-a", "default", ["read-group-a"])
    with open_broker(registry.validate()) as broker:
        before = [broker.publish("stream-a", n) for n in range(5)]
        collector = Collector()
        running.start(broker.consumer("read-group-a", "steady", **FAST), collector)
        wait_for(lambda: collector.ids == before, what="the first events")
        durable.stop()
        durable.start()
        after = [broker.publish("stream-a", n) for n in range(5, 10)]
        wait_for(lambda: set(after) <= set(collector.ids), timeout=30, what="after the restart")
        assert collector.ids[:5] == before
    assert any("trying again" in record.getMessage() for record in caplog.records)
