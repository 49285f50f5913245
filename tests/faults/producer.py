"""The fault suite's producer: a thread publishing tokens at a steady rate.

Each event's body is ``{"t": token, "pad": ...}``; tokens are
``<producer>-<stream>-<n>``, and ``-poison`` is appended to those the handlers of the
poison modes fail on. Single publishes and batches alternate; every publish is logged
with its outcome (see :mod:`tests.faults.checker`): a batch's events all take the
batch's outcome, and a batch the server refused is ``unknown`` (the rest of it may
be stored).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import streambroker as sb

from .checker import FAILED, OK, UNKNOWN, JsonLog
from .streams import STREAMS

#: What a publish refused for want of memory raises (a dedicated error is coming).
OUT_OF_MEMORY: type[sb.BrokerError] = getattr(sb, "OutOfMemoryError", sb.ServerReplyError)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the server refused a write for want of memory."""
    if not isinstance(error, OUT_OF_MEMORY):
        return False
    # redis-py drops the reply's "OOM" prefix: "command not allowed when used memory > ..."
    return OUT_OF_MEMORY is not sb.ServerReplyError or "used memory > 'maxmemory'" in str(error)


def outcome_of(error: BaseException, batch: bool) -> str:
    """``unknown`` when the event may have been stored, else ``failed``."""
    if isinstance(error, sb.PoolConnectionError) or batch:
        return UNKNOWN
    return FAILED


class Producer(threading.Thread):
    """Publishes to the suite's streams at ``rate`` events per second (which may be changed
    while it runs) until :meth:`stop`.

    ``batches``: the share of publishes sent as batches (of 2 to ``max_batch``
    events); ``poison``: the numbers of the events that are poison, alternately on
    each stream; ``pad``: bytes of padding per body.
    """

    def __init__(
        self,
        config: sb.ValidatedRegistry,
        logs: Path,
        name: str = "p",
        *,
        rate: float = 250.0,
        batches: float = 0.3,
        max_batch: int = 8,
        poison: Collection[int] = (),
        pad: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(name=f"producer-{name}", daemon=True)
        self.config = config
        self.log = JsonLog(logs / f"published-{name}.jsonl")
        self.producer = name
        self.rate = rate
        self.batches = batches
        self.max_batch = max_batch
        self.poison = sorted(poison)
        self.pad = "x" * pad
        self.random = random.Random(seed)
        self.counts = {OK: 0, FAILED: 0, UNKNOWN: 0}
        #: Publishes refused because the server is out of memory.
        self.out_of_memory = 0
        self.errors: list[str] = []
        self._stopping = threading.Event()
        self._n = 0

    def stop(self, timeout: float = 30.0) -> None:
        """Stop publishing and wait for the thread (AssertionError if it hangs)."""
        self._stopping.set()
        self.join(timeout)
        assert not self.is_alive(), f"producer {self.producer} did not stop in {timeout} s"
        self.log.close()

    @property
    def sent(self) -> int:
        """How many events it tried to publish so far."""
        return self._n

    def _next(self) -> tuple[str, dict[str, Any]]:
        n = self._n
        self._n += 1
        if n in self.poison:
            stream = list(STREAMS)[self.poison.index(n) % len(STREAMS)]
            token = f"{self.producer}-{stream}-{n}-poison"
        else:
            stream = self.random.choice(list(STREAMS))
            token = f"{self.producer}-{stream}-{n}"
        return stream, {"t": token, "pad": self.pad}

    def run(self) -> None:
        with self.config.broker(socket_timeout=5.0, connect_timeout=2.0) as broker:
            due = time.monotonic()
            while not self._stopping.is_set():
                size = 1
                if self.random.random() < self.batches:
                    size = self.random.randint(2, self.max_batch)
                events = [self._next() for _ in range(size)]
                self._publish(broker, events, batch=size > 1)
                # Failed publishes count too: a server that is down is not hammered.
                due = max(due + size / self.rate, time.monotonic() - 0.1)
                ahead = due - time.monotonic()
                if ahead > 0:
                    self._stopping.wait(ahead)

    def _publish(
        self, broker: sb.Broker, events: list[tuple[str, dict[str, Any]]], batch: bool
    ) -> None:
        at = time.monotonic()
        ids: list[str] = []
        error: BaseException | None = None
        try:
            if batch:
                with broker.batch() as pending:
                    for stream, body in events:
                        pending.publish(stream, body)
                ids = pending.ids
            else:
                ((stream, body),) = events
                ids = [broker.publish(stream, body)]
        except sb.BrokerError as exc:
            error = exc
        outcome = OK if error is None else outcome_of(error, batch)
        self.counts[outcome] += len(events)
        if error is not None:
            self.out_of_memory += is_out_of_memory(error)
            if len(self.errors) < 20:
                self.errors.append(f"{type(error).__name__}: {error}")
        self.log.write(
            *(
                {
                    "kind": "publish",
                    "token": body["t"],
                    "stream": stream,
                    "outcome": outcome,
                    "id": ids[i] if ids else None,
                    "at": at,
                    "error": None if error is None else f"{type(error).__name__}: {error}",
                }
                for i, (stream, body) in enumerate(events)
            )
        )
