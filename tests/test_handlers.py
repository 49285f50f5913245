"""Handlers registered with ``@broker.handler``: one per stream of a group, typed bodies,
and the mistakes registration catches. On the real servers, both faces."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import streambroker as sb
from streambroker.apps.worker import AsyncWorker, Worker

from .conftest import Server, seed_registry, wait_for

FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.1, "retry_delay": 0.01}


@dataclass
class Painting:
    title: str
    year: int


def config_of(server: Server) -> sb.ValidatedRegistry:
    return seed_registry(f"{server.address}:0", f"{server.address}:3")


class Seen:
    """What each handler received: (handler, stream, body) in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def record(self, name: str, events: list[sb.Event[Any]]) -> None:
        self.calls.extend((name, event.stream, event.body) for event in events)

    def of(self, name: str) -> list[tuple[str, Any]]:
        return [(stream, body) for handler, stream, body in self.calls if handler == name]


MIXED: list[tuple[str, Any]] = [
    ("stream-a", {"n": 1}),
    ("stream-b", {"title": "Water Lilies", "year": 1906}),
    ("stream-a", {"n": 2}),
    ("stream-b", "not a painting"),
    ("stream-b", {"title": "Olympia", "year": 1863}),
]


def check_routed(seen: Seen, server: Server) -> None:
    assert seen.of("paintings") == [
        ("stream-b", Painting("Water Lilies", 1906)),
        ("stream-b", Painting("Olympia", 1863)),
    ]
    assert seen.of("rest") == [("stream-a", {"n": 1}), ("stream-a", {"n": 2})]


def test_each_stream_goes_to_its_handler_with_its_model(server: Server) -> None:
    seen = Seen()
    with config_of(server).broker() as broker:

        @broker.handler(
            "read-group-ab", stream="stream-b", model=Painting, max_deliveries=2, **FAST
        )
        def paintings(events: list[sb.Event[Painting]]) -> None:
            assert all(isinstance(event.body, Painting) for event in events)
            seen.record("paintings", events)

        @broker.handler("read-group-ab")
        def rest(events: list[sb.Event]) -> None:
            seen.record("rest", events)

        for stream, body in MIXED:
            broker.publish(stream, body)
        worker = Worker(broker, groups=["read-group-ab"])
        worker.start()
        try:
            wait_for(lambda: broker.dead_letters("stream-b", "read-group-ab"), what="a dead letter")
        finally:
            worker.stop()
            assert worker.join(30)
        check_routed(seen, server)
        (letter,) = broker.dead_letters("stream-b", "read-group-ab")
        assert letter.event.body == "not a painting"
        assert "DecodeError" in letter.error
        assert "Painting" in letter.error
        assert letter.deliveries == 2


def test_the_asyncio_worker_routes_the_same(server: Server) -> None:
    seen = Seen()

    async def main() -> None:
        async with config_of(server).async_broker() as broker:

            @broker.handler(
                "read-group-ab", stream="stream-b", model=Painting, max_deliveries=2, **FAST
            )
            async def paintings(events: list[sb.Event[Painting]]) -> None:
                seen.record("paintings", events)

            @broker.handler("read-group-ab", stream="stream-a")
            async def rest(events: list[sb.Event]) -> None:
                seen.record("rest", events)

            for stream, body in MIXED:
                await broker.publish(stream, body)
            async with asyncio.timeout(30), AsyncWorker(broker, groups=["read-group-ab"]).running():
                while not await broker.dead_letters("stream-b", "read-group-ab"):
                    await asyncio.sleep(0.02)

    asyncio.run(main())
    check_routed(seen, server)


# --- mistakes caught at registration --------------------------------------------------


@pytest.fixture
def broker() -> Any:
    config = seed_registry("127.0.0.1:1:0", "127.0.0.1:1:3")  # never contacted
    with config.broker() as broker:
        yield broker


def handle(events: list[sb.Event]) -> None:
    del events


async def handle_async(events: list[sb.Event]) -> None:
    del events


@pytest.mark.parametrize(
    ("register", "message"),
    [
        (lambda b: b.handler(handle), r"must be a name, got <function handle.*write @broker"),
        (lambda b: b.handler("nobody"), r"group 'nobody': it is not registered \(groups: "),
        (lambda b: b.handler("read-group-a", count=0), "count must be an integer >= 1, got 0"),
        (lambda b: b.handler("read-group-a", countt=5), "unknown options countt"),
        (lambda b: b.handler("read-group-a")(42), "'read-group-a' must be callable, got 42"),
        (lambda b: b.handler("read-group-a", stream="stream-b"), "does not read stream"),
        (lambda b: b.handler("read-group-a", stream="nope"), "nope"),
        (lambda b: b.handler("read-group-a", model=Painting(".", 1)), "model must be a type"),
    ],
    ids=[
        "no-parentheses",
        "unknown-group",
        "count",
        "unknown-option",
        "not-callable",
        "stream-of-another-group",
        "unknown-stream",
        "model-not-a-type",
    ],
)
def test_registration_refuses_mistakes(broker: sb.Broker, register: Any, message: str) -> None:
    with pytest.raises(sb.BrokerError, match=message):
        register(broker)


def test_handlers_of_one_group_must_agree(broker: sb.Broker) -> None:
    broker.handler("read-group-ab", stream="stream-a", count=50, retry_after=5)(handle)
    with pytest.raises(sb.InvalidArgumentError, match="already has a handler"):
        broker.handler("read-group-ab", stream="stream-a")(handle)
    with pytest.raises(sb.InvalidArgumentError, match="count=20 differs from count=50"):
        broker.handler("read-group-ab", stream="stream-b", count=20)(handle)
    with pytest.raises(sb.InvalidArgumentError, match="retry_after differ"):
        broker.handler("read-group-ab", stream="stream-b", retry_after=9)(handle)
    with pytest.raises(sb.InvalidArgumentError, match="all coroutine functions or all plain"):
        broker.handler("read-group-ab", stream="stream-b")(handle_async)
    # Only stream-a is covered: the worker refuses to start, naming the missing stream.
    with pytest.raises(sb.InvalidArgumentError, match="none for 'stream-b'"):
        Worker(broker)
    broker.handler("read-group-ab", stream="stream-b", count=50)(handle)
    (spec,) = broker.handlers
    assert (spec.group, spec.count, dict(spec.options)) == ("read-group-ab", 50, {"retry_after": 5})


def test_a_lone_handler_is_called_as_it_is(broker: sb.Broker) -> None:
    broker.handler("read-group-a")(handle)
    (spec,) = broker.handlers
    assert spec.function is handle
    assert spec.count == 10


def test_wrong_arguments_are_the_librarys_errors(server: Server) -> None:
    config = config_of(server)
    with pytest.raises(sb.InvalidArgumentError, match=r"unknown broker options bogus \(expected"):
        sb.Broker(config, bogus=1)  # type: ignore[call-arg]
    with pytest.raises(sb.InvalidArgumentError, match=r"unknown broker options bogus"):
        sb.AsyncBroker(config, bogus=1)  # type: ignore[call-arg]
    with (
        config.broker() as broker,
        pytest.raises(sb.InvalidArgumentError, match="callable, got 42"),
    ):
        broker.consumer("read-group-a").consume(42)  # type: ignore[arg-type]

    async def main() -> None:
        async with config.async_broker() as broker:
            with pytest.raises(sb.InvalidArgumentError, match="callable, got 42"):
                await broker.consumer("read-group-a").consume(42)  # type: ignore[arg-type]

    asyncio.run(main())


def test_type_checkers_see_the_body_of_a_typed_event(tmp_path: Path) -> None:
    source = tmp_path / "typed.py"
    source.write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from typing import assert_type
            import streambroker as sb

            @dataclass
            class Painting:
                title: str

            def handle(events: list[sb.Event[Painting]]) -> None:
                for event in events:
                    assert_type(event.body, Painting)
                    assert_type(event.body.title, str)

            def plain(events: list[sb.Event]) -> None:
                for event in events:
                    event.body.anything  # Any: unchecked
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
