"""Scripts sent by SHA1 (``EVALSHA``), on the real servers and both faces: a script the
server lacks goes out with its text in its own place (``SCRIPT EXISTS`` asks first); one
it lost meanwhile (``SCRIPT FLUSH``, a restart) is sent once more with its text, never
inside a transaction; preloaded, they serve a user the ACL denies ``EVAL``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions as rex

import streambroker as sb
from streambroker.core import effects as fx
from streambroker.core.delivery import ack_owned_command, touch_command
from streambroker.core.gc import COLLECT_SCRIPT, collect_command
from streambroker.core.leases import renew_command
from streambroker.io import replies as rp

from . import test_permissions
from .conftest import OpenBroker, Server, wait_for
from .test_cli import invoke, write_config
from .test_permissions import Users, raised_within
from .test_round_trips import _run

FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.1, "retry_delay": 0.01}
POISON = 3
#: Counts its runs in KEYS[1]: a script run twice would show.
COUNTING = fx.Script("return redis.call('INCR', KEYS[1])")

users = test_permissions.users


@pytest.fixture(params=("sync", "async"))
def face(request: pytest.FixtureRequest) -> str:
    """Each I/O layer in turn."""
    return str(request.param)


def test_a_missing_script_is_sent_with_its_text_in_its_place(server: Server, face: str) -> None:
    counting = ("EVALSHA", COUNTING.sha, 1, "runs")
    unknown = ("EVALSHA", "0" * 40, 0)  # not one of ours: never sent with a text

    result = _run(
        face,
        server,
        [
            # The server lacks it (SCRIPT EXISTS says so): EVAL in its own place, once.
            fx.Send("default", [counting, ("INCR", "runs"), counting], allow_errors=True),
            fx.Send("default", [("SCRIPT", "FLUSH")]),
            # Flushed behind the broker's back: NOSCRIPT, then sent again with its text.
            fx.Send("default", [counting, unknown], allow_errors=True),
        ],
    )

    assert not isinstance(result, sb.BrokerError), result
    assert result[0] == [1, 2, 3]  # in order: the INCR between saw the first run
    assert result[2][0] == 4
    assert isinstance(result[2][1], fx.ReplyError)
    assert "No matching script" in result[2][1].message
    client = server.client(4)
    assert client.get("runs") == b"4"
    assert client.script_exists(COUNTING.sha) == [True]


def test_a_missing_script_in_a_transaction_runs_in_its_place_or_not_at_all(
    server: Server, face: str
) -> None:
    transaction = [
        ("MULTI",),
        ("SET", "applied", "1"),
        ("EVALSHA", COUNTING.sha, 1, "runs"),
        ("EXEC",),
    ]

    result = _run(
        face,
        server,
        [
            fx.Send("default", transaction, allow_errors=True),  # lacking it: EVAL in place
            fx.Send("default", [("SCRIPT", "FLUSH")]),
            fx.Send("default", transaction, allow_errors=True),  # flushed meanwhile
        ],
    )

    assert not isinstance(result, sb.BrokerError), result
    assert result[0][-1] == [b"OK", 1]
    applied, missing = result[2][-1]
    assert applied == b"OK"
    assert isinstance(missing, rex.NoScriptError)
    assert server.client(4).get("runs") == b"1"  # the second neither ran nor was sent again


def test_the_missing_scripts_are_those_evalsha_replies_outside_a_transaction() -> None:
    counting = ("EVALSHA", COUNTING.sha, 1, "runs")
    send = fx.Send(
        "p", [counting, ("GET", "k"), ("MULTI",), counting, ("EXEC",), counting, counting]
    )
    noscript = rex.NoScriptError("No matching script.")
    # Inside the transaction: as a server checking scripts when it queues them would
    # answer; sent alone the script would run outside the transaction.
    replies: list[Any] = [noscript, rex.ResponseError("WRONGTYPE"), b"OK", noscript]
    replies += [rex.ResponseError("EXECABORT"), rex.ResponseError("ERR other"), noscript]

    again = rp.missing_scripts(send, replies)

    assert again == [("EVAL", COUNTING.text, 1, "runs")] * 2
    assert rp.put_back(send, list(replies), [5, 6]) == [5, *replies[1:6], 6]


class Job:
    """A consumer's whole job on stream-a, as one user: publish; take over what a dead
    consumer held (reclaim); a handler long enough for heartbeats; a poison event
    retried then dead-lettered; acknowledging and collecting; replaying the dead letter;
    leaving the group. ``between`` runs between the steps and in every handler call."""

    def __init__(self, broker: sb.Broker, server: Server, between: Callable[[], None]) -> None:
        self.broker = broker
        self.admin = server.client()
        self.between = between
        self.handled: list[int] = []
        self.first = True
        self.cured = False  # the poison event, once replayed

    def handle(self, events: list[sb.Event]) -> None:
        started = time.monotonic()
        self.between()
        if self.first:
            self.first = False
            # The idle time of the event restarts when a heartbeat touches it.
            event = events[0]

            def touched() -> bool:
                (row,) = self.admin.xpending_range(
                    "stream-a", "read-group-a", event.id, event.id, 1
                )
                return bool(row["time_since_delivered"] + 100 < (time.monotonic() - started) * 1000)

            wait_for(touched, timeout=30, what="a heartbeat")
        for event in events:
            if event.body == POISON and not self.cured:
                event.fail(ValueError("poison"))
            else:
                self.handled.append(event.body)

    def run(self) -> None:
        broker, admin = self.broker, self.admin
        admin.xgroup_create("stream-a", "read-group-a", id="0", mkstream=True)  # for "dead"
        for n in range(10):
            broker.publish("stream-a", n)
        self.between()
        admin.xreadgroup("read-group-a", "dead", {"stream-a": ">"}, count=3)

        def idle() -> bool:
            rows = admin.xpending_range("stream-a", "read-group-a", "-", "+", 10, "dead")
            return all(row["time_since_delivered"] >= 700 for row in rows)

        wait_for(idle, timeout=30, what="the dead consumer's events to idle")
        consumer = broker.consumer("read-group-a", "c", max_deliveries=2, **FAST)
        deadline = time.monotonic() + 60
        while not broker.dead_letters("stream-a", "read-group-a") or len(self.handled) < 9:
            assert time.monotonic() < deadline, self.handled
            consumer.consume(self.handle, count=4, block=False)
            self.between()
        assert sorted(self.handled) == [n for n in range(10) if n != POISON]
        (letter,) = broker.dead_letters("stream-a", "read-group-a")
        assert letter.event.body == POISON
        self.between()

        self.cured = True
        assert broker.replay_dead_letters("stream-a", "read-group-a") == 1
        self.between()
        consumer.consume(self.handle, count=4, block=False)
        assert sorted(self.handled) == list(range(10))
        self.between()

        broker.consumer("read-group-ab", "c").consume(lambda events: self.between(), block=False)
        self.between()
        broker.collect_garbage()
        assert admin.xlen("stream-a") == 0
        assert admin.xpending("stream-a", "read-group-a")["pending"] == 0
        assert broker.dead_letters("stream-a", "read-group-a") == []
        self.between()
        assert consumer.leave() == []
        names = {row["name"] for row in admin.xinfo_consumers("stream-a", "read-group-a")}
        assert names == {b"dead"}


def test_everything_works_across_script_flushes(broker: sb.Broker, server: Server) -> None:
    admin = server.client()
    flushes = 0

    def flush() -> None:
        nonlocal flushes
        admin.script_flush()
        flushes += 1

    Job(broker, server, flush).run()
    assert flushes > 10


def acl_log(server: Server) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = server.client().acl_log()
    return entries


def test_a_user_without_eval_does_its_whole_job_once_the_scripts_are_loaded(
    server: Server, open_broker: OpenBroker, config: sb.ValidatedRegistry, users: Users
) -> None:
    with open_broker(config) as admin:
        assert admin.load_scripts() == dict.fromkeys(("default", "second"), len(fx.scripts()))
    server.client().acl_log_reset()
    broker = open_broker(users.config("-eval", "+evalsha"))

    Job(broker, server, lambda: None).run()

    assert acl_log(server) == []


def test_a_user_without_eval_is_refused_the_scripts_not_loaded(
    server: Server, open_broker: OpenBroker, users: Users
) -> None:
    server.client().acl_log_reset()
    broker = open_broker(users.config("-eval", "+evalsha"))
    broker.publish("stream-a", "one")
    consumer = broker.consumer("read-group-a", "denied", **FAST)

    error = raised_within(30, lambda: consumer.consume(lambda events: None, block=True))

    assert isinstance(error, sb.PoolPermissionError), repr(error)
    # Its first script creates its group.
    assert (error.pool, error.command) == (
        "default",
        "cannot create consumer group 'read-group-a' of stream 'stream-a'",
    )
    assert "no permissions to run the 'eval' command" in str(error)
    assert {entry["object"] for entry in acl_log(server)} == {"eval"}


def test_a_refused_evalsha_names_the_scripts_key(
    server: Server, open_broker: OpenBroker, users: Users
) -> None:
    broker = open_broker(users.config("-evalsha"))
    consumer = broker.consumer("read-group-a", "denied", **FAST)

    error = raised_within(30, lambda: consumer.consume(lambda events: None, block=True))

    assert isinstance(error, sb.PoolPermissionError), repr(error)
    # Its first scripts went out as EVAL (the server lacked them); then as EVALSHA, the
    # first of which reads its pending events.
    assert error.command == "script on stream-a"
    assert "no permissions to run the 'evalsha' command" in str(error)


def test_load_scripts_names_the_pool_it_is_refused_on(
    server: Server, open_broker: OpenBroker, users: Users
) -> None:
    broker = open_broker(users.config("-script"))

    with pytest.raises(sb.PoolPermissionError) as caught:
        broker.load_scripts()

    assert caught.value.command == "SCRIPT LOAD"
    assert "no permissions to run the 'script|load' command" in str(caught.value)
    assert str(caught.value).startswith("redis pool '")


def packed(commands: list[fx.Command]) -> int:
    return len(b"".join(rp.pack(commands)))


def test_an_acknowledgement_round_trip_sends_the_scripts_sha_not_its_text() -> None:
    ids = [f"1700000000000-{n}" for n in range(10)]
    round_trip = [
        ("XACK", "stream-a", "read-group-a", *ids),
        ack_owned_command("stream-a", "read-group-a", "consumer-1", ids),
        collect_command("stream-a", ["read-group-a", "read-group-ab"]),
        renew_command("", "read-group-a", "consumer-1", "0" * 32, 30_000),
        touch_command("stream-a", "read-group-a", "consumer-1", ids),
    ]
    as_text = [fx.with_text(c) if c[0] == "EVALSHA" else c for c in round_trip]

    before, after = packed(as_text), packed(round_trip)

    assert after < len(COLLECT_SCRIPT.text) < before
    # The usual one: the acknowledgements of a batch, and collecting.
    usual = [round_trip[0], round_trip[2]]
    assert packed(usual) < len(COLLECT_SCRIPT.text) < packed([usual[0], fx.with_text(usual[1])])


def test_the_scripts_load_command(server: Server, tmp_path: Path) -> None:
    path = write_config(tmp_path, f"{server.address}:0", f"{server.address}:3")

    code, out, err = invoke("scripts", "load", "--config", str(path))

    assert (code, err) == (0, ""), err
    count = len(fx.scripts())
    assert out == f"loaded {count} scripts on pool default\nloaded {count} scripts on pool second\n"
    shas = [script.sha for script in fx.scripts()]
    assert server.client().script_exists(*shas) == [True] * count
