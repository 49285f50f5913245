"""The pytest plugin users get with the package: run as a user's own test suite would."""

from __future__ import annotations

import asyncio

import pytest

import streambroker as sb
from streambroker.testing import DrainTimeoutError, async_wait_drained, wait_drained

USER_TESTS = """
import streambroker as sb
from streambroker.testing import wait_drained

SEEN = []

def registry(address):
    registry = sb.Registry()
    registry.register_redis(address)
    registry.register_stream("orders", "default", ["billing"])
    return registry.validate()

def test_handler_bills_every_order(streambroker_server):
    with sb.Broker(registry(streambroker_server)) as broker:
        for total in range(5):
            broker.publish("orders", {"total": total})
        consumer = broker.consumer("billing", "test")
        consumer.consume(lambda events: SEEN.extend(e.body["total"] for e in events),
                         block=False)
        wait_drained(broker, "billing")
    assert sorted(SEEN) == [0, 1, 2, 3, 4]

def test_each_test_gets_a_fresh_server(streambroker_server):
    with sb.Broker(registry(streambroker_server)) as broker:
        assert broker.stream_stats("orders").length == 0
"""


def test_a_users_suite_gets_the_fixture_from_the_installed_plugin(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_orders=USER_TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_the_server_is_stopped_after_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_stop="""
import pathlib, streambroker as sb
ADDRESSES = []
def test_one(streambroker_server):
    ADDRESSES.append(streambroker_server)
    assert sb.EmbeddedServer(streambroker_server.split(":", 1)[1]).is_running()
def test_after():
    directory = ADDRESSES[0].split(":", 1)[1]
    assert not pathlib.Path(directory).exists()
"""
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def _registry(address: str) -> sb.ValidatedRegistry:
    registry = sb.Registry()
    registry.register_redis(address)
    registry.register_stream("orders", "default", ["billing", "audit"])
    return registry.validate()


def test_wait_drained_names_what_is_left(streambroker_server: str) -> None:
    with sb.Broker(_registry(streambroker_server)) as broker:
        broker.publish("orders", 1)
        broker.consumer("billing", "c").consume(lambda events: None, block=False)
        broker.publish("orders", 2)
        with pytest.raises(DrainTimeoutError) as raised:
            wait_drained(broker, "billing", timeout=0.2)
        assert "'billing' of stream 'orders' still has 1 unread" in str(raised.value)
        broker.consumer("billing", "c").consume(lambda events: None, block=False)
        wait_drained(broker, "billing")
        with pytest.raises(sb.InvalidArgumentError, match="'nobody' is not registered"):
            wait_drained(broker, "nobody")


def test_async_wait_drained(streambroker_server: str) -> None:
    async def scenario() -> None:
        async with sb.AsyncBroker(_registry(streambroker_server)) as broker:
            await broker.publish("orders", 1)
            with pytest.raises(DrainTimeoutError, match="1 unread"):
                await async_wait_drained(broker, "audit", timeout=0.2)
            await broker.consumer("audit", "c").consume(_ignore, block=False)
            await async_wait_drained(broker, "audit")

    asyncio.run(scenario())


async def _ignore(events: list[sb.Event]) -> None:
    return None
