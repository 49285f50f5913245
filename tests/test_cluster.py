"""Pools on Redis Cluster: the address form, and a pool's work over a cluster's nodes
(streams on each of three masters), on both server kinds and both faces: publish and
batches, one group reading streams of every node, retries, dead letters and replay,
garbage collection, stats, ``read`` and the CLI; the worker as a process; a slot migrated
under a running publisher and consumer; the replies of a round trip split over the nodes,
in order."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import streambroker as sb
from streambroker.apps.cli import app
from streambroker.core import effects as fx
from streambroker.core.routing import key_slot
from streambroker.io.aio import AsyncDriver
from streambroker.io.connection import ConnectionOptions
from streambroker.io.sync import SyncDriver

from .conftest import OpenBroker, free_port, wait_for
from .faces import Loop, async_facade
from .failover import FailoverRun
from .servers import ClusterSet, ServerProcess
from .test_cli import CLI, output, started, stop_cleanly
from .test_sentinel import failing_poison, problems, registry

FAST = {"retry_after": 1.0, "lease": 2.0, "block_timeout": 0.2, "retry_delay": 0.05}


def spread(cluster: ClusterSet, prefix: str = "s") -> list[str]:
    """Three stream names, one on each master (in the masters' order)."""
    names: dict[int, str] = {}
    n = 0
    while len(names) < len(cluster.masters):
        name = f"{prefix}{n}"
        names.setdefault(cluster.node_of(name).port, name)
        n += 1
    return [names[master.port] for master in cluster.masters]


def until(consumer: sb.Consumer, handler: Any, done: Any, what: str, count: int = 10) -> None:
    """Let ``consumer`` handle what is there, again and again, until ``done()``."""

    def step() -> bool:
        consumer.consume(handler, count=count, block=False)
        return bool(done())

    wait_for(step, 30, what)


def cluster_registry(cluster: ClusterSet, streams: Sequence[str]) -> sb.ValidatedRegistry:
    r = sb.Registry()
    r.register_redis(cluster.url())
    for name in streams:
        r.register_stream(name, "default", ["billing", "audit"])
    return r.validate()


# -- the address form, without a server ------------------------------------------------


def test_cluster_address_is_parsed() -> None:
    url = "redis+cluster://app:s3cret@10.0.0.1:7000,node-b:7001,[::1]:7002"
    spec = registry(url).pools["default"]

    assert (spec.kind, spec.cluster, spec.db, spec.tls) == ("cluster", True, 0, False)
    assert spec.seeds == (("10.0.0.1", 7000), ("node-b", 7001), ("::1", 7002))
    assert spec.display_address == "redis+cluster://app:***@10.0.0.1:7000,node-b:7001,[::1]:7002"
    assert "s3cret" not in repr(spec)
    tls = registry("rediss+cluster://h:7000/0?ssl_ca_certs=/ca.pem&db=0").pools["default"]
    assert (tls.tls, tls.db, tls.seeds, tls.tls_warning) == (True, 0, (("h", 7000),), None)
    unverified = registry("rediss+cluster://h:7000?ssl_cert_reqs=none").pools["default"]
    assert unverified.tls_warning is not None


def test_cluster_credentials_are_masked() -> None:
    spec = registry("rediss+cluster://app:p4ss@h:7000?password=p5ss&ssl_password=k3y")
    shown = spec.pools["default"].display_address
    assert [secret for secret in ("p4ss", "p5ss", "k3y") if secret in shown] == []
    (problem,) = problems("redis+cluster://h:7000?password=a&b=c")
    assert "b=c" not in problem
    assert "main" in problem


@pytest.mark.parametrize(
    ("address", "db", "expected"),
    [
        ("redis+cluster://h:7000/2", None, "selects db 2 in its path: a Redis Cluster has"),
        ("redis+cluster://h:7000?db=1", None, "selects db 1 in its query"),
        ("redis+cluster://h:7000", 3, "db=3 was given: a Redis Cluster has database 0 only"),
        ("redis+cluster://h:7000/x", None, "db 'x' is not a number"),
        ("redis+cluster://", None, "cannot parse cluster node ''"),
        ("redis+cluster://h", None, "cannot parse cluster node 'h': expected host:port"),
        ("redis+cluster://h:7000,,g:7000", None, "cannot parse cluster node ''"),
        ("redis+cluster://h:99999", None, "cluster node port 99999 is out of range"),
        ("redis+cluster://h:7000?ssl_cert_reqs=none", None, "applies only to rediss://"),
        ("redis+cluster://h:7000?sentinel_password=x", None, "is not accepted"),
        ("redis+cluster://h:7000?protocol=3", None, "parameter 'protocol' is not accepted"),
    ],
)
def test_bad_cluster_addresses_are_config_errors(
    address: str, db: int | None, expected: str
) -> None:
    (problem,) = problems(address, db)
    assert problem.startswith("redis pool main: ")
    assert expected in problem


def test_cluster_address_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "streambroker.yaml"
    path.write_text(
        "main:\n"
        "    redis: redis+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2:7000\n"
        "    streams: {orders: [billing]}\n"
        "other:\n"
        "    redis: redis+cluster://10.0.0.1:7000\n"
        "    db: 2\n"
        "    streams: {audit: [billing]}\n"
    )
    with pytest.raises(sb.ConfigError) as caught:
        sb.Registry.from_yaml(path).validate()
    (problem,) = caught.value.problems
    assert "redis pool other" in problem
    assert "database 0 only" in problem
    path.write_text(path.read_text().replace("    db: 2\n", "    db: 0\n"))
    spec = sb.Registry.from_yaml(path).validate().pools["main"]
    assert (spec.kind, len(spec.seeds)) == ("cluster", 2)
    assert "s3cret" not in spec.display_address


# -- a pool's work over the cluster's nodes ---------------------------------------------


def test_cluster_pool_publishes_consumes_and_reports(
    cluster: ClusterSet, open_broker: OpenBroker, tmp_path: Path
) -> None:
    streams = spread(cluster)
    broker = open_broker(cluster_registry(cluster, streams))
    first = broker.publish(streams[0], {"n": 0})
    with broker.batch() as batch:
        for n in range(1, 10):
            poison = "yes" if n == 4 else "no"
            batch.publish(streams[n % 3], {"n": n}, {"poison": poison})
    assert len(batch.ids) == 9
    for name in streams:  # each stream lives on its own master
        assert cluster.node_of(name).client().xlen(name) == (4 if name == streams[0] else 3)

    handled: list[tuple[int, int]] = []
    handle = failing_poison(handled)

    consumer = broker.consumer("billing", **{**FAST, "max_deliveries": 2})
    consumer.consume(handle, block=False)
    poisoned = streams[1]

    def dead() -> list[sb.DeadLetter]:
        consumer.consume(handle, block=False)
        return broker.dead_letters(poisoned, "billing")

    wait_for(dead, 20, "the poison event to be a dead letter")
    (letter,) = broker.dead_letters(poisoned, "billing")
    assert letter.event.body == {"n": 4}
    assert sorted(handled) == [(n, 1) for n in range(10) if n != 4]
    assert first in [event.id for event in broker.read(streams[0])]

    # The dead letter is put back: read again by billing only.
    assert broker.replay_dead_letters(poisoned, "billing") == 1
    replayed: list[sb.Event] = []
    until(consumer, replayed.extend, lambda: replayed, "the replayed event to be read")
    assert [event.body for event in replayed] == [{"n": 4}]

    # audit reads the three streams; then garbage collection empties each node.
    audited: list[int] = []
    audit = broker.consumer("audit", **FAST)
    until(
        audit,
        lambda es: audited.extend(e.body["n"] for e in es),
        lambda: len(audited) >= 10,
        "audit to read every event",
        count=3,
    )
    assert sorted(audited) == list(range(10))
    broker.collect_garbage(*streams)
    for name in streams:
        assert cluster.node_of(name).client().xlen(name) == 0
        stats = broker.stream_stats(name)
        assert (stats.length, stats.entries_added) == (0, 4 if name == streams[0] else 3)
    billing = broker.group_stats(poisoned, "billing")
    assert (billing.lag, billing.pending, billing.dead_letters) == (0, 0, 0)

    config = tmp_path / "streambroker.yaml"
    config.write_text(
        f"default:\n    redis: {cluster.url()}\n    streams:\n"
        + "".join(f"        {name}: [billing, audit]\n" for name in streams)
    )
    runner = CliRunner()
    result = runner.invoke(app, ["stats", "--json", "-c", str(config)], env={"COLUMNS": "80"})
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    data = json.loads(result.stdout)
    assert sorted((row["stream"], row["length"]) for row in data) == sorted(
        (name, 0) for name in streams
    )
    broker.publish(streams[2], {"n": 10}, {"poison": "yes"})
    result = runner.invoke(app, ["dead-letters", streams[2], "billing", "-c", str(config)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["tail", streams[2], "-g", "billing", "--count", "1", "--json", "-c", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["body"] == {"n": 10}


def test_scripts_are_loaded_on_every_master(cluster: ClusterSet, open_broker: OpenBroker) -> None:
    broker = open_broker(cluster_registry(cluster, spread(cluster)))
    loaded = broker.load_scripts()
    assert set(loaded) == {"default"}
    shas = [script.sha for script in fx.scripts()]
    for master in cluster.masters:
        assert all(master.client().script_exists(*shas))


@contextmanager
def _reading(consumer: sb.Consumer, join: float) -> Iterator[list[str]]:
    """The streams of the events ``consumer`` reads, blocking in a thread meanwhile (its
    groups made first); it is stopped at the end, and must be gone within ``join`` s."""
    consumer.consume(lambda events: None, block=False)  # the groups exist
    got: list[str] = []
    thread = threading.Thread(
        target=consumer.consume, args=(lambda events: got.extend(e.stream for e in events),)
    )
    thread.start()
    try:
        yield got
    finally:
        consumer.stop()
        thread.join(timeout=join)
    assert not thread.is_alive()


def test_a_group_blocks_on_three_nodes_at_once(
    cluster: ClusterSet, open_broker: OpenBroker
) -> None:
    streams = spread(cluster)
    broker = open_broker(cluster_registry(cluster, streams))
    consumer = broker.consumer("billing", **{**FAST, "block_timeout": 5.0})
    with _reading(consumer, 30) as got:
        for name in reversed(streams):
            broker.publish(name, {"to": name})
        wait_for(lambda: len(got) >= 3, 20, "the three events to be read")
    assert sorted(got) == sorted(streams)


WORKER_APP = """\
import threading

import streambroker as sb

registry = sb.Registry.from_yaml("streambroker.yaml").validate()
broker = registry.{face}()
lock = threading.Lock()


@broker.handler("billing", count=4, **{fast!r})
{define} handle(events):
    with lock, open("handled.txt", "a") as out:
        out.write("".join(event.stream + " " + event.id + "\\n" for event in events))
"""


@pytest.mark.parametrize("face", ["broker", "async_broker"])
def test_the_worker_handles_events_of_every_node_until_sigterm(
    cluster: ClusterSet, tmp_path: Path, face: str
) -> None:
    streams = spread(cluster)
    (tmp_path / "streambroker.yaml").write_text(
        f"default:\n    redis: {cluster.url()}\n    streams:\n"
        + "".join(f"        {name}: [billing]\n" for name in streams)
    )
    define = "def" if face == "broker" else "async def"
    (tmp_path / "app.py").write_text(WORKER_APP.format(face=face, define=define, fast=FAST))
    handled = tmp_path / "handled.txt"

    def lines() -> list[str]:
        return handled.read_text().splitlines() if handled.exists() else []

    broker = cluster_registry(cluster, streams).broker()
    try:
        published = [f"{name} {broker.publish(name, n)}" for n, name in enumerate(streams * 2)]
        command = [*CLI, "worker", "app:broker", "--consumers", "2"]
        with started(command, tmp_path) as process:
            published += [f"{name} {broker.publish(name, n)}" for n, name in enumerate(streams)]
            wait_for(lambda: len(lines()) >= 9, 30, "the worker to handle every event")
            stop_cleanly(process, signal.SIGTERM)
        out, err = output(tmp_path)
        assert sorted(lines()) == sorted(published), err
        assert {line.split()[0] for line in lines()} == set(streams)
        assert "SIGTERM received: stopping after the batches in hand" in err
        assert "worker stopped; handled 9 events: billing 9" in err
        assert (out, "Traceback" in err) == ("", False)
        # Each node's stream acknowledged, collected and left by the stopped consumers.
        for name in streams:
            assert cluster.node_of(name).client().xlen(name) == 0
            group = broker.group_stats(name, "billing")
            assert (group.lag, group.pending, group.consumers) == (0, 0, ())
    finally:
        broker.close()


# -- a slot migrated under a publisher and a consumer -------------------------------------


def _migrate(cluster: ClusterSet, key: str, source: ServerProcess, target: ServerProcess) -> None:
    """Move the slot of ``key`` from ``source`` to ``target``, its keys with it
    (``MIGRATE``), as an operator resharding does."""
    slot = key_slot(key)
    src, dst = source.client(), target.client()
    src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    for node in cluster.masters:
        node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)

    def moved() -> bool:
        try:
            src.xlen(key)
        except redis.ResponseError as exc:
            return "MOVED" in str(exc) or str(exc).startswith(str(slot))
        return False

    wait_for(moved, 20, "the slot to move")


def test_a_moved_slot_is_followed_without_loss_or_duplicate(
    cluster: ClusterSet, open_broker: OpenBroker
) -> None:
    streams = spread(cluster)
    broker = open_broker(cluster_registry(cluster, streams))
    consumer = broker.consumer("billing", **FAST)
    consumer.consume(lambda events: None, block=False)
    published: list[int] = []
    for n in range(20):
        broker.publish(streams[n % 3], {"n": n})
        published.append(n)
    seen: Counter[int] = Counter()
    consumer.consume(lambda es: seen.update(e.body["n"] for e in es), count=5, block=False)

    home, elsewhere = cluster.masters[0], cluster.masters[1]
    _migrate(cluster, streams[0], home, elsewhere)  # the client's slot map is stale now
    try:
        for n in range(20, 40):
            broker.publish(streams[n % 3], {"n": n})
            published.append(n)
        until(
            consumer,
            lambda es: seen.update(e.body["n"] for e in es),
            lambda: sum(seen.values()) >= 40,
            "every event to be read",
        )
        assert elsewhere.client().xlen(streams[0]) == 14
    finally:
        _migrate(cluster, streams[0], elsewhere, home)  # as the other tests expect
    assert sorted(seen) == published
    assert max(seen.values()) == 1  # none twice


# -- the replies of a split round trip, in order ------------------------------------------


def _incr_op(keys: list[str]) -> fx.Op[list[Any]]:
    replies = yield fx.Send("default", [("INCR", key) for key in keys])
    return list(replies)


@pytest.mark.parametrize("face", ["sync", "asyncio"])
def test_split_round_trips_reply_in_order(cluster_set: ClusterSet, face: str) -> None:
    cluster_set.wait_ready()
    registry = cluster_registry(cluster_set, ["orders"])
    options = ConnectionOptions()
    names = st.lists(st.sampled_from([f"k{n}" for n in range(12)] + ["{t}a", "{t}b"]), max_size=40)
    loop = asyncio.new_event_loop()
    sync_driver = SyncDriver(registry, options)
    async_driver = AsyncDriver(registry, options)
    counts: Counter[str] = Counter()

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(names)
    def check(keys: list[str]) -> None:
        if face == "sync":
            replies = sync_driver.run(_incr_op(keys))
        else:
            replies = loop.run_until_complete(async_driver.run(_incr_op(keys)))
        expected = []
        for key in keys:
            counts[key] += 1
            expected.append(counts[key])
        assert replies == expected

    try:
        cluster_set.flush()
        check()
    finally:
        sync_driver.close()
        loop.run_until_complete(async_driver.close())
        loop.close()
    assert len({cluster_set.node_of(key).port for key in counts}) == 3


def test_an_unreachable_cluster_is_a_connection_error_naming_the_pool(
    open_broker: OpenBroker,
) -> None:
    broker = open_broker(registry(f"redis+cluster://127.0.0.1:{free_port()}", pool="east"))
    with pytest.raises(sb.PoolConnectionError) as caught:
        broker.publish("orders", 1)
    assert caught.value.pool == "east"
    assert "no seed node of the cluster answered" in str(caught.value)


def test_events_of_a_consumer_that_died_are_reclaimed_on_every_node(
    cluster: ClusterSet, open_broker: OpenBroker
) -> None:
    streams = spread(cluster)
    broker = open_broker(cluster_registry(cluster, streams))
    for name in streams:
        broker.publish(name, {"on": name})
    died = broker.consumer("billing", "first", **FAST)

    def crash(events: list[sb.Event]) -> None:
        raise RuntimeError("the process died")

    with pytest.raises(RuntimeError):
        died.consume(crash, count=10, block=False)
    pending = {name: broker.group_stats(name, "billing").pending for name in streams}
    assert pending == dict.fromkeys(streams, 1)

    taken: list[sb.Event] = []
    other = broker.consumer("billing", "second", **FAST)
    until(other, taken.extend, lambda: len(taken) >= 3, "the second consumer to reclaim them")
    assert sorted(event.body["on"] for event in taken) == sorted(streams)
    assert all(event.delivery_count == 2 for event in taken)
    assert {name: broker.group_stats(name, "billing").pending for name in streams} == dict.fromkeys(
        streams, 0
    )


# -- replicas: wait_replicas and a failover -------------------------------------------------


def test_wait_replicas_waits_on_each_node_written(
    cluster_with_replicas: ClusterSet, open_broker: OpenBroker
) -> None:
    cluster = cluster_with_replicas
    streams = spread(cluster)
    broker = open_broker(cluster_registry(cluster, streams))
    with broker.batch(wait_replicas=1, wait_timeout=5) as batch:
        for name in streams:
            batch.publish(name, {"on": name})
    assert len(batch.ids) == 3
    for master in cluster.masters:  # each replica has its master's event already
        (name,) = [name for name in streams if cluster.node_of(name) is master]
        replica = redis.Redis(
            port=cluster.replica_of[master.port].port, single_connection_client=True
        )
        try:
            replica.execute_command("READONLY")
            assert replica.xlen(name) == 1
        finally:
            replica.close()
    with pytest.raises(sb.ReplicationError):
        broker.publish(streams[0], {"on": "nowhere"}, wait_replicas=2, wait_timeout=0.2)


def test_failover_publisher_and_consumer_carry_on(
    cluster_with_replicas: ClusterSet, event_loop_thread: Loop
) -> None:
    cluster = cluster_with_replicas
    streams = spread(cluster)
    config = cluster_registry(cluster, streams)
    broker = config.broker(socket_timeout=5, connect_timeout=2)
    async_broker = async_facade(config, event_loop_thread, socket_timeout=5)
    for face in (broker, async_broker):
        face.publish(streams[0], -1)  # connected to every node before the failover
    run = FailoverRun(
        broker,
        streams,
        "billing",
        FAST,
        options={"wait_replicas": 1, "wait_timeout": 0.5},
        expected=(sb.PoolConnectionError, sb.ReplicationError),
    )
    try:
        run.start()
        victim = cluster.node_of(streams[0])
        replica = cluster.kill_master(victim)
        cluster.wait_promoted(replica)
        run.switched()

        def lands_on_the_new_master(face: sb.Broker) -> bool:
            try:
                event_id = face.publish(streams[0], -2)
            except sb.PoolConnectionError:
                return False
            return bool(replica.client().xrange(streams[0], event_id, event_id))

        for face in (broker, async_broker):
            wait_for(partial(lands_on_the_new_master, face), 30, "a publish to the new master")
        # The killed master comes back as a replica of the promoted one: until then that
        # master has no replica and every wait_replicas=1 to it fails.
        cluster.heal()
        report = run.finish()
    finally:
        run.close()
        broker.close()
        async_broker.close()
    print(f"{cluster.kind}: {report}")
    # Every publish that returned was replicated: none may be lost.
    assert (report.lost, report.unexpected) == (set(), set())


def test_cli_operations_on_a_cluster(cluster: ClusterSet, tmp_path: Path) -> None:
    streams = spread(cluster)
    config = tmp_path / "streambroker.yaml"
    config.write_text(
        f"default:\n    redis: {cluster.url()}\n    streams:\n"
        + "".join(f"        {name}: [billing, audit]\n" for name in streams)
    )
    runner = CliRunner()

    def invoke(*args: str) -> str:
        result = runner.invoke(app, [*args, "-c", str(config)], env={"COLUMNS": "100"})
        assert (result.exit_code, result.stderr) == (0, ""), result.output
        return result.stdout

    invoke("scripts", "load")
    shas = [script.sha for script in fx.scripts()]
    for master in cluster.masters:
        assert all(master.client().script_exists(*shas))
    for name in streams:
        invoke("publish", name, json.dumps({"on": name}))
    broker = cluster_registry(cluster, streams).broker()
    try:
        for group in ("billing", "audit"):
            broker.consumer(group, **FAST).consume(lambda events: None, block=False)
        invoke("gc")
        assert [cluster.node_of(name).client().xlen(name) for name in streams] == [0, 0, 0]
        for name in streams:
            broker.publish(name, {"again": name})
        invoke("group", "reset", streams[1], "billing", "--to", "0", "--force")
        assert broker.group_stats(streams[1], "billing").lag == 1
        invoke("purge", streams[2], "--yes")
        assert cluster.node_of(streams[2]).client().xlen(streams[2]) == 0
        cluster.node_of(streams[0]).client().xgroup_create(streams[0], "old", id="0")
        invoke("group", "delete", streams[0], "old", "--yes")
        groups = cluster.node_of(streams[0]).client().xinfo_groups(streams[0])
        assert sorted(group["name"] for group in groups) == [b"audit", b"billing"]
        # The pending events of a consumer on every node, moved to another.
        for name in streams:
            broker.publish(name, {"claimed": name})

        def crash(events: list[sb.Event]) -> None:
            raise RuntimeError("the process died")

        with pytest.raises(RuntimeError):
            broker.consumer("audit", "gone", **FAST).consume(crash, count=20, block=False)
        held = {name: broker.group_stats(name, "audit").pending for name in streams}
        assert held == {streams[0]: 2, streams[1]: 2, streams[2]: 1}  # [2] was purged
        assert "moved 5 pending events" in invoke("claim", "audit", "gone", "kept", "--force")
        for name in streams:
            members = broker.group_stats(name, "audit").consumers
            pending = {member.name: member.pending for member in members if member.pending}
            assert pending == {"kept": held[name]}
    finally:
        broker.close()


def test_a_slot_being_migrated_is_followed_with_asking(
    cluster: ClusterSet, open_broker: OpenBroker
) -> None:
    streams = spread(cluster)
    broker = open_broker(cluster_registry(cluster, streams))
    consumer = broker.consumer("billing", **FAST)
    consumer.consume(lambda events: None, block=False)
    broker.publish(streams[0], {"n": 0})
    home, target = cluster.masters[0], cluster.masters[2]
    slot = key_slot(streams[0])
    src, dst = home.client(), target.client()
    src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    try:
        # The stream moved, the slot not yet: its old node answers ASK for it, and a
        # publish goes on to the new one with ASKING.
        src.execute_command("MIGRATE", "127.0.0.1", target.port, streams[0], 0, 5000)
        broker.publish(streams[0], {"n": 1})
        asking = redis.Redis(port=target.port, single_connection_client=True)
        try:
            asking.execute_command("ASKING")
            assert asking.xlen(streams[0]) == 2
        finally:
            asking.close()
    finally:
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        for node in cluster.masters:
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    try:
        # Reading a slot whose keys are split over two nodes is refused (TRYAGAIN) until
        # the migration ends; then the new owner serves both events, once each.
        seen: list[int] = []
        until(
            consumer,
            lambda es: seen.extend(e.body["n"] for e in es),
            lambda: len(seen) >= 2,
            "both events to be read",
        )
        assert sorted(seen) == [0, 1]
    finally:
        _migrate(cluster, streams[0], target, home)


def test_reply_budgets_hold_on_each_node(cluster: ClusterSet, open_broker: OpenBroker) -> None:
    limit = 1 << 20
    streams = spread(cluster)
    broker = open_broker(cluster_registry(cluster, streams), max_entry_size=limit)
    broker.consumer("billing", **FAST).consume(lambda events: None, block=False)
    published = [broker.publish(name, {"on": name}) for name in streams]
    huge_stream = streams[1]
    huge = (
        cluster.node_of(huge_stream)
        .client()
        .xadd(huge_stream, {"$body": b"x" * (8 << 20), "$codec": "msgpack"})
    )
    published += [broker.publish(name, {"after": name}) for name in streams]
    handled: list[str] = []

    until(
        broker.consumer("billing", **FAST),
        lambda events: handled.extend(e.id for e in events),
        lambda: len(handled) >= 6,
        "the events around the huge one to be handled",
    )

    assert sorted(handled) == sorted(published)
    (letter,) = broker.dead_letters(huge_stream, "billing")
    assert letter.event.id == huge.decode()
    assert "max_entry_size" in letter.error


def _range_op(keys: list[str], budget: int) -> fx.Op[list[Any]]:
    replies = yield fx.Send("default", [("XRANGE", key, "-", "+") for key in keys], budget=budget)
    return list(replies)


@pytest.mark.parametrize("face", ["sync", "asyncio"])
def test_a_piece_over_the_budget_stops_being_read(cluster: ClusterSet, face: str) -> None:
    streams = spread(cluster)
    registry = cluster_registry(cluster, streams)
    for name in streams:
        cluster.node_of(name).client().xadd(name, {"f": b"x" * (64 << 10)})
    loop = asyncio.new_event_loop()
    sync_driver = SyncDriver(registry, ConnectionOptions())
    async_driver = AsyncDriver(registry, ConnectionOptions())

    def run(op: fx.Op[list[Any]]) -> list[Any]:
        if face == "sync":
            return sync_driver.run(op)
        return loop.run_until_complete(async_driver.run(op))

    try:
        with pytest.raises(fx.ReplyTooLargeError) as caught:
            run(_range_op(streams, 32 << 10))
        assert caught.value.pool == "default"
        send = fx.Send("default", [("XRANGE", name, "-", "+") for name in streams], budget=1 << 20)

        def whole() -> fx.Op[list[Any]]:
            return (yield send)  # type: ignore[no-any-return]

        assert len(run(whole())) == 3
        assert 3 * (64 << 10) < send.received < 4 * (64 << 10)  # what the three pieces took
    finally:
        sync_driver.close()
        loop.run_until_complete(async_driver.close())
        loop.close()


def test_a_blocking_read_of_two_slots_on_one_node_is_capped(
    cluster: ClusterSet, open_broker: OpenBroker
) -> None:
    # Two streams of one node in two slots: one XREADGROUP each, in one piece, run one
    # after the other by the node. Blocking a minute on the first would hold back the
    # second's event a minute: the block is capped as for several pools.
    first = spread(cluster)[0]
    node = cluster.node_of(first)
    second = next(
        name
        for name in (f"t{n}" for n in range(1000))
        if cluster.node_of(name) is node and key_slot(name) != key_slot(first)
    )
    broker = open_broker(cluster_registry(cluster, [first, second]), socket_timeout=120)
    # Reclaiming and renewing the lease would cut the block short too: not for a while.
    slow = {"block_timeout": 60.0, "retry_after": 100.0, "lease": 100.0}
    consumer = broker.consumer("billing", **slow)
    with _reading(consumer, 90) as got:
        admin = node.client()
        wait_for(lambda: any(c["cmd"] == "xreadgroup" for c in admin.client_list()), 20, "a read")
        broker.publish(second, {"on": second})
        wait_for(lambda: got == [second], 20, "the second stream's event")
