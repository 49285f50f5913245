"""A server out of memory (``maxmemory`` reached, ``noeviction``), on the real servers.

Publishing is refused with :class:`sb.OutOfMemoryError`; consumers still start and
drain (reading, acknowledging and collecting need no new memory), which frees the
server, so publishing works again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
import redis

import streambroker as sb
from streambroker.core.effects import with_text
from streambroker.core.leases import LEASE_RETAKEN, acquire_command, renew_command
from streambroker.wire.keys import dead_letter_key, lease_key

from .conftest import OpenBroker, Server, wait_for

#: What the message of every OutOfMemoryError says after naming what was refused.
OOM_TEXT = (
    ": the server is out of memory (used memory reached maxmemory and nothing may be "
    "evicted), so it refuses new data until consumers acknowledge events (collection then "
    "removes them) or maxmemory is raised"
)
#: Room left above what the server uses when the test starts, then filled with events.
HEADROOM = 2 << 20
#: How far under what it uses the limit is lowered once the server is full.
SLACK = 256 << 10
BODY = "x" * (32 << 10)
#: The dead letters of read-group-a from stream-a.
DEAD_A = dead_letter_key(sb.StreamSpec("stream-a", "default", ()), "read-group-a")


class Memory:
    """Sets the server's ``maxmemory`` (policy ``noeviction``); restored after the test."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin

    def limit(self, maxmemory: int) -> None:
        self.admin.config_set("maxmemory-policy", "noeviction")
        self.admin.config_set("maxmemory", maxmemory)

    def exhaust(self) -> None:
        """Leave the server no memory at all: every command that needs some is refused."""
        self.limit(1)

    def used(self) -> int:
        return int(self.admin.info("memory")["used_memory"])


@pytest.fixture
def memory(server: Server) -> Iterator[Memory]:
    admin = server.client()
    before = admin.config_get("maxmemory*")
    try:
        yield Memory(admin)
    finally:
        admin.config_set("maxmemory", before["maxmemory"])
        admin.config_set("maxmemory-policy", before["maxmemory-policy"])
        admin.close()


class Collector:
    """A handler recording the ids it was given."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: list[str] = []

    def __call__(self, events: list[sb.Event]) -> None:
        with self.lock:
            self.ids.extend(event.id for event in events)


def fill(broker: sb.Broker, ids: list[str]) -> sb.OutOfMemoryError:
    """Publish to stream-a until the server refuses (adding the ids to ``ids``); the error."""
    for _ in range(10 * HEADROOM // len(BODY)):
        try:
            ids.append(broker.publish("stream-a", BODY))
        except sb.OutOfMemoryError as exc:
            return exc
    pytest.fail("the server never ran out of memory")


def test_publishing_fails_until_a_new_consumer_drains_the_full_server(
    config: sb.ValidatedRegistry,
    open_broker: OpenBroker,
    memory: Memory,
    server: Server,
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = open_broker(config)
    ids = [publisher.publish("stream-a", "before the limit")]
    memory.limit(memory.used() + HEADROOM)

    error = fill(publisher, ids)

    assert len(ids) > 1  # the server filled up with events first
    assert isinstance(error, sb.ServerReplyError)
    assert (error.pool, error.command) == ("default", "XADD stream-a")
    assert str(error) == "redis pool 'default': XADD stream-a" + OOM_TEXT
    assert server.client().xlen("stream-a") == len(ids)
    # Keep it full: the refused command's own buffer, freed now, must not make room.
    memory.limit(memory.used() - SLACK)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        server.client().set("more", "data")

    # Consumers that start now (a new broker: nothing created yet) read, acknowledge
    # and collect; once every group acknowledged the events, they are removed.
    consumers = open_broker(config)
    for group in ("read-group-a", "read-group-ab"):
        collector = Collector()
        handled = consumers.consumer(group, "started-when-full").consume(
            collector, count=20, block=False
        )
        assert (handled, collector.ids) == (len(ids), ids)
    assert server.client().xlen("stream-a") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing was lost
    assert memory.used() < int(memory.admin.config_get("maxmemory")["maxmemory"])

    # The memory is free again: publishing works, on the broker that was refused too.
    after = publisher.publish("stream-a", "after")
    assert server.client().xrange("stream-a")[0][0].decode() == after


def test_consumers_create_their_groups_when_the_server_has_no_memory(
    config: sb.ValidatedRegistry, open_broker: OpenBroker, memory: Memory, server: Server
) -> None:
    first = open_broker(config)
    first.publish("stream-a", "one")  # publishing creates no group
    first.consumer("read-group-a", "early").consume(Collector(), block=False)  # this one exists
    memory.exhaust()
    broker = open_broker(config)  # a new broker: it has created nothing yet

    with pytest.raises(sb.OutOfMemoryError) as caught:
        broker.publish("stream-a", "two")
    assert str(caught.value) == "redis pool 'default': XADD stream-a" + OOM_TEXT

    for group in ("read-group-a", "read-group-ab"):
        collector = Collector()
        broker.consumer(group, "started-when-full").consume(collector, block=False)
        assert len(collector.ids) == (group == "read-group-ab")
    groups = server.client().xinfo_groups("stream-a")
    assert sorted(g["name"].decode() for g in groups) == ["read-group-a", "read-group-ab"]
    assert server.client().xlen("stream-a") == 0  # both groups settled it


def test_a_script_refused_for_memory_is_an_out_of_memory_error(
    config: sb.ValidatedRegistry, open_broker: OpenBroker, memory: Memory, server: Server
) -> None:
    broker = open_broker(config)
    broker.publish("stream-a", "one")
    dead = DEAD_A
    server.client().xadd(dead, {"$body": "x"})
    memory.exhaust()

    with pytest.raises(sb.OutOfMemoryError) as caught:
        broker.replay_dead_letters("stream-a", "read-group-a")

    assert caught.value.command == f"script on {dead}"
    assert str(caught.value) == f"redis pool 'default': script on {dead}" + OOM_TEXT
    assert server.client().xlen(dead) == 1


def test_leases_are_taken_and_renewed_without_memory(memory: Memory, server: Server) -> None:
    admin = server.client()
    key = lease_key("", "g", "c")
    memory.exhaust()
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("another", "key")  # the server refuses new data

    assert admin.execute_command(*with_text(acquire_command("", "g", "c", "token", 30_000))) == 1
    assert admin.get(key) == b"token"
    admin.delete(key)  # the server lost it: renewing takes it back
    renew = renew_command("", "g", "c", "token", 30_000)
    assert admin.execute_command(*with_text(renew)) == LEASE_RETAKEN
    assert admin.get(key) == b"token"
    assert 0 < admin.pttl(key) <= 30_000
    assert admin.execute_command(*with_text(renew_command("", "g", "c", "other", 30_000))) == 0


def test_a_dead_letter_waits_in_the_consumer_until_the_server_has_memory(
    memory: Memory, server: Server, open_broker: OpenBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streambroker")
    config = sb.Registry.from_yaml(
        f"default:\n  redis: {server.address}:0\n  streams:\n    stream-a: [read-group-a]\n"
    ).validate()
    broker = open_broker(config)
    poison = broker.publish("stream-a", "poison")
    memory.exhaust()
    consumer = broker.consumer("read-group-a", "w", max_deliveries=1)

    def refuse(events: list[sb.Event]) -> None:
        for event in events:
            event.fail("no")

    thread = threading.Thread(target=consumer.consume, args=(refuse,), kwargs={"count": 1})
    thread.start()
    try:
        wait_for(
            lambda: any("dead letters wait" in r.getMessage() for r in caplog.records),
            timeout=30,
            what="the warning that the dead letter waits",
        )
        assert server.client().xlen(DEAD_A) == 0
        assert server.client().xpending("stream-a", "read-group-a")["pending"] == 1  # kept
        memory.limit(0)  # memory again: a next round trip writes it
        wait_for(
            lambda: broker.dead_letters("stream-a", "read-group-a"),
            timeout=30,
            what="the dead letter",
        )
    finally:
        consumer.stop()
        thread.join(timeout=30)
    (letter,) = broker.dead_letters("stream-a", "read-group-a")
    assert letter.event.id == poison
    assert letter.error == "RuntimeError: no"
    assert server.client().xpending("stream-a", "read-group-a")["pending"] == 0
