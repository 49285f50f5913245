"""Consumer groups are created only where an operation needs them: a consumer creates
its own group on its streams and replay streams, publishing and every read-only
operation create nothing, and what is published before a group exists still reaches
it, whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

import streambroker as sb
from streambroker.wire.keys import dead_letter_key, replay_key

from .conftest import SEED_YAML_TEMPLATE, Server
from .test_cli import invoke

pytestmark = pytest.mark.anywhere


def _spec(stream: str) -> sb.StreamSpec:
    """A stream of the seed's registry (no key prefix), for the names of its side keys."""
    return sb.StreamSpec(stream, "default", ())


def keys(server: Server) -> list[str]:
    """Every key of the seed's two pools (on one server: databases 0 and 3)."""
    found: set[str] = set()
    for db in (0, 3):
        client = server.client(db)
        found.update(key.decode() for key in client.scan_iter("*"))  # every node's
        client.close()
    return sorted(found)


def group_names(client: redis.Redis, key: str) -> list[str]:
    if not client.exists(key):
        return []
    return sorted(g["name"].decode() for g in client.xinfo_groups(key))


def handled(broker: sb.Broker, group: str) -> list[tuple[str, object]]:
    """What one one-shot consumer of ``group`` is handed: (stream, body) of each event."""
    seen: list[tuple[str, object]] = []
    broker.consumer(group).consume(
        lambda events: seen.extend((e.stream, e.body) for e in events), block=False
    )
    return seen


def test_publishing_creates_no_group(broker: sb.Broker, server: Server) -> None:
    broker.publish("stream-a", "one")
    with broker.batch() as batch:
        batch.publish("stream-b", "two")
        batch.publish("stream-c", "three")

    assert keys(server) == ["stream-a", "stream-b", "stream-c"]
    client = server.client()
    assert group_names(client, "stream-a") == group_names(client, "stream-b") == []


def test_events_published_before_any_consumer_all_reach_every_group(
    broker: sb.Broker, server: Server
) -> None:
    for n in range(5):
        broker.publish("stream-a", n)
    broker.publish("stream-b", "b")
    client = server.client()

    # read-group-a handles and acknowledges everything, and collects as it goes: what
    # read-group-ab has not read yet stays, whether or not its group exists yet.
    assert handled(broker, "read-group-a") == [("stream-a", n) for n in range(5)]
    assert broker.collect_garbage() == {"stream-a": 0, "stream-b": 0, "stream-c": 0}
    assert client.xlen("stream-a") == 5
    assert group_names(client, "stream-a") == ["read-group-a"]

    expected = [("stream-a", n) for n in range(5)] + [("stream-b", "b")]
    assert sorted(handled(broker, "read-group-ab"), key=str) == sorted(expected, key=str)
    assert client.xlen("stream-a") == client.xlen("stream-b") == 0  # now settled by both


def test_a_consumer_creates_only_its_own_group(broker: sb.Broker, server: Server) -> None:
    assert handled(broker, "read-group-a") == []

    client = server.client()
    assert group_names(client, "stream-a") == ["read-group-a"]
    assert group_names(client, replay_key(_spec("stream-a"), "read-group-a")) == ["read-group-a"]
    assert keys(server) == sorted([replay_key(_spec("stream-a"), "read-group-a"), "stream-a"])


def test_read_only_operations_create_nothing(
    broker: sb.Broker, server: Server, tmp_path: Path
) -> None:
    assert [s.length for s in broker.stats()] == [0, 0, 0]
    broker.stream_stats("stream-c")
    broker.group_stats("stream-a", "read-group-ab")
    assert broker.read("stream-a") == []
    assert broker.dead_letters("stream-a", "read-group-a") == []
    assert broker.collect_garbage() == {"stream-a": 0, "stream-b": 0, "stream-c": 0}
    config = tmp_path / "streambroker.yaml"
    config.write_text(
        SEED_YAML_TEMPLATE.format(default=server.pool_address(0), second=server.pool_address(3))
    )
    for command in (["stats"], ["dead-letters", "stream-a", "read-group-a"], ["gc"]):
        code, _, stderr = invoke(*command, "--config", str(config))
        assert code == 0, stderr

    assert keys(server) == []


def test_stats_show_a_group_not_created_yet(
    broker: sb.Broker, server: Server, tmp_path: Path
) -> None:
    ids = [broker.publish("stream-a", n) for n in range(3)]
    handled(broker, "read-group-a")

    stream = broker.stream_stats("stream-a")
    (done, waiting) = stream.groups
    assert (done.group, done.created, done.lag) == ("read-group-a", True, 0)
    assert done.last_delivered_id == ids[-1]
    assert waiting.group == "read-group-ab"
    assert (waiting.created, waiting.lag, waiting.pending) == (False, 3, 0)
    assert (waiting.last_delivered_id, waiting.lowest_pending_id, waiting.consumers) == (
        "0-0",
        None,
        (),
    )
    assert stream.orphan_groups == ()
    (empty,) = broker.stats("stream-c")
    assert (empty.length, empty.last_id, empty.oldest_event_age) == (0, "0-0", None)
    assert [(g.group, g.created, g.lag) for g in empty.groups] == [("read-group-c", False, 0)]

    config = tmp_path / "streambroker.yaml"
    config.write_text(
        SEED_YAML_TEMPLATE.format(default=server.pool_address(0), second=server.pool_address(3))
    )
    code, stdout, stderr = invoke("stats", "stream-a", "--config", str(config))
    assert code == 0, stderr
    assert "read-group-ab (not created yet)" in stdout
    assert "read-group-a (not created yet)" not in stdout


def test_replaying_dead_letters_creates_only_the_group_it_writes_to(
    broker: sb.Broker, server: Server
) -> None:
    dead = dead_letter_key(_spec("stream-a"), "read-group-a")
    replay = replay_key(_spec("stream-a"), "read-group-a")
    client = server.client()
    client.xadd(dead, {"$body": '"again"', "$codec": "json", "$dead:id": "1-0"})

    assert broker.replay_dead_letters("stream-a", "read-group-a") == 1

    assert keys(server) == sorted([dead, replay])
    assert group_names(client, replay) == ["read-group-a"]
    assert handled(broker, "read-group-a") == [("stream-a", "again")]
