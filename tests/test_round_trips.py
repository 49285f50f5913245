"""One round trip of many commands, as both I/O layers send it, on the real servers.

Whatever mix of commands and error replies a round trip holds, its replies come back
one for one, in order, as the same commands sent one at a time would answer them, and
the connection stays in step for the next round trip.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.exceptions as rex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streambroker as sb
from streambroker.core.effects import Command, Op, ReplyError, Send
from streambroker.io.aio import AsyncDriver
from streambroker.io.connection import ConnectionOptions
from streambroker.io.sync import SyncDriver

from .conftest import Server

#: The driver's database; the model runs the same commands one at a time in the next one.
DB = 4
KEYS = st.sampled_from(["k1", "k2", "k3"])
VALUES = st.sampled_from(["1", "x", "41", b"\x00\xff"]) | st.integers(-5, 5)
#: Commands with fixed replies, some of which fail depending on what the others did
#: (INCR of "x", RPUSH onto a string, GET of a list, ...).
COMMANDS = st.one_of(
    st.tuples(st.just("SET"), KEYS, VALUES),
    st.tuples(st.just("GET"), KEYS),
    st.tuples(st.just("INCR"), KEYS),
    st.tuples(st.just("RPUSH"), KEYS, VALUES),
    st.tuples(st.just("LRANGE"), KEYS, st.just(0), st.just(-1)),
    st.tuples(st.just("HSET"), KEYS, st.just("f"), VALUES),
    st.tuples(st.just("DEL"), KEYS),
)
ROUND_TRIP = st.lists(COMMANDS, min_size=1, max_size=30)
CHECK: list[Command] = [("DUMP", key) for key in ("k1", "k2", "k3")]  # never an error

FIXTURE_SETTINGS = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40, deadline=None
)


@pytest.fixture(params=("sync", "async"))
def face(request: pytest.FixtureRequest) -> str:
    """Each I/O layer in turn."""
    return str(request.param)


def _registry(server: Server) -> sb.ValidatedRegistry:
    registry = sb.Registry()
    registry.register_redis(f"{server.address}:{DB}")
    registry.register_stream("s", "default", ["g"])
    return registry.validate()


def _sends(sends: list[Send]) -> Op[list[list[Any]]]:
    results = []
    for send in sends:
        results.append((yield send))
    return results


def _run(face: str, server: Server, sends: list[Send]) -> list[list[Any]] | sb.BrokerError:
    """Perform ``sends`` one after the other on one driver of ``face``; the first error
    ends the run and is returned, after one more round trip (``CHECK``) was attempted."""
    config = _registry(server)
    options = ConnectionOptions()
    if face == "sync":
        driver = SyncDriver(config, options)
        try:
            return driver.run(_sends(sends))
        except sb.BrokerError as exc:
            exc.add_note(repr(driver.run(_sends([Send("default", CHECK)]))))
            return exc
        finally:
            driver.close()

    async def run_async() -> list[list[Any]] | sb.BrokerError:
        driver = AsyncDriver(config, options)
        try:
            return await driver.run(_sends(sends))
        except sb.BrokerError as exc:
            exc.add_note(repr(await driver.run(_sends([Send("default", CHECK)]))))
            return exc
        finally:
            await driver.close()

    return asyncio.run(run_async())


def _one_at_a_time(server: Server, commands: list[Command]) -> list[Any]:
    """What the commands answer sent one by one (error replies as :class:`ReplyError`)."""
    client = redis.Redis(host="127.0.0.1", port=server.port, db=DB + 1, protocol=2)
    client.response_callbacks.clear()
    replies: list[Any] = []
    try:
        for command in commands:
            try:
                replies.append(client.execute_command(*command))
            except rex.ResponseError as exc:
                replies.append(ReplyError(str(exc)))
    finally:
        client.close()
    return replies


@FIXTURE_SETTINGS
@given(commands=ROUND_TRIP)
def test_error_replies_come_back_in_place(
    server: Server, face: str, commands: list[Command]
) -> None:
    server.flush()
    expected = _one_at_a_time(server, [*commands, *CHECK])

    result = _run(
        face, server, [Send("default", commands, allow_errors=True), Send("default", CHECK)]
    )

    assert result == [expected[: len(commands)], expected[len(commands) :]]


@FIXTURE_SETTINGS
@given(commands=ROUND_TRIP)
def test_the_first_error_reply_raises_naming_its_command(
    server: Server, face: str, commands: list[Command]
) -> None:
    server.flush()
    expected = _one_at_a_time(server, [*commands, *CHECK])

    result = _run(face, server, [Send("default", commands), Send("default", CHECK)])

    errors = [(i, r) for i, r in enumerate(expected[: len(commands)]) if isinstance(r, ReplyError)]
    if not errors:
        assert result == [expected[: len(commands)], expected[len(commands) :]]
        return
    index, first = errors[0]
    assert isinstance(result, sb.ServerReplyError)
    name, key = commands[index][:2]
    assert str(result) == f"redis pool 'default': {name} {key}: {first.message}"
    # Every command ran, and the next round trip got its own replies.
    assert result.__notes__ == [repr([expected[len(commands) :]])]
