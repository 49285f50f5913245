"""Pools on Redis Sentinel: the address form, a pool's work through the sentinels, a
failover survived by a running publisher and consumer, and ``wait_replicas``.

The servers are a master, a replica and three sentinels of each kind (see
:class:`SentinelSet`), shared by the module; the failover test runs last, as it leaves
the old master to be reconfigured by the sentinels at their own pace.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

import streambroker as sb
from streambroker.apps.cli import app

from .conftest import OpenBroker, Server, free_port, wait_for
from .faces import Loop, async_facade
from .failover import FailoverRun
from .servers import SentinelSet

FAST = {"retry_after": 1.0, "lease": 2.0, "block_timeout": 0.2, "retry_delay": 0.05}


def registry(address: str, pool: str = "default") -> sb.ValidatedRegistry:
    r = sb.Registry()
    r.register_redis(address, pool=pool)
    r.register_stream("orders", pool, ["billing", "audit"])
    r.register_stream("probe", pool, ["nobody"])
    return r.validate()


def problems(address: str, db: int | None = None) -> list[str]:
    r = sb.Registry()
    r.register_redis(address, db, pool="main")
    r.register_stream("orders", "main", ["billing"])
    with pytest.raises(sb.ConfigError) as caught:
        r.validate()
    return list(caught.value.problems)


def failing_poison(handled: list[tuple[int, int]]) -> sb.Handler:
    """A handler that fails the events tagged ``poison=yes`` and records the others'
    (body ``n``, delivery count) in ``handled``."""

    def handle(events: list[sb.Event]) -> None:
        for event in events:
            if event.meta.get("poison") == "yes":
                event.fail(RuntimeError("poison"))
            else:
                handled.append((event.body["n"], event.delivery_count))

    return handle


# -- the address form, without a server ------------------------------------------------


def test_sentinel_address_is_parsed() -> None:
    url = "redis+sentinel://app:s3cret@10.0.0.1:26379,sentinel-b:26380,[::1]:26381/orders/3"
    spec = registry(url).pools["default"]

    assert (spec.kind, spec.service, spec.db, spec.tls) == ("sentinel", "orders", 3, False)
    assert spec.sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381))
    assert spec.display_address == (
        "redis+sentinel://app:***@10.0.0.1:26379,sentinel-b:26380,[::1]:26381/orders/3"
    )
    tls = registry("rediss+sentinel://h:26379/orders?ssl_ca_certs=/ca.pem").pools["default"]
    assert (tls.tls, tls.db, tls.sentinels) == (True, 0, (("h", 26379),))


def test_sentinel_credentials_are_masked_everywhere() -> None:
    url = (
        "rediss+sentinel://app:p4ss@h:26379/orders?sentinel_username=watch"
        "&sentinel_password=w4tch&ssl_password=k3y"
    )
    config = registry(url)
    shown = [repr(config), repr(config.pools["default"]), str(config.pools)]
    shown.append(config.pools["default"].display_address)

    for text in shown:
        assert all(secret not in text for secret in ("p4ss", "w4tch", "k3y")), text
    assert "sentinel_password=***" in shown[-1]
    assert "sentinel_username=watch" in shown[-1]
    # A bad parameter after the sentinels' password may be the rest of it: never shown.
    (problem,) = problems("redis+sentinel://h:26379/orders?sentinel_password=a&b=c")
    assert "a&b" not in problem
    assert "not accepted after a password" in problem


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("redis+sentinel://h:26379", "names no Sentinel service"),
        ("redis+sentinel://h:26379/", "names no Sentinel service"),
        ("redis+sentinel://h:26379//2", "names no Sentinel service"),
        ("redis+sentinel:///orders", "cannot parse sentinel ''"),
        ("redis+sentinel://h:26379,,g:26379/orders", "cannot parse sentinel ''"),
        ("redis+sentinel://h/orders", "cannot parse sentinel 'h': expected host:port"),
        ("redis+sentinel://h:26379:2/orders", "cannot parse sentinel 'h:26379:2'"),
        ("redis+sentinel://h:99999/orders", "sentinel port 99999 is out of range"),
        ("redis+sentinel://h:port/orders", "sentinel port 'port' is not a number"),
        ("redis+sentinel://h:26379/orders/x", "db 'x' is not a number"),
        ("redis+sentinel://h:26379/orders/1/2", "more than /SERVICE/DB"),
        ("redis+sentinel://h:26379/or*ders", "sentinel service name 'or*ders' holds '*'"),
        ("redis+sentinel://h:26379/orders/1?db=2", "db 1 in its path but db=2"),
        ("redis+sentinel://h:26379/orders?ssl_cert_reqs=none", "applies only to rediss://"),
        ("redis+sentinel://h:26379/orders?protocol=3", "parameter 'protocol' is not accepted"),
        ("redis://h:6379/0?sentinel_password=x", "'sentinel_password' is not accepted"),
    ],
)
def test_bad_sentinel_addresses_are_config_errors(address: str, expected: str) -> None:
    (problem,) = problems(address)

    assert problem.startswith("redis pool main: "), problem
    assert expected in problem, problem


def test_sentinel_db_must_agree_with_db_argument() -> None:
    (problem,) = problems("redis+sentinel://h:26379/orders/1", db=2)

    assert problem == "redis pool main: the URL selects db 1 but db=2 was given"
    r = sb.Registry()
    r.register_redis("redis+sentinel://h:26379/orders", db=4)
    assert r.validate().pools["default"].db == 4


def test_sentinel_address_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "streambroker.yaml"
    path.write_text(
        "default:\n"
        "    redis: redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26379/orders/2\n"
        "    streams:\n"
        "        orders: [billing]\n"
        "broken:\n"
        "    redis: redis+sentinel://10.0.0.1:26379/?sentinel_password=s3cret\n"
        "    streams:\n"
        "        other: [billing]\n"
    )
    with pytest.raises(sb.ConfigError) as caught:
        sb.Registry.from_yaml(path).validate()

    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:6: redis pool broken: "), problem
    assert "names no Sentinel service" in problem
    assert "s3cret" not in problem
    path.write_text(path.read_text().split("broken:")[0])
    spec = sb.Registry.from_yaml(path).validate().pools["default"]
    assert (spec.service, spec.db, len(spec.sentinels)) == ("orders", 2, 2)


def test_wait_options_are_checked() -> None:
    broker = registry("localhost:6379:0").broker(socket_timeout=5)
    try:
        for replicas, timeout in [(-1, 1.0), (1.5, 1.0), (True, 1.0), (1, 0), (1, 5), (1, "1")]:
            with pytest.raises(sb.InvalidArgumentError):
                broker.publish("orders", 1, wait_replicas=replicas, wait_timeout=timeout)  # type: ignore[arg-type]
            with pytest.raises(sb.InvalidArgumentError):
                broker.batch(wait_replicas=replicas, wait_timeout=timeout)  # type: ignore[arg-type]
    finally:
        broker.close()


# -- a pool on the sentinels -------------------------------------------------------------


def test_sentinel_pool_publishes_consumes_and_reports(
    sentinels: SentinelSet, open_broker: OpenBroker, tmp_path: Path
) -> None:
    broker = open_broker(registry(sentinels.url(db=2)))
    first = broker.publish("orders", {"n": 0})
    with broker.batch() as batch:
        for n in range(1, 5):
            batch.publish("orders", {"n": n}, {"poison": "yes" if n == 3 else "no"})
    assert len(batch.ids) == 4
    assert sentinels.master().client(db=2).xlen("orders") == 5

    handled: list[tuple[int, int]] = []
    handle = failing_poison(handled)

    consumer = broker.consumer("billing", **{**FAST, "max_deliveries": 2})
    consumer.consume(handle, block=False)

    def dead() -> list[sb.DeadLetter]:
        consumer.consume(handle, block=False)
        return broker.dead_letters("orders", "billing")

    wait_for(dead, 20, "the poison event to be a dead letter")
    (letter,) = broker.dead_letters("orders", "billing")
    assert letter.event.body == {"n": 3}
    assert "poison" in letter.error
    assert sorted(handled) == [(0, 1), (1, 1), (2, 1), (4, 1)]
    assert first in [event.id for event in broker.read("orders")]

    broker.consumer("audit", **FAST).consume(lambda events: None, block=False)
    broker.collect_garbage("orders")
    stream = broker.stream_stats("orders")
    assert (stream.pool, stream.length, stream.entries_added) == ("default", 0, 5)
    billing = broker.group_stats("orders", "billing")
    assert (billing.lag, billing.pending, billing.dead_letters) == (0, 0, 1)

    config = tmp_path / "streambroker.yaml"
    config.write_text(
        f"default:\n    redis: {sentinels.url(db=2)}\n"
        "    streams:\n        orders: [billing, audit]\n"
    )
    result = CliRunner().invoke(app, ["stats", "--json", "-c", str(config)], env={"COLUMNS": "80"})
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    (data,) = json.loads(result.stdout)
    assert (data["stream"], data["length"]) == ("orders", 0)
    assert {group["group"]: group["dead_letters"] for group in data["groups"]} == {
        "billing": 1,
        "audit": 0,
    }


def test_unknown_service_is_a_connection_error_naming_the_pool(
    sentinels: SentinelSet, open_broker: OpenBroker
) -> None:
    broker = open_broker(registry(f"redis+sentinel://{sentinels.hosts}/nosuch", pool="east"))

    with pytest.raises(sb.PoolConnectionError) as caught:
        broker.publish("orders", 1)

    assert caught.value.pool == "east"
    assert "no sentinel names a master of the pool's service" in str(caught.value)
    assert "nosuch" in str(caught.value)


def test_readonly_replica_is_a_connection_error_not_a_command_error(
    sentinels: SentinelSet, open_broker: OpenBroker
) -> None:
    # A plain pool on what is now a replica: as a pool whose master was switched.
    broker = open_broker(registry(f"{sentinels.replica().address}:0", pool="old"))

    for attempt in (
        lambda: broker.publish("orders", 1),
        lambda: _batch(broker),
        lambda: broker.consumer("billing", **FAST).consume(lambda events: None, block=False),
    ):
        with pytest.raises(sb.PoolConnectionError) as caught:
            attempt()
        assert not isinstance(caught.value, sb.ServerReplyError)
        assert caught.value.pool == "old"
        assert "read-only replica" in str(caught.value), caught.value


def _batch(broker: sb.Broker) -> None:
    with broker.batch() as batch:
        batch.publish("orders", 1)
        batch.publish("orders", 2)


def test_wait_replicas(sentinels: SentinelSet, open_broker: OpenBroker) -> None:
    broker = open_broker(registry(sentinels.url(), pool="east"))
    event_id = broker.publish("orders", 1, wait_replicas=1)
    with broker.batch(wait_replicas=1) as batch:
        batch.publish("orders", 2)
        batch.publish("orders", 3)
    assert sentinels.replica().client().xlen("orders") == 3

    with pytest.raises(sb.ReplicationError) as caught:
        broker.publish("orders", 4, wait_replicas=2, wait_timeout=0.1)
    assert (caught.value.acknowledged, caught.value.wanted) == (1, 2)

    replica = sentinels.replica()
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(sb.ReplicationError) as caught:
            broker.publish("orders", 5, wait_replicas=1, wait_timeout=0.2)
        single = caught.value
        batch = broker.batch(wait_replicas=1, wait_timeout=0.2)
        batch.publish("orders", 6)
        batch.publish("orders", 7)
        with pytest.raises(sb.ReplicationError) as caught:
            batch.flush()
        elapsed = time.monotonic() - started
    finally:
        replica.process.send_signal(signal.SIGCONT)
    assert elapsed < 5, "a short wait_timeout is not a long wait"
    assert (single.pool, single.acknowledged, len(single.ids)) == ("east", 0, 1)
    assert str(single) == (
        f"redis pool 'east': event {single.ids[0]} was written to the master, but 0 of the 1 "
        "replicas asked for acknowledged within 0.2 s: a failover may lose them"
    )
    assert caught.value.ids == batch.ids
    assert len(batch.ids) == 2
    assert "2 events" in str(caught.value)
    bodies = [event.body for event in broker.read("orders")]
    assert bodies == [1, 2, 3, 4, 5, 6, 7], "the events are on the master all the same"
    assert event_id == broker.read("orders")[0].id
    sentinels.wait_synced()


def test_wait_replicas_on_a_single_server(server: Server, open_broker: OpenBroker) -> None:
    broker = open_broker(registry(f"{server.address}:0"))

    assert broker.publish("orders", 1, wait_replicas=0)
    with pytest.raises(sb.ReplicationError) as caught:
        broker.publish("orders", 1, wait_replicas=1, wait_timeout=0.05)
    assert (caught.value.pool, caught.value.acknowledged) == ("default", 0)


# -- a failover while a publisher and a consumer run --------------------------------------


def test_failover_publisher_and_consumer_carry_on(
    sentinels: SentinelSet, event_loop_thread: Loop
) -> None:
    config = registry(sentinels.url(), pool="east")
    broker = config.broker(socket_timeout=5, connect_timeout=2)
    async_broker = async_facade(config, event_loop_thread, socket_timeout=5)
    for face in (broker, async_broker):
        face.publish("probe", "before")  # connected to the master before the failover
    run = FailoverRun(
        broker,
        ["orders"],
        "billing",
        FAST,
        options={"wait_replicas": 1, "wait_timeout": 0.5},
        expected=(sb.PoolConnectionError, sb.ReplicationError),
    )
    try:
        run.start()
        old = sentinels.failover()
        wait_for(lambda: sentinels.master_address() != old, 20, "the sentinels to switch")
        run.switched()
        new_master = sentinels.master().client()

        def lands_on_new_master(face: sb.Broker) -> bool:
            event_id = face.publish("probe", "after")
            return bool(new_master.xrange("probe", event_id, event_id))

        for face in (broker, async_broker):
            wait_for(partial(lands_on_new_master, face), 20, "a publish to reach the new master")
        new_master.close()
        # Before the sentinels demote the old master: the broker moved by itself.
        old_node = next(node for node in sentinels.nodes if node.address == old)
        assert old_node.role() == "master"
        # The sentinels make the old master a replica of the new one themselves, once
        # they see it still acting as a master (some 10 s on); until then the new master
        # has no replica and every wait_replicas=1 fails. Done now to keep the test short.
        host, port = sentinels.master_address().split(":")
        demoted = old_node.client()
        demoted.replicaof(host, port)
        demoted.close()
        report = run.finish()
    finally:
        run.close()
        broker.close()
        async_broker.close()
    print(f"{sentinels.kind}: {report}")
    assert (report.lost, report.unexpected) == (set(), set())
    assert sentinels.master_address() != old


def test_wait_cut_short_by_a_demotion_is_a_connection_error(
    server: Server, open_broker: OpenBroker
) -> None:
    # A WAIT (or XREADGROUP) blocked on a master that turns replica gets UNBLOCKED.
    broker = open_broker(registry(f"{server.address}:0", pool="west"))
    broker.publish("orders", 0)
    outcome: list[BaseException] = []

    def publish() -> None:
        try:
            broker.publish("orders", 1, wait_replicas=1, wait_timeout=5)
        except sb.BrokerError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    admin = server.client()
    try:
        wait_for(
            lambda: any(c["cmd"] == "wait" for c in admin.client_list()), 10, "the WAIT to block"
        )
        admin.replicaof("127.0.0.1", str(free_port()))  # a master that is not there
        thread.join(timeout=30)
    finally:
        admin.replicaof("NO", "ONE")
        admin.close()
    assert not thread.is_alive()
    (error,) = outcome
    assert isinstance(error, sb.PoolConnectionError), error
    assert not isinstance(error, sb.ServerReplyError)
    assert error.pool == "west"
    assert "instance state changed" in str(error)
