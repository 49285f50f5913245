"""A server out of memory (``maxmemory`` reached, ``noeviction``), on the real servers.

Publishing is refused with :class:`sb.OutOfMemoryError`; consumers still start and
drain (reading, acknowledging and collecting need no new memory), which frees the
server, so publishing works again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

import streambroker as sb
from streambroker.keys import dead_letter_key, lease_key
from streambroker.leases import acquire_command, renew_command

from .conftest import OpenBroker, Server

#: What the message of every OutOfMemoryError says after naming what was refused.
OOM_TEXT = (
    ": the server is out of memory (used memory reached maxmemory and nothing may be "
    "evicted), so it refuses new data until consumers acknowledge events (collection then "
    "removes them) or maxmemory is raised"
)


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


def test_groups_that_exist_are_found_when_the_server_cannot_create_any(
    config: sb.ValidatedRegistry, open_broker: OpenBroker, memory: Memory, server: Server
) -> None:
    open_broker(config).publish("stream-a", "one")  # every group of the pool exists
    memory.exhaust()

    broker = open_broker(config)  # a new broker tries to create them, and finds them
    assert broker.collect_garbage("stream-a", "stream-b") == {"stream-a": 0, "stream-b": 0}
    with pytest.raises(sb.OutOfMemoryError) as caught:
        broker.publish("stream-b", "two")
    assert str(caught.value) == "redis pool 'default': XADD stream-b" + OOM_TEXT
    assert server.client().xlen("stream-b") == 0


def test_a_missing_group_is_an_out_of_memory_error(
    config: sb.ValidatedRegistry, open_broker: OpenBroker, memory: Memory, server: Server
) -> None:
    memory.exhaust()
    broker = open_broker(config)

    with pytest.raises(sb.OutOfMemoryError) as caught:
        broker.publish("stream-a", "one")

    refused = "cannot create consumer group 'read-group-a' of stream 'stream-a'"
    assert caught.value.command == refused
    assert str(caught.value) == f"redis pool 'default': {refused}" + OOM_TEXT
    assert server.client().exists("stream-a") == 0


def test_a_script_refused_for_memory_is_an_out_of_memory_error(
    config: sb.ValidatedRegistry, open_broker: OpenBroker, memory: Memory, server: Server
) -> None:
    broker = open_broker(config)
    broker.publish("stream-a", "one")
    dead = dead_letter_key("stream-a", "read-group-a")
    server.client().xadd(dead, {"$body": "x"})
    memory.exhaust()

    with pytest.raises(sb.OutOfMemoryError) as caught:
        broker.replay_dead_letters("stream-a", "read-group-a")

    assert caught.value.command == f"script on {dead}"
    assert str(caught.value) == f"redis pool 'default': script on {dead}" + OOM_TEXT
    assert server.client().xlen(dead) == 1


def test_leases_are_taken_and_renewed_without_memory(memory: Memory, server: Server) -> None:
    admin = server.client()
    key = lease_key("g", "c")
    memory.exhaust()
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("another", "key")  # the server refuses new data

    assert admin.execute_command(*acquire_command("g", "c", "token", 30_000)) == 1
    assert admin.get(key) == b"token"
    admin.delete(key)  # the server lost it: renewing takes it back
    assert admin.execute_command(*renew_command("g", "c", "token", 30_000)) == 1
    assert admin.get(key) == b"token"
    assert 0 < admin.pttl(key) <= 30_000
    assert admin.execute_command(*renew_command("g", "c", "other", 30_000)) == 0
