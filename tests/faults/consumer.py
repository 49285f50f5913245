"""A consumer process of the fault suite: ``python -m tests.faults.consumer '<json settings>'``.

Settings: ``address`` (host:port), ``group``, ``name``, ``mode``, ``face`` (``sync`` or
``async``), ``count``, ``options`` (consumer options), ``logs`` (the checker's
directory) and ``slow`` (seconds a batch takes in mode ``slow``).

Its handler logs every event it is given (see :mod:`tests.faults.checker`) before it
returns, then, by ``mode``:

- ``record``: returns (every event is acknowledged);
- ``slow``: the same, after sleeping ``slow`` seconds;
- ``poison-fail``: calls ``event.fail(PoisonError(...))`` on the poison events (their token
  ends with ``-poison``);
- ``poison-raise``: raises ``PoisonError`` when the batch holds a poison event, acknowledging
  nothing; ``consume()`` is started again, as ``streambroker worker`` does;
- ``poison-kill``: SIGKILLs its own process when the batch holds a poison event (the
  suite starts it again).

In every mode, an entry that is not an event of the suite (its body or meta cannot be
decoded, or it has no token) is failed with the error reading it gave. A
``consume()`` that raises anything else is logged as a crash and started again after
0.1 s, as is one that finds the name still held by a killed predecessor (after
0.05 s, not logged). SIGTERM stops the consumer gracefully; the process then exits 0.
Once it handles SIGTERM so, it creates the file ``ready`` names (until then, still
starting, it would die of the signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import streambroker as sb

from .checker import ACK, FAIL, KILL, RAISE, JsonLog
from .streams import registry

#: Pause before consume() starts again after the handler raised, or after a crash.
RESTART_PAUSE = 0.05
CRASH_PAUSE = 0.1


class PoisonError(Exception):
    """What the handler raises, or fails an event with, for a poison event."""


def is_poison(token: str | None) -> bool:
    return token is not None and token.endswith("-poison")


def judge(event: sb.Event) -> tuple[str | None, BaseException | None]:
    """The event's token, or None and the error that makes it no event of the suite."""
    try:
        event.meta  # noqa: B018 - reading it is the test: it may not decode
        body = event.body
    except sb.DecodeError as exc:
        return None, exc
    token = body.get("t") if isinstance(body, dict) else None
    if not isinstance(token, str):
        return None, ValueError(f"not an event of the suite: {str(body)[:40]!r}")
    return token, None


class Handling:
    """The handler's logic, shared by both faces: log the batch, then say what to do."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.group = settings["group"]
        self.name = settings["name"]
        self.mode = settings["mode"]
        self.pid = os.getpid()
        logs = Path(settings["logs"])
        self.log = JsonLog(logs / f"handled-{self.name}-{self.pid}.jsonl")
        # Apart, so that a consumer failing over and over does not look like progress.
        self.crashes = JsonLog(logs / f"crashed-{self.name}-{self.pid}.jsonl")

    def settle(self, events: list[sb.Event]) -> str:
        """Log every event of the batch, fail those to fail; returns the batch's outcome
        (``ack``, ``raise`` or ``kill``)."""
        judged = [(event, *judge(event)) for event in events]
        poisoned = [token for _, token, _ in judged if is_poison(token)]
        batch = ACK
        if poisoned and self.mode == "poison-raise":
            batch = RAISE
        elif poisoned and self.mode == "poison-kill":
            batch = KILL
        records = []
        for event, token, error in judged:
            outcome = batch
            if batch == ACK:
                if error is None and is_poison(token) and self.mode == "poison-fail":
                    error = PoisonError(f"poison {token}")
                if error is not None:
                    event.fail(error)
                    outcome = FAIL
            records.append(
                {
                    "kind": "handle",
                    "group": self.group,
                    "stream": event.stream,
                    "id": event.id,
                    "token": token,
                    "delivery": event.delivery_count,
                    "outcome": outcome,
                    "batch": len(events),
                    "consumer": self.name,
                    "pid": self.pid,
                    "error": None if error is None else f"{type(error).__name__}: {error}",
                }
            )
        self.log.write(*records)
        if batch == KILL:
            os.kill(self.pid, signal.SIGKILL)
        if batch == RAISE:
            raise PoisonError(f"poison {poisoned[0]}")
        return batch

    def crash(self, exc: BaseException) -> None:
        """Log that ``consume()`` raised ``exc``, and where in the library."""
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        frames = [
            f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
            for frame in traceback.extract_tb(exc.__traceback__)
            if f"{os.sep}streambroker{os.sep}" in frame.filename
        ]
        where = f" (raised from {' < '.join(reversed(frames[-3:]))})" if frames else ""
        self.crashes.write(
            {"kind": "crash", "consumer": self.name, "pid": self.pid, "error": text + where}
        )


def run_sync(settings: dict[str, Any], handling: Handling) -> None:
    slow = float(settings.get("slow", 0))
    stopping = threading.Event()

    def handle(events: list[sb.Event]) -> None:
        if slow:
            time.sleep(slow)
        handling.settle(events)

    with registry(settings["address"]).broker() as broker:
        consumer = broker.consumer(settings["group"], settings["name"], **settings["options"])

        def on_term(signum: int, frame: object) -> None:
            stopping.set()
            # Not stop() itself: the signal may interrupt the thread inside the lock
            # of the consumer's wake-up event.
            threading.Thread(target=consumer.stop).start()

        signal.signal(signal.SIGTERM, on_term)
        Path(settings["ready"]).touch()
        while not stopping.is_set():
            try:
                consumer.consume(handle, count=settings["count"], handle_signals=False)
            except PoisonError:
                stopping.wait(RESTART_PAUSE)
            except sb.ConsumerBusyError as exc:
                if isinstance(exc, sb.LeaseLostError):
                    handling.crash(exc)
                stopping.wait(RESTART_PAUSE)
            except Exception as exc:
                handling.crash(exc)
                stopping.wait(CRASH_PAUSE)


async def run_async(settings: dict[str, Any], handling: Handling) -> None:
    slow = float(settings.get("slow", 0))
    stopping = asyncio.Event()

    async def handle(events: list[sb.Event]) -> None:
        if slow:
            await asyncio.sleep(slow)
        handling.settle(events)

    async def pause(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)

    async with registry(settings["address"]).async_broker() as broker:
        consumer = broker.consumer(settings["group"], settings["name"], **settings["options"])
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        def on_term() -> None:
            stopping.set()
            task = loop.create_task(consumer.stop())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_signal_handler(signal.SIGTERM, on_term)
        Path(settings["ready"]).touch()
        while not stopping.is_set():
            try:
                await consumer.consume(handle, count=settings["count"], handle_signals=False)
            except PoisonError:
                await pause(RESTART_PAUSE)
            except sb.ConsumerBusyError as exc:
                if isinstance(exc, sb.LeaseLostError):
                    handling.crash(exc)
                await pause(RESTART_PAUSE)
            except Exception as exc:
                handling.crash(exc)
                await pause(CRASH_PAUSE)


def main() -> None:
    settings = json.loads(sys.argv[1])
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    handling = Handling(settings)
    if settings["face"] == "async":
        asyncio.run(run_async(settings, handling))
    else:
        run_sync(settings, handling)


if __name__ == "__main__":
    main()
