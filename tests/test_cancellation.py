"""Cancelling a consuming task (asyncio) is a graceful stop, wherever it lands.

The sweeps cancel the consuming task at its k-th suspension, for k = 0, 1, 2, ...:
each await point of a consume cycle in turn (starting, group creation, the lease,
reads, the handler, heartbeats, acknowledgements, collection, blocking waits), both
while the task waits there and as it wakes from there (the cancellation racing the
result). Each cancellation must end the task, cancelled, within the batch in hand;
release the name; lose nothing; and leave no connection behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import types
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

import pytest

import streambroker as sb
from streambroker.apps.worker import AsyncWorker
from streambroker.wire.keys import lease_key

from .conftest import Server

#: Small batches and short waits, so that a sweep of a few dozen points covers whole
#: consume cycles; a long lease, so that a name left taken stays taken while we look.
COUNT = 2
QUICK: sb.ConsumerSettings = {"retry_after": 0.5, "lease": 30.0, "block_timeout": 0.01}
#: A heartbeat every 0.1 s: the beat handler below waits for one.
BEATING: sb.ConsumerSettings = {"retry_after": 0.3, "lease": 30.0, "block_timeout": 0.01}
#: Points after the last event was handled that the blocking sweeps also cancel at: the
#: acknowledgements, then blocking reads, each of which waits out the server's timer
#: (about 0.1 s) before the next one, so only a few.
BLOCKING_EXTRA = 6
#: How long a cancelled task may take to end (generous: nothing waits this long).
DEADLINE = 10.0
GROUP, NAME = "read-group-c", "cancelled"
LEASE = lease_key("", GROUP, NAME)


def ours(server: Server) -> int:
    """Connections the brokers hold open on the server."""
    return sum(1 for c in server.client().client_list() if c.get("name") == "streambroker")


async def until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE} s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Cancel:
    """Where the consuming task is cancelled: at its ``at``-th suspension (0: before it
    runs), while it waits there or, with ``on_wake``, as that wait ends; or, given
    ``appeared``, as the first wait ends during which ``appeared()`` became true."""

    at: int
    on_wake: bool
    appeared: Callable[[], object] | None = None
    suspensions: int = 0
    requested: bool = False
    name_taken: bool = False

    def __str__(self) -> str:
        return f"cancel at suspension {self.at} ({'as it wakes' if self.on_wake else 'waiting'})"

    def now(self, task: asyncio.Task[Any]) -> None:
        if not self.requested:
            self.requested = True
            task.cancel()

    def suspended(self, task: asyncio.Task[Any], waiting: object) -> None:
        """``task`` waits for ``waiting``: cancel it now, or as that wait ends, if due."""
        self.suspensions += 1
        future = waiting if isinstance(waiting, asyncio.Future) else None
        if self.appeared is not None:
            if future is not None and not self.appeared():
                future.add_done_callback(lambda _: self.appeared() and self.now(task))
        elif self.suspensions == self.at:
            if self.on_wake and future is not None:
                # Runs before the task's own wake-up: the cancellation races the result.
                future.add_done_callback(lambda _: self.now(task))
            else:
                self.now(task)


@types.coroutine
def _cancelling(coroutine: Coroutine[Any, Any, Any], cancel: Cancel) -> Generator[Any, Any, Any]:
    """Run ``coroutine`` as ``await`` would, counting its suspensions, and cancel the task
    at the chosen one."""
    task = asyncio.current_task()
    assert task is not None
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            waiting = coroutine.send(value) if error is None else coroutine.throw(error)
        except StopIteration as stop:
            return stop.value
        cancel.suspended(task, waiting)
        try:
            value, error = (yield waiting), None
        except BaseException as exc:
            value, error = None, exc


def start(coroutine: Coroutine[Any, Any, Any], cancel: Cancel) -> asyncio.Task[Any]:
    if cancel.at == 0:
        task = asyncio.create_task(coroutine)
        cancel.now(task)
        return task

    async def run() -> Any:
        return await _cancelling(coroutine, cancel)

    return asyncio.create_task(run())


@dataclass
class Record:
    """What the handlers handled, and what they finished handling after the cancel."""

    cancel: Cancel
    handled: Counter[str] = field(default_factory=Counter)
    late: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, events: list[sb.Event]) -> None:
        with self.lock:
            self.handled.update(event.id for event in events)
            if self.cancel.requested:
                self.late.extend(event.id for event in events)


#: The commands that run scripts (by text, or by SHA1 once the server has them).
EVALS = ("eval", "evalsha")


def beat_waiter(server: Server, cancel: Cancel) -> Callable[[], None]:
    """Waits until the consumer's heartbeat ran (its lease renewal and touch are the
    only scripts run meanwhile), or the task was cancelled."""
    client = server.client()

    def evals() -> int:
        stats = client.info("commandstats")
        calls: int = sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in EVALS)
        return calls

    def wait() -> None:
        first = evals()
        deadline = time.monotonic() + DEADLINE
        while evals() < first + 2 and not cancel.requested:
            assert time.monotonic() < deadline, "no heartbeat while the handler ran"
            time.sleep(0.005)

    return wait


def handler_of(kind: str, record: Record, wait: Callable[[], None] | None) -> sb.AsyncHandler:
    """An ``async def`` handler ("coroutine") or a plain function ("thread")."""
    if kind == "coroutine":

        async def handle(events: list[sb.Event]) -> None:
            if wait is None:
                await asyncio.sleep(0)
            else:
                await asyncio.to_thread(wait)
            record.add(events)

        return handle

    def handle_in_thread(events: list[sb.Event]) -> None:
        if wait is not None:
            wait()
        record.add(events)

    return handle_in_thread


async def publish(config: sb.ValidatedRegistry, events: int) -> None:
    async with config.async_broker() as broker, broker.batch() as batch:
        for n in range(events):
            batch.publish("stream-c", n)


async def cancelled_run(
    config: sb.ValidatedRegistry,
    server: Server,
    cancel: Cancel,
    *,
    kind: str,
    block: bool,
    events: int,
    settings: sb.ConsumerSettings,
    beats: bool = False,
) -> str:
    """Consume ``events`` fresh events and cancel as ``cancel`` says, then check the
    outcome: "ended" (the task ended by itself before the cancel point), "drained" (it
    was cancelled after it handled every event) or "cancelled"."""
    record = Record(cancel)
    wait = beat_waiter(server, cancel) if beats else None
    await publish(config, events)
    # A broker of its own: the sweep also cancels while it makes its client.
    async with config.async_broker() as broker:
        consumer = broker.consumer(GROUP, NAME, **settings)
        handler = handler_of(kind, record, wait)
        task = start(consumer.consume(handler, COUNT, block=block, handle_signals=False), cancel)
        done, _ = await asyncio.wait({task}, timeout=DEADLINE)
        if not done:
            await consumer.stop()
            await asyncio.wait({task}, timeout=DEADLINE)
            pytest.fail(f"{cancel}: the task went on consuming")
        if not cancel.requested:
            assert not block
            assert task.result() == events
            return "ended"
        outcome = "cancelled" if task.cancelled() else repr(task.exception() or task.result())
        assert outcome == "cancelled", f"{cancel}: the task ended {outcome}"
        assert len(record.late) <= COUNT, f"{cancel}: handled {record.late} after the cancel"
        if server.client(3).delete(LEASE):  # freed for what follows; the sweep fails later
            cancel.name_taken = True
    drained = len(record.handled) == events and not record.late
    await until(lambda: ours(server) == 0, f"the connections to close ({cancel})")

    # A fresh consumer of the same name takes over: nothing was lost.
    async with config.async_broker() as broker:
        rest = Record(Cancel(-1, False))
        await broker.consumer(GROUP, NAME, **settings).consume(
            handler_of(kind, rest, None), COUNT, block=False, handle_signals=False
        )
    published = [entry for entry, _ in server.client(3).xrange("stream-c")]
    assert published == [], f"{cancel}: not collected: {published}"
    handled = record.handled + rest.handled
    assert len(handled) == events, f"{cancel}: lost {events - len(handled)} events"
    return "drained" if drained else "cancelled"


def sweep(run: Callable[[Cancel], Coroutine[Any, Any, str]], after_drain: int | None) -> None:
    """Run ``run`` at every cancel point in turn until the task ends before it, or (a
    blocking consumer) for ``after_drain`` points after every event was handled."""

    taken: list[str] = []

    async def main() -> None:
        at = drained = 0
        while after_drain is None or drained < after_drain:
            cancels = [Cancel(at, on_wake) for on_wake in (False, True)]
            outcomes = {await run(cancel) for cancel in cancels}
            taken.extend(str(cancel) for cancel in cancels if cancel.name_taken)
            if "ended" in outcomes:
                assert at > 5, f"the consume cycle ended after {at} suspensions"
                return
            drained += outcomes == {"drained"}
            at += 1

    asyncio.run(main())
    if taken:
        raise NameStillTakenError(f"the name stayed taken after: {'; '.join(taken)}")


async def cancel_after(task: asyncio.Task[Any], turns: int) -> None:
    """Cancel ``task`` after ``turns`` loop turns; it must end, cancelled, in time."""
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=DEADLINE)
    assert done
    assert task.cancelled(), f"the task ended {task.exception() or task.result()!r}"


class NameStillTakenError(AssertionError):
    """The lease of a cancelled consumer outlived it."""


SWEEPS = {
    # name: (block, events, settings, beats, turns past the last handled event)
    "one-shot": (False, 5, QUICK, False, None),
    "blocking": (True, 5, QUICK, False, BLOCKING_EXTRA),
    "heartbeats": (False, COUNT, BEATING, True, None),
}


@pytest.mark.parametrize("kind", ["coroutine", "thread"])
@pytest.mark.parametrize("sweep_name", list(SWEEPS))
def test_cancelled_anywhere(
    config: sb.ValidatedRegistry, server: Server, kind: str, sweep_name: str
) -> None:
    """One-shot, blocking, and with heartbeats beating while the handler runs."""
    block, events, settings, beats, extra = SWEEPS[sweep_name]
    sweep(
        lambda cancel: cancelled_run(
            config,
            server,
            cancel,
            kind=kind,
            block=block,
            events=events,
            settings=settings,
            beats=beats,
        ),
        extra,
    )


def test_a_cancel_as_the_lease_is_taken_frees_it(
    config: sb.ValidatedRegistry, server: Server
) -> None:
    def taken() -> bool:
        return bool(server.client(3).exists(LEASE))

    async def attempt() -> bool:
        """Cancel as a wait of the consumer ends during which its lease was taken: the
        reply to taking it is in, and the cancellation races it."""
        cancel = Cancel(-1, True, appeared=taken)
        async with config.async_broker() as broker:
            consumer = broker.consumer(GROUP, NAME, **QUICK)
            handler = handler_of("coroutine", Record(cancel), None)
            task = start(consumer.consume(handler, COUNT, handle_signals=False), cancel)
            await until(lambda: cancel.requested or taken(), "the consumer to start")
            if not cancel.requested:  # the reply came before the consumer waited for it
                await consumer.stop()
            await asyncio.wait({task}, timeout=DEADLINE)
            assert task.done()
        if not cancel.requested:
            return False
        assert task.cancelled()
        if server.client(3).delete(LEASE):
            raise NameStillTakenError("a cancellation as the lease was taken kept it")
        return True

    async def main() -> None:
        for _ in range(20):
            if await attempt():
                return
        pytest.fail("no cancellation landed as the lease was taken")

    asyncio.run(main())


def test_a_consumer_in_a_task_group_ends_when_a_sibling_fails(
    config: sb.ValidatedRegistry, server: Server
) -> None:
    class SiblingError(Exception):
        pass

    async def main() -> None:
        async with config.async_broker() as broker:
            await broker.publish("stream-c", "first")
            consumer = broker.consumer(GROUP, NAME, **QUICK)
            handled = asyncio.Event()

            async def handler(events: list[sb.Event]) -> None:
                handled.set()

            async def sibling() -> None:
                await handled.wait()
                raise SiblingError

            async def group() -> None:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(consumer.consume(handler, handle_signals=False))
                    tasks.create_task(sibling())

            running = asyncio.create_task(group())
            done, _ = await asyncio.wait({running}, timeout=DEADLINE)
            if not done:
                await consumer.stop()
                await asyncio.wait({running}, timeout=DEADLINE)
                pytest.fail("the task group hung: the consumer went on after its cancellation")
            with pytest.raises(ExceptionGroup) as raised:
                running.result()
            assert raised.group_contains(SiblingError)
            assert not raised.group_contains(asyncio.CancelledError)
            assert not server.client(3).exists(LEASE)
            assert server.client(3).xpending("stream-c", GROUP)["pending"] == 0
        await until(lambda: ours(server) == 0, "the connections to close")

    asyncio.run(main())


def test_a_lifespan_shutdown_cancels_its_consumer(
    config: sb.ValidatedRegistry, server: Server
) -> None:
    handled: list[object] = []
    first = asyncio.Event()

    async def count(events: list[sb.Event]) -> None:
        handled.extend(event.body for event in events)
        first.set()

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[sb.AsyncBroker]:
        # As a web framework's lifespan does: consumers run as tasks, cancelled on shutdown.
        async with config.async_broker() as broker:
            consumer = broker.consumer(GROUP, NAME, **QUICK)
            task = asyncio.create_task(consumer.consume(count, handle_signals=False))
            yield broker
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=DEADLINE)
            if not done:
                await consumer.stop()
                await asyncio.wait({task}, timeout=DEADLINE)
                pytest.fail("the shutdown hung: the consumer went on after its cancellation")
            assert task.cancelled()

    async def main() -> None:
        async with lifespan() as broker:
            await broker.publish("stream-c", "view")
            await first.wait()
        assert handled == ["view"]
        assert not server.client(3).exists(LEASE)
        assert server.client(3).xpending("stream-c", GROUP)["pending"] == 0
        await until(lambda: ours(server) == 0, "the connections to close")

    asyncio.run(main())


@pytest.mark.parametrize("turns", range(4))
def test_a_cancel_racing_stop_in_a_retry_wait(
    config: sb.ValidatedRegistry, server: Server, turns: int
) -> None:
    waiting = asyncio.Event()

    class Retrying(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "trying again" in record.getMessage():
                waiting.set()

    async def main() -> None:
        async with config.async_broker() as broker:
            consumer = broker.consumer(GROUP, NAME, **QUICK)

            async def handler(events: list[sb.Event]) -> None:
                pass

            task = asyncio.create_task(consumer.consume(handler, handle_signals=False))
            await until(lambda: server.client(3).exists(LEASE), "the consumer to start")
            # The group vanishes: the consumer waits before it recreates it.
            server.client(3).xgroup_destroy("stream-c", GROUP)
            await asyncio.wait_for(waiting.wait(), DEADLINE)
            await consumer.stop()
            await cancel_after(task, turns)
            assert not server.client(3).exists(LEASE)

    logger = logging.getLogger("streambroker.consumer")
    retrying = Retrying()
    logger.addHandler(retrying)
    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(retrying)


@pytest.mark.parametrize("outcome", ["handled", "failed", "raised"])
def test_stop_and_cancel_while_a_thread_handler_runs(
    config: sb.ValidatedRegistry, server: Server, outcome: str
) -> None:
    release = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def handler(events: list[sb.Event]) -> None:
            loop.call_soon_threadsafe(started.set)
            assert release.wait(DEADLINE)
            if outcome == "raised":
                raise ValueError("the handler failed")
            for event in events:
                if outcome == "failed":
                    event.fail("not now")

        await publish(config, 1)
        async with config.async_broker() as broker:
            consumer = broker.consumer(GROUP, NAME, **QUICK)
            task = asyncio.create_task(consumer.consume(handler, handle_signals=False))
            await asyncio.wait_for(started.wait(), DEADLINE)
            # A shutdown that stops and cancels: the thread goes on, and is waited for.
            await consumer.stop()
            task.cancel()
            await asyncio.sleep(0.05)
            assert not task.done()
            release.set()
            done, _ = await asyncio.wait({task}, timeout=DEADLINE)
            assert done
            # The cancellation prevails, even over the handler's error.
            assert task.cancelled()
            # The batch was finished: acknowledged, or left pending when it failed.
            pending = server.client(3).xpending("stream-c", GROUP)["pending"]
            assert pending == (0 if outcome == "handled" else 1)
            assert not server.client(3).exists(LEASE)

    try:
        asyncio.run(main())
    finally:
        release.set()


@pytest.mark.parametrize("turns", range(3))
def test_a_worker_cancelled_as_it_stops_ends_cancelled(
    config: sb.ValidatedRegistry, server: Server, turns: int
) -> None:
    async def main() -> None:
        async with config.async_broker() as broker:

            @broker.handler(GROUP, **QUICK)
            async def handle(events: list[sb.Event]) -> None:
                pass

            worker = AsyncWorker(broker, groups=[GROUP])
            task = asyncio.create_task(worker.run(handle_signals=False))
            await until(lambda: server.client(3).keys("{sb:lease:*"), "the consumer to start")
            await worker.stop()
            await cancel_after(task, turns)
            assert not server.client(3).keys("{sb:lease:*")

    asyncio.run(main())
