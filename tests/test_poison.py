"""Poison events: only the event the handler fails on reaches the dead letters.

A redelivered event is handed in smaller batches (halving with each delivery) and an
event on its last allowed delivery is handed alone, so a failing batch is split until
its poison event is alone; its batch-mates are handled, never buried with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streambroker as sb
from streambroker.core.handing import LAST_DELIVERY_MARK, batch_limit, batches
from streambroker.wire.events import Event

from .conftest import OpenBroker, Server, seed_registry, wait_for

pytestmark = pytest.mark.anywhere

FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.2, "retry_delay": 0.01}


class Recorder:
    """Records every batch the handler is given: (body, delivery count) per event."""

    def __init__(self, poison: set[int], how: str = "raise") -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.poison = poison
        self.how = how

    def __call__(self, events: list[sb.Event]) -> None:
        self.batches.append([(event.body, event.delivery_count) for event in events])
        for event in events:
            if event.body in self.poison:
                if self.how == "raise":
                    raise ValueError(f"cannot handle {event.body}")
                event.fail(KeyError(event.body))

    def handled(self) -> set[int]:
        """Bodies handed in a batch that succeeded (no poison in it, or fail() used)."""
        done = set()
        for batch in self.batches:
            if self.how == "fail" or not any(body in self.poison for body, _ in batch):
                done.update(body for body, _ in batch if body not in self.poison)
        return done


def drain(consumer: sb.Consumer, handler: Recorder, attempts: int = 60) -> None:
    """Run one-shot consumes, restarting after each raise (as a worker does), until
    nothing is pending."""
    for _ in range(attempts):
        try:
            if consumer.consume(handler, count=8, block=False) == 0:
                return
        except ValueError:
            continue
    pytest.fail(f"still not drained after {attempts} consumes: {handler.batches}")


def test_batch_mates_of_a_raising_event_are_handled_not_buried(
    broker: sb.Broker, server: Server
) -> None:
    """The issue's case: 5 events in one batch, the handler raises on the first."""
    ids = [broker.publish("stream-a", n) for n in range(5)]
    handler = Recorder({0})
    consumer = broker.consumer("read-group-a", "w", max_deliveries=2, **FAST)
    for _ in range(2):
        with pytest.raises(ValueError, match="cannot handle 0"):
            consumer.consume(handler, count=5, block=False)
    assert consumer.consume(handler, count=5, block=False) == 4
    assert handler.batches[0] == [(n, 1) for n in range(5)]
    assert handler.batches[1] == [(0, 2)]  # the last delivery: alone
    assert sorted(body for batch in handler.batches[2:] for body, _ in batch) == [1, 2, 3, 4]
    assert all(len(batch) == 1 for batch in handler.batches[2:])
    (letter,) = broker.dead_letters("stream-a", "read-group-a")
    assert letter.event.id == ids[0]
    assert letter.deliveries == 2
    assert letter.error.splitlines()[0] == "ValueError: cannot handle 0"
    assert "in __call__" in letter.error
    assert server.client().xpending("stream-a", "read-group-a")["pending"] == 0


def test_a_failed_event_is_dead_lettered_with_its_error_and_the_right_count(
    broker: sb.Broker,
) -> None:
    for n in range(6):
        broker.publish("stream-a", n)
    handler = Recorder({3}, how="fail")
    consumer = broker.consumer("read-group-a", "w", max_deliveries=3, **FAST)
    drain(consumer, handler)
    (letter,) = broker.dead_letters("stream-a", "read-group-a")
    assert letter.event.body == 3
    assert letter.deliveries == 3
    assert letter.error == "KeyError: 3"
    assert [count for batch in handler.batches for body, count in batch if body == 3] == [1, 2, 3]
    assert handler.handled() == {0, 1, 2, 4, 5}


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    events=st.integers(1, 24),
    poison=st.sets(st.integers(0, 23), max_size=3),
    max_deliveries=st.integers(1, 4),
    how=st.sampled_from(["raise", "fail"]),
    count=st.integers(1, 10),
)
def test_only_poison_events_reach_the_dead_letters(
    server: Server,
    open_broker: OpenBroker,
    events: int,
    poison: set[int],
    max_deliveries: int,
    how: str,
    count: int,
) -> None:
    """Whatever the batches and the poison, the dead letters are exactly the events that
    always fail, each handed alone on its last delivery, recording that count."""
    server.flush()
    broker = open_broker(seed_registry(server.pool_address(0), server.pool_address(3)))
    poison = {p for p in poison if p < events}
    for n in range(events):
        broker.publish("stream-b", n)
    handler = Recorder(poison, how)
    consumer = broker.consumer("read-group-ab", "w", max_deliveries=max_deliveries, **FAST)
    for _ in range(80):
        try:
            if consumer.consume(handler, count=count, block=False) == 0:
                break
        except ValueError:
            continue
    letters = broker.dead_letters("stream-b", "read-group-ab")
    assert sorted(letter.event.body for letter in letters) == sorted(poison)
    assert all(letter.deliveries == max_deliveries for letter in letters)
    for body in poison:
        # Its last handing: alone, on (or past, if a batch-mate's failure cut its
        # earlier delivery short) its last allowed delivery.
        (last_count,) = [
            count for batch in handler.batches if len(batch) == 1 for b, count in batch if b == body
        ][-1:]
        assert last_count >= max_deliveries, handler.batches
        assert all(
            count < max_deliveries
            for batch in handler.batches
            if len(batch) > 1
            for b, count in batch
            if b == body
        ), handler.batches
    assert handler.handled() == set(range(events)) - poison
    assert server.client().xpending("stream-b", "read-group-ab")["pending"] == 0


def _event(deliveries: int) -> Event:
    return Event("s", "1-0", [], delivery_count=deliveries)


@given(
    counts=st.lists(st.integers(1, 8), max_size=40),
    count=st.integers(1, 64),
    max_deliveries=st.integers(1, 6),
)
def test_batches_halve_with_each_delivery_and_the_last_one_is_alone(
    counts: list[int], count: int, max_deliveries: int
) -> None:
    events = [_event(n) for n in counts]
    cut = list(batches(events, count, max_deliveries))
    assert [event for batch in cut for event in batch] == events  # same events, same order
    for batch in cut:
        assert batch
        for event in batch:
            assert len(batch) <= batch_limit(event.delivery_count, count, max_deliveries)
            if event.delivery_count >= max_deliveries:
                assert len(batch) == 1
            elif event.delivery_count > 1:
                assert len(batch) <= max(1, count // 2 ** (event.delivery_count - 1))


_KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    import streambroker as sb
    settings = json.loads(sys.argv[1])
    registry = sb.Registry()
    registry.register_redis(settings["address"])
    registry.register_stream("stream-a", "default", ["read-group-a"])
    def handler(events):
        with open(settings["log"], "a") as log:
            for event in events:
                log.write(json.dumps([event.body, event.delivery_count, len(events)]) + "\\n")
                log.flush()
                if event.body == settings["poison"]:
                    os.kill(os.getpid(), signal.SIGKILL)
    with registry.validate().broker() as broker:
        consumer = broker.consumer("read-group-a", "w", **settings["options"])
        print(consumer.consume(handler, count=4, block=False), flush=True)
    """
)


def test_a_consumer_killed_by_its_event_buries_only_that_event(
    server: Server, tmp_path: Path
) -> None:
    """The handler SIGKILLs its process on the poison event; the process is started
    again each time, as a supervisor would, until the stream is drained."""
    config = seed_registry(server.pool_address(0), server.pool_address(3))
    with config.broker() as broker:
        for n in range(10):
            broker.publish("stream-a", n)
        log = tmp_path / "handled.jsonl"
        options = {**FAST, "lease": 0.3, "max_deliveries": 3}
        settings = {
            "address": server.pool_address(0),
            "log": str(log),
            "poison": 5,
            "options": options,
        }
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
        outcomes = []
        client = server.client()
        for _ in range(12):
            # As a supervisor restarting it: once the dead process's lease expired.
            wait_for(lambda: not client.exists("{sb:lease:12:read-group-a}:w"), what="the lease")
            run = subprocess.run(
                [sys.executable, "-c", _KILLER, json.dumps(settings)],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
            outcomes.append(run.returncode)
            if run.returncode == 0 and run.stdout.strip() == "0":
                break
            if run.returncode not in (0, -signal.SIGKILL):
                pytest.fail(f"consumer process failed: {run.stderr}")
        else:
            pytest.fail(f"not drained after 12 runs: {outcomes}")
        handings = [json.loads(line) for line in log.read_text().splitlines()]
        (letter,) = broker.dead_letters("stream-a", "read-group-a")
        assert letter.event.body == 5
        assert letter.deliveries == 3
        assert "stopped while handling it on its last delivery" in letter.error
        assert [h for h in handings if h[0] == 5][-1] == [5, 3, 1]  # alone, on delivery 3
        assert {h[0] for h in handings} == set(range(10))
        assert broker.group_stats("stream-a", "read-group-a").pending == 0
        assert all(h[1] < LAST_DELIVERY_MARK for h in handings)
