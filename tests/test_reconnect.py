"""Consumers and servers that come and go: waiting for a server, giving up, saying once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import streambroker as sb
from streambroker.core import effects as fx
from streambroker.core.consuming import ConsumerCore
from streambroker.core.leases import renew_command
from streambroker.wire.keys import lease_key

from .conftest import OpenBroker, Server, _require_binary, wait_for
from .servers import SERVER_KINDS

FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.2, "retry_delay": 0.01}


@pytest.fixture(params=SERVER_KINDS)
def later(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A server of each kind, on a port of its own, not started yet."""
    server = Server(request.param, _require_binary(request.param), tmp_path / request.param)
    yield server
    server.stop()


def _registry(server: Server) -> sb.ValidatedRegistry:
    registry = sb.Registry()
    registry.register_redis(server.address)
    registry.register_stream("stream-a", "default", ["read-group-a"])
    return registry.validate()


RENEW_SHA = renew_command("", "g", "c", "t", 1)[1]


def _renews(effect: fx.Effect) -> bool:
    """Whether ``effect`` sends a lease renewal."""
    sends = effect.sends if isinstance(effect, fx.Parallel) else []
    return any(command[1] == RENEW_SHA for send in sends for command in send.commands)


@contextmanager
def _by_hand(config: sb.ValidatedRegistry, lease: float) -> Iterator[tuple[ConsumerCore, Any]]:
    """A consumer of read-group-a, and the driver whose effects the test performs itself."""
    with config.broker() as broker:
        consumer = broker.consumer(
            "read-group-a", lease=lease, retry_after=lease, block_timeout=0.05
        )
        yield consumer._core, broker._driver


def _until_expired(server: Server, core: ConsumerCore) -> None:
    """Wait until the server let the consumer's lease run out, as a pause past it does."""
    client = server.client()
    try:
        wait_for(lambda: not client.exists(lease_key("", core.group, core.name)), 10, "expiry")
    finally:
        client.close()


def _retries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if "trying again" in record.getMessage()]


def test_a_blocking_consumer_waits_for_its_server(
    later: Server, open_broker: OpenBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="streambroker")
    broker = open_broker(_registry(later))
    consumer = broker.consumer("read-group-a", "early", **FAST)
    handled: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.consume(lambda events: handled.extend(e.body for e in events))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: len(_retries(caplog)) >= 3 or errors, what="attempts to connect")
        assert not errors, errors
        later.start()
        broker.publish("stream-a", "hello")
        wait_for(lambda: handled == ["hello"] or errors, timeout=30, what="the event")
    finally:
        consumer.stop()
        thread.join(timeout=30)
    assert not errors, errors
    retries = _retries(caplog)
    # Each failure is logged once as a warning; its repetitions only in debug.
    assert [r.levelno for r in retries].count(logging.WARNING) == len(
        {r.getMessage().split("; trying again")[0] for r in retries}
    )
    assert any("reconnected after" in r.getMessage() for r in caplog.records)


def test_a_one_shot_consumer_gives_up_after_its_attempts(
    later: Server, open_broker: OpenBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="streambroker")
    broker = open_broker(_registry(later))
    with pytest.raises(sb.PoolConnectionError, match="redis pool 'default'"):
        broker.consumer("read-group-a", **FAST).consume(lambda events: None, block=False)
    assert len(_retries(caplog)) == 4  # the fifth failure gives up


def test_every_consumer_says_once_that_its_group_was_lost(
    server: Server, open_broker: OpenBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Consumers of one group in two brokers (as in two processes). "two" is busy in its
    handler when the server loses everything, and "one" recreates the group meanwhile:
    "two" never reads from the lost group, yet it says so too, once."""
    caplog.set_level(logging.WARNING, logger="streambroker")
    config = _registry(server)
    publisher = open_broker(config)
    seen: dict[str, list[object]] = {"one": [], "two": []}
    busy = threading.Event()

    def handler(name: str) -> Callable[[list[sb.Event]], None]:
        def handle(events: list[sb.Event]) -> None:
            seen[name].extend(event.body for event in events)
            if name == "two" and "slow" in seen[name]:
                busy.set()
                time.sleep(1.0)

        return handle

    runs = []
    for name in seen:
        consumer = open_broker(config).consumer("read-group-a", name, **{**FAST, "lease": 3.0})
        thread = threading.Thread(target=consumer.consume, args=(handler(name), 1))
        thread.start()
        runs.append((consumer, thread))
    try:
        for n in range(20):
            publisher.publish("stream-a", n)
        wait_for(lambda: len(seen["one"] + seen["two"]) == 20, what="the first events")
        while not busy.is_set():
            publisher.publish("stream-a", "slow")
            wait_for(lambda: busy.is_set() or "slow" in seen["one"], what="a slow handling")
        server.client().flushall()  # the server lost everything
        for n in range(20, 40):
            publisher.publish("stream-a", n)
        wait_for(
            lambda: set(range(20, 40)) <= set(seen["one"] + seen["two"]),
            timeout=20,
            what="consumption after the loss",
        )
        wait_for(
            lambda: len([r for r in caplog.records if "the server lost" in r.getMessage()]) >= 2,
            timeout=20,
            what="both consumers to notice the loss",
        )
    finally:
        for consumer, thread in runs:
            consumer.stop()
            thread.join(timeout=30)
    reports = [r.getMessage() for r in caplog.records if "the server lost data" in r.getMessage()]
    assert sorted(message.split(":")[0] for message in reports) == [
        "consumer one of group read-group-a",
        "consumer two of group read-group-a",
    ], reports


def test_a_lease_that_expired_while_a_renewal_waited_to_go_out_is_no_loss(
    server: Server, config: sb.ValidatedRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer paused after it timed a renewal but before sending it (a SIGSTOP can
    land there) finds its lease expired when the renewal arrives, and says so: the lease
    ran out, the server lost nothing. (Timed from the sending alone, the renewal looked
    sent in time, and the consumer reported a loss and recreated its groups.)"""
    lease = 0.5
    with _by_hand(config, lease) as (core, driver):
        driving = fx.Driving(core.consume(10, True))
        paused = False
        deadline = time.monotonic() + 30
        while not driving.done:
            assert time.monotonic() < deadline, "the consumer did not stop"
            effect = driving.effect
            if isinstance(effect, fx.Handle):
                driving.resume(None, None)
                continue
            if not paused and _renews(effect):
                _until_expired(server, core)  # as if stopped between timing and sending
                paused = True
                core.stopping = True
            driving.resume(*fx.outcome(driver._perform, effect, None))
    assert paused
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "the server lost data" in m], messages
    assert [m for m in messages if "its lease expired" in m], messages


def test_a_connection_closed_while_the_handler_ran_is_replaced_without_a_failed_round_trip(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer keeps its connection between round trips; one the server closed while
    the handler ran (an idle timeout, ``CLIENT KILL``) is replaced before the next round
    trip, as redis-py's pool replaces one it hands out: no round trip fails, nothing is
    said, nothing is lost."""
    caplog.set_level(logging.DEBUG, logger="streambroker")
    killer = server.client()
    kills: list[int] = []
    seen: list[object] = []

    def handler(events: list[sb.Event]) -> None:
        seen.extend(event.body for event in events)
        if len(kills) < 3:
            kills.append(killer.client_kill_filter(_type="normal", skipme=True))

    with _registry(server).broker() as broker:
        for n in range(8):
            broker.publish("stream-a", n)
        handled = broker.consumer("read-group-a", "c", **FAST).consume(
            handler, count=2, block=False
        )
        stats = broker.group_stats("stream-a", "read-group-a")
    assert len(kills) == 3
    assert min(kills) >= 1  # the consumer's connection among them
    assert (handled, sorted(seen)) == (8, list(range(8)))
    assert (stats.pending, stats.lag) == (0, 0)
    assert not _retries(caplog), [record.getMessage() for record in _retries(caplog)]


def test_a_renewal_that_retook_the_lease_is_judged_by_the_renewal_sent_before_it(
    server: Server, config: sb.ValidatedRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat's renewal timed before a pause and sent after it retakes the expired
    lease; the consumer loop's own renewal, sent after it, finds the lease and comes back
    first. The heartbeat's reply then says the lease ran out while the process was paused,
    not that the server lost it: it is judged by the renewal sent before it, not by the
    loop's, which came back first but was sent later."""
    lease = 0.5
    with _by_hand(config, lease) as (core, driver):
        driving = fx.Driving(core.consume(10, True))
        deadline = time.monotonic() + 30
        while not core.running:  # up to its first read: it holds the lease
            assert time.monotonic() < deadline, "the consumer did not start"
            driving.resume(*fx.outcome(driver._perform, driving.effect, None))
        beat = fx.Driving(core.heartbeat())  # timed now...
        _until_expired(server, core)  # ... while the lease runs out
        beaten = fx.outcome(driver._perform, beat.effect, None)  # sent now: it retakes it
        core._renew_at = 0.0
        while not _renews(driving.effect):
            assert time.monotonic() < deadline, "the consumer loop did not renew"
            driving.resume(*fx.outcome(driver._perform, driving.effect, None))
        driving.resume(*fx.outcome(driver._perform, driving.effect, None))  # found, back first
        beat.resume(*beaten)  # the heartbeat's reply last
        assert beat.done
        core.stopping = True
        while not driving.done:
            assert time.monotonic() < deadline, "the consumer did not stop"
            driving.resume(*fx.outcome(driver._perform, driving.effect, None))
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "the server lost data" in m], messages
    assert [m for m in messages if "its lease expired" in m], messages
