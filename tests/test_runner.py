"""The worker runner: the handlers registered with ``@broker.handler``, run by
consumers in threads, on the real servers."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import streambroker as sb
from streambroker.apps.worker import AsyncWorker, Worker, load_app

from .conftest import Server, free_port, seed_registry, wait_for

FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.1, "retry_delay": 0.01}
GROUPS = ("read-group-a", "read-group-ab", "read-group-c")


class Recorder:
    """Handlers for every group, recording the batches they handled."""

    def __init__(self, broker: sb.Broker, counts: dict[str, int] | None = None) -> None:
        self.lock = threading.Lock()
        self.batches: dict[str, list[list[sb.Event]]] = {group: [] for group in GROUPS}
        for group in GROUPS:
            count = (counts or {}).get(group, 10)
            broker.handler(group, count=count, **FAST)(self.handler(group))

    def handler(self, group: str) -> sb.Handler:
        def handle(events: list[sb.Event]) -> None:
            with self.lock:
                self.batches[group].append(events)

        return handle

    def ids(self, group: str) -> list[str]:
        with self.lock:
            return [event.id for batch in self.batches[group] for event in batch]


@pytest.fixture
def broker(config: sb.ValidatedRegistry) -> Iterator[sb.Broker]:
    """A synchronous broker of the seed's registry (the worker runs those)."""
    with config.broker() as broker:
        yield broker


def test_each_handler_runs_with_its_consumers(broker: sb.Broker) -> None:
    recorder = Recorder(broker, counts={"read-group-a": 2})
    a_ids = [broker.publish("stream-a", n) for n in range(5)]

    with Worker(broker, consumers=3, name_prefix="w") as worker:
        b_ids = [broker.publish("stream-b", n) for n in range(4)]
        c_ids = [broker.publish("stream-c", n) for n in range(3)]
        wait_for(lambda: len(recorder.ids("read-group-ab")) == 9, 30, "read-group-ab")
        wait_for(lambda: len(recorder.ids("read-group-a")) == 5, 30, "read-group-a")
        wait_for(lambda: len(recorder.ids("read-group-c")) == 3, 30, "read-group-c")

    assert [(c.group, c.name) for c in worker.consumers] == [
        (group, f"w-{i}") for group in GROUPS for i in (1, 2, 3)
    ]
    assert sorted(recorder.ids("read-group-a")) == a_ids
    assert sorted(recorder.ids("read-group-ab")) == sorted(a_ids + b_ids)
    assert sorted(recorder.ids("read-group-c")) == c_ids
    assert max(len(batch) for batch in recorder.batches["read-group-a"]) <= 2
    assert worker.counts.snapshot() == {"read-group-a": 5, "read-group-ab": 9, "read-group-c": 3}
    # Stopped: nothing pending, every consumer left its group, every event collected.
    for stream in broker.stats():
        assert stream.length == 0
        for group in stream.groups:
            assert (group.lag, group.pending, group.consumers) == (0, 0, ())


def test_a_failing_handler_is_logged_and_its_events_come_back(
    broker: sb.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    deliveries: dict[object, list[int]] = {}
    lock = threading.Lock()

    @broker.handler("read-group-c", count=5, **FAST)
    def fail_once(events: list[sb.Event]) -> None:
        with lock:
            for event in events:
                deliveries.setdefault(event.body, []).append(event.delivery_count)
            if deliveries.get("boom") == [1]:
                raise RuntimeError("boom")

    for body in ("one", "boom", "three"):
        broker.publish("stream-c", body)

    with Worker(broker) as worker:
        wait_for(lambda: worker.counts.snapshot() == {"read-group-c": 3}, 30, "the retry")
        broker.publish("stream-c", "after")
        wait_for(lambda: worker.counts.snapshot() == {"read-group-c": 4}, 30, "the next one")

    # The batch came back whole to the restarted consumer, then the worker went on.
    assert deliveries == {"one": [1, 2], "boom": [1, 2], "three": [1, 2], "after": [1]}
    (record,) = [r for r in caplog.records if r.name == "streambroker.worker" and r.exc_info]
    assert record.levelno == logging.ERROR
    assert "the handler raised RuntimeError" in record.getMessage()
    assert "stay pending and come back" in record.getMessage()
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "boom"
    assert broker.stream_stats("stream-c").length == 0


def test_only_the_groups_asked_for(broker: sb.Broker) -> None:
    recorder = Recorder(broker)
    broker.publish("stream-a", "a")
    broker.publish("stream-c", "c")

    with Worker(broker, groups=["read-group-c"], consumers=2, name_prefix="x") as worker:
        wait_for(lambda: len(recorder.ids("read-group-c")) == 1, 30, "read-group-c")

    assert worker.groups == ["read-group-c"]
    assert [c.name for c in worker.consumers] == ["x-1", "x-2"]
    assert recorder.ids("read-group-a") == recorder.ids("read-group-ab") == []
    a_groups = broker.stream_stats("stream-a").groups
    assert [(g.group, g.lag, g.consumers) for g in a_groups] == [
        ("read-group-a", 1, ()),
        ("read-group-ab", 1, ()),
    ]


def test_run_logs_summaries_until_stopped(
    broker: sb.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streambroker.worker")
    Recorder(broker)
    broker.publish("stream-c", 1)
    broker.publish("stream-c", 2)
    worker = Worker(broker, groups=["read-group-c"], summary_interval=0.01)

    def stop_after_a_summary() -> None:
        wait_for(lambda: worker.counts.snapshot() == {"read-group-c": 2}, 30, "the events")
        wait_for(lambda: "events in the last 0.01 s" in caplog.text, 30, "a summary")
        worker.stop()

    helper = threading.Thread(target=stop_after_a_summary)
    helper.start()
    totals = worker.run(handle_signals=False)
    helper.join()

    assert totals == {"read-group-c": 2}
    messages = [r.getMessage() for r in caplog.records if r.name == "streambroker.worker"]
    assert messages[0].startswith("worker started: 1 consumer per group for read-group-c (")
    summaries = [m for m in messages if re.search(r" events? in the last 0.01 s: read-group-c ", m)]
    assert summaries
    assert sum(int(m.split()[1]) for m in summaries) <= 2
    assert messages[-1] == "worker stopped; handled 2 events: read-group-c 2"


def test_run_stops_gracefully_on_sigterm(broker: sb.Broker) -> None:
    recorder = Recorder(broker)
    broker.publish("stream-a", 1)
    before = signal.getsignal(signal.SIGTERM)
    worker = Worker(broker, consumers=2)

    def terminate_once_handled() -> None:
        wait_for(lambda: len(recorder.ids("read-group-ab")) == 1, 30, "the event")
        os.kill(os.getpid(), signal.SIGTERM)

    helper = threading.Thread(target=terminate_once_handled)
    helper.start()
    totals = worker.run()
    helper.join()

    assert totals == {"read-group-a": 1, "read-group-ab": 1, "read-group-c": 0}
    assert signal.getsignal(signal.SIGTERM) is before
    assert worker.join(timeout=0)
    assert broker.stream_stats("stream-a").length == 0


def _restarts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "starting again" in r.getMessage()]


def test_refused_credentials_stop_the_worker_at_once(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://nobody:s3cr3t-pw@{server.address}"
    config = seed_registry(f"{url}/0", f"{url}/3")
    raised: list[BaseException] = []
    with config.broker() as broker:
        Recorder(broker)
        worker = Worker(broker, consumers=2)

        def run() -> None:
            try:
                worker.run(handle_signals=False)
            except BaseException as exc:
                raised.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "the worker keeps retrying"

    (error,) = raised
    assert isinstance(error, sb.PoolAuthenticationError)
    assert str(error).startswith("redis pool '")
    assert "s3cr3t-pw" not in str(error)
    assert worker.error is error
    with pytest.raises(sb.PoolAuthenticationError):
        worker.join(timeout=0)  # every consumer stopped
    assert _restarts(caplog) == []


def test_refused_credentials_stop_the_async_worker_at_once(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://nobody:wrong@{server.address}"
    config = seed_registry(f"{url}/0", f"{url}/3")

    async def main() -> AsyncWorker:
        async with config.async_broker() as broker:
            for group in GROUPS:

                @broker.handler(group, **FAST)
                async def handle(events: list[sb.Event]) -> None:
                    del events

            worker = AsyncWorker(broker, consumers=2)
            with pytest.raises(sb.PoolAuthenticationError) as caught:
                await asyncio.wait_for(worker.run(handle_signals=False), 30)
            assert worker.error is caught.value
            return worker

    asyncio.run(main())
    assert _restarts(caplog) == []


def test_connection_errors_are_retried_until_the_worker_is_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="streambroker")
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = seed_registry(f"{nowhere}:0", f"{nowhere}:3")

    def retries() -> list[str]:
        return [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]

    with config.broker() as broker:
        Recorder(broker)
        with Worker(broker, groups=["read-group-c"]) as worker:
            # The consumer itself waits for the server, with back-off.
            wait_for(lambda: len(retries()) >= 2, 30, "two attempts")
        assert worker.error is None
        assert worker.join(timeout=0)
    assert "redis pool 'second'" in retries()[0]
    assert _restarts(caplog) == []


def test_bad_settings_are_refused_before_anything_runs() -> None:
    config = seed_registry("127.0.0.1:1:0", "127.0.0.1:1:3")  # never contacted
    with config.broker() as broker:
        with pytest.raises(sb.InvalidArgumentError, match="no handlers are registered"):
            Worker(broker)

        with pytest.raises(sb.InvalidArgumentError, match="count must be an integer >= 1, got 0"):
            broker.handler("read-group-a", count=0)

    with config.broker() as broker:

        @broker.handler("read-group-a")
        def handle(events: list[sb.Event]) -> None:
            del events

        @broker.handler("read-group-c")
        async def handle_async(events: list[sb.Event]) -> None:
            del events

        with pytest.raises(
            sb.InvalidArgumentError, match=r"handle_async\) is a coroutine function"
        ):
            Worker(broker)
        with pytest.raises(
            sb.InvalidArgumentError,
            match=r"no handler is registered for consumer group 'read-group-ab' \(handlers: "
            r"read-group-a, read-group-c\)",
        ):
            Worker(broker, groups=["read-group-a", "read-group-ab"])
        with pytest.raises(sb.InvalidArgumentError, match="consumers must be an integer >= 1"):
            Worker(broker, groups=["read-group-a"], consumers=0)
        with pytest.raises(sb.InvalidArgumentError, match="summary_interval must be a positive"):
            Worker(broker, groups=["read-group-a"], summary_interval=0)
        with pytest.raises(sb.InvalidArgumentError, match="holds ' '"):
            Worker(broker, groups=["read-group-a"], name_prefix="a b")


@pytest.fixture
def app_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Path]:
    """The working directory, for application modules; ``sys.path`` and the modules
    imported from it are restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("sbapp_"):
            del sys.modules[name]


def module(directory: Path, source: str) -> str:
    name = f"sbapp_{uuid.uuid4().hex}"
    (directory / f"{name}.py").write_text(source)
    return name


def test_load_app_imports_from_the_current_directory(app_dir: Path) -> None:
    name = module(
        app_dir,
        "import streambroker as sb\n"
        "registry = sb.Registry()\n"
        "registry.register_redis('127.0.0.1:1:0')\n"
        "registry.register_stream('s', groups=['g'])\n"
        "broker = registry.validate().broker()\n"
        "class services:\n"
        "    broker = broker\n"
        "async_broker = registry.validate().async_broker()\n",
    )

    loaded = load_app(f"{name}:broker")

    assert isinstance(loaded, sb.Broker)
    assert list(loaded.registry.streams) == ["s"]
    assert load_app(f"{name}:services.broker") is loaded
    assert isinstance(load_app(f"{name}:async_broker"), sb.AsyncBroker)
    with pytest.raises(sb.InvalidArgumentError, match=r"has no attribute 'services\.nope'"):
        load_app(f"{name}:services.nope")


def test_load_app_without_the_current_directory(app_dir: Path) -> None:
    name = module(app_dir, "broker = None\n")
    cwd = os.getcwd()
    sys.path[:] = [entry for entry in sys.path if entry not in ("", cwd)]
    with pytest.raises(sb.InvalidArgumentError, match=f"no module named '{name}'"):
        load_app(f"{name}:broker", cwd=False)
    assert cwd not in sys.path  # left alone: a file here cannot shadow an installed module
    with pytest.raises(sb.InvalidArgumentError, match="is a NoneType, not a streambroker"):
        load_app(f"{name}:broker")  # by default the current directory comes first


def test_load_app_chains_the_error_of_the_module(app_dir: Path) -> None:
    failing = module(app_dir, "import json\njson.loads('{')\n")
    missing_dependency = module(app_dir, "import sbapp_missing_dependency\n")
    bad_config = module(
        app_dir, "import streambroker as sb\nsb.Registry.from_yaml('nowhere.yaml')\n"
    )

    with pytest.raises(sb.InvalidArgumentError, match="JSONDecodeError: Expecting") as failed:
        load_app(f"{failing}:broker")
    assert type(failed.value.__cause__).__name__ == "JSONDecodeError"
    # A module the application imports is missing: not the application itself.
    with pytest.raises(
        sb.InvalidArgumentError,
        match=f"importing '{missing_dependency}' failed: No module named 'sbapp_missing_dep",
    ):
        load_app(f"{missing_dependency}:broker")
    # The library's own errors pass through unchanged.
    with pytest.raises(sb.ConfigError, match=r"nowhere\.yaml: config file not found"):
        load_app(f"{bad_config}:broker")


def test_the_async_worker_runs_plain_functions_off_the_event_loop(server: Server) -> None:
    config = seed_registry(f"{server.address}:0", f"{server.address}:3")
    on_the_loop: list[bool] = []

    async def main() -> dict[str, int]:
        async with config.async_broker() as broker:
            await broker.publish("stream-c", "x")

            @broker.handler("read-group-c", **FAST)
            def handle(events: list[sb.Event]) -> None:
                try:
                    asyncio.get_running_loop()
                except RuntimeError:  # no loop runs in this thread
                    on_the_loop.append(False)
                else:
                    on_the_loop.append(True)

            worker = AsyncWorker(broker, groups=["read-group-c"])
            running = asyncio.ensure_future(worker.run(handle_signals=False))
            async with asyncio.timeout(30):
                while not on_the_loop:
                    await asyncio.sleep(0.01)
            await worker.stop()
            return await running

    assert asyncio.run(main()) == {"read-group-c": 1}
    assert on_the_loop == [False]


def test_running_cancels_a_handler_still_busy_after_the_grace_period(server: Server) -> None:
    config = seed_registry(f"{server.address}:0", f"{server.address}:3")
    started = asyncio.Event()

    async def main() -> None:
        async with config.async_broker() as broker:
            await broker.publish("stream-c", "slow")

            @broker.handler("read-group-c", **FAST)
            async def handle(events: list[sb.Event]) -> None:
                started.set()
                await asyncio.sleep(3600)

            async with asyncio.timeout(30), AsyncWorker(broker).running(grace=0.2):
                await started.wait()

    asyncio.run(main())
    # Cancelled in the handler: the event was not acknowledged, so it is delivered again.
    assert server.client(3).xpending("stream-c", "read-group-c")["pending"] == 1


def test_running_raises_what_stopped_the_worker(server: Server) -> None:
    url = f"redis://nobody:wrong@{server.address}"
    config = seed_registry(f"{url}/0", f"{url}/3")

    async def main() -> None:
        async with config.async_broker() as broker:
            broker.handler("read-group-c", **FAST)(_ignore)
            with pytest.raises(sb.PoolAuthenticationError):
                async with asyncio.timeout(30), AsyncWorker(broker).running():
                    await asyncio.sleep(0.5)
            with pytest.raises(sb.InvalidArgumentError, match="grace must be a positive"):
                async with AsyncWorker(broker).running(grace=0):
                    pass

    asyncio.run(main())


async def _ignore(events: list[sb.Event]) -> None:
    del events


def test_readiness_says_which_consumer_does_not_run_and_why(server: Server) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    with seed_registry(f"{nowhere}:0", f"{nowhere}:3").broker() as broker:
        broker.handler("read-group-c", **FAST)(_handle)
        worker = Worker(broker, name_prefix="w")
        assert worker.readiness() == "consumer w-1 of group read-group-c is not running yet"
        worker.start()
        try:
            wait_for(lambda: "Connection refused" in (worker.readiness() or ""), 30)
            assert (worker.readiness() or "").startswith(
                "consumer w-1 of group read-group-c is not running: "
            )
        finally:
            worker.stop()
            assert worker.join(30)
        assert worker.readiness() == "the worker is stopping"
    with seed_registry(f"{server.address}:0", f"{server.address}:3").broker() as broker:
        broker.handler("read-group-c", **FAST)(_handle)
        worker = Worker(broker)
        worker.start()
        try:
            wait_for(lambda: worker.readiness() is None, 30, "the consumer to run")
        finally:
            worker.stop()
            assert worker.join(30)


def _handle(events: list[sb.Event]) -> None:
    del events


def test_the_sync_and_async_workers_log_the_same_lines(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streambroker")
    config = seed_registry(f"{server.address}:0", f"{server.address}:3")

    def lines() -> list[str]:
        found = [record.getMessage() for record in caplog.records]
        caplog.clear()
        shapes = {"worker started", "worker stopped", "handled "}
        return [line for line in found if any(line.startswith(shape) for shape in shapes)]

    with config.broker() as broker:
        broker.publish("stream-c", 1)
        broker.handler("read-group-c", **FAST)(_handle)
        worker = Worker(broker, name_prefix="w", summary_interval=0.05)
        thread = threading.Thread(target=worker.run, kwargs={"handle_signals": False})
        thread.start()
        wait_for(lambda: worker.counts.snapshot()["read-group-c"] == 1, 30)
        worker.stop()
        thread.join(30)
    sync_lines = lines()

    async def main() -> None:
        async with config.async_broker() as broker:
            await broker.publish("stream-c", 2)
            broker.handler("read-group-c", **FAST)(_handle_async)
            worker = AsyncWorker(broker, name_prefix="w", summary_interval=0.05)
            running = asyncio.ensure_future(worker.run(handle_signals=False))
            async with asyncio.timeout(30):
                while worker.counts.snapshot()["read-group-c"] != 1:
                    await asyncio.sleep(0.01)
            await worker.stop()
            await running

    asyncio.run(main())
    async_lines = lines()
    started = "worker started: 1 consumer per group for read-group-c (w-1)"
    stopped = "worker stopped; handled 1 event: read-group-c 1"
    for found in (sync_lines, async_lines):
        assert found[0] == started, found
        assert found[-1] == stopped, found
        assert all(
            re.fullmatch(r"handled \d+ events? in the last 0\.05 s: read-group-c \d+", line)
            for line in found[1:-1]
        ), found


async def _handle_async(events: list[sb.Event]) -> None:
    del events


def test_the_worker_warns_of_groups_holding_its_streams_back(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streambroker")
    config = seed_registry(f"{server.address}:0", f"{server.address}:3")
    with config.broker() as broker:
        broker.publish("stream-a", 1)
        broker.handler("read-group-a", **FAST)(_handle)
        worker = Worker(broker, summary_interval=0.05)
        thread = threading.Thread(target=worker.run, kwargs={"handle_signals": False})
        thread.start()
        try:
            wait_for(
                lambda: any(
                    "consumer group read-group-ab holds back 1 event of stream stream-a"
                    in record.getMessage()
                    for record in caplog.records
                ),
                30,
                "the warning",
            )
        finally:
            worker.stop()
            thread.join(30)
