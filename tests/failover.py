"""A publisher and a consumer running while a test switches a pool's master, and the
count of what they did: events lost, unexpected and duplicated.

Used by the Sentinel and the cluster failover tests, which differ only in how they
switch the master and bring a replica back.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import streambroker as sb

from .conftest import wait_for


@dataclass
class FailoverReport:
    """What a :class:`FailoverRun` counted."""

    published: int
    failed: dict[str, int]
    lost: set[int]
    unexpected: set[int]
    duplicated: int

    def __str__(self) -> str:
        return (
            f"{self.published} published, {self.failed} failed in the switch, "
            f"{len(self.lost)} lost, {len(self.unexpected)} unexpected, "
            f"{self.duplicated} duplicated"
        )


@dataclass
class FailoverRun:
    """Publishes numbered events to ``streams`` in turn (with ``options``), one every
    5 ms, and consumes them as group ``group``, in two threads, until :meth:`finish`.

    Publishes raising one of ``expected`` (the switch under way) are counted and tried
    with the next number; any other error ends the run and fails :meth:`finish`.
    """

    broker: sb.Broker
    streams: Sequence[str]
    group: str
    consumer_options: sb.ConsumerSettings
    options: dict[str, Any] = field(default_factory=dict)
    expected: tuple[type[BaseException], ...] = (sb.PoolConnectionError,)
    ok: dict[int, str] = field(default_factory=dict)  # sequence number -> id
    failed: Counter[str] = field(default_factory=Counter)
    attempted: set[int] = field(default_factory=set)
    handled: list[int] = field(default_factory=list)
    after_switch: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._switched = threading.Event()
        self._consumer = self.broker.consumer(self.group, **self.consumer_options)
        self._threads = [
            threading.Thread(target=self._publish),
            threading.Thread(target=self._consume),
        ]

    def _publish(self) -> None:
        n = 0
        while not self._stop.is_set():
            self.attempted.add(n)
            try:
                self.ok[n] = self.broker.publish(
                    self.streams[n % len(self.streams)], n, **self.options
                )
                if self._switched.is_set():
                    self.after_switch.append(n)
            except self.expected as exc:
                self.failed[type(exc).__name__] += 1
                time.sleep(0.05)
            except BaseException as exc:
                self.errors.append(exc)
                return
            n += 1
            time.sleep(0.005)

    def _consume(self) -> None:
        try:
            self._consumer.consume(lambda events: self.handled.extend(e.body for e in events))
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> None:
        """Start both threads and wait until events flow."""
        for thread in self._threads:
            thread.start()
        wait_for(lambda: len(self.handled) >= 50 or self.errors, 20, "events to flow")

    def switched(self) -> None:
        """The master was switched: publishes from now on count as after the switch."""
        self._switched.set()

    def finish(self) -> FailoverReport:
        """Once 50 publishes went through after the switch, stop publishing, wait until
        every published event was handled, stop, and count; nothing may hang."""
        try:
            wait_for(
                lambda: len(self.after_switch) >= 50 or self.errors,
                30,
                "publishing after the switch",
            )
            self._stop.set()
            self._threads[0].join(timeout=30)
            assert not self._threads[0].is_alive(), "a publish hung"
            wait_for(
                lambda: set(self.ok) <= set(self.handled) or self.errors,
                30,
                "every published event handled",
            )
        finally:
            self.close()
        assert not self.errors, self.errors
        counts = Counter(n for n in self.handled if n >= 0)
        return FailoverReport(
            published=len(self.ok),
            failed=dict(self.failed),
            lost=set(self.ok) - set(counts),
            unexpected=set(counts) - self.attempted,
            duplicated=sum(count - 1 for count in counts.values() if count > 1),
        )

    def close(self) -> None:
        """Stop both threads (bounded in time)."""
        self._stop.set()
        self._consumer.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in self._threads), "a thread hung"
