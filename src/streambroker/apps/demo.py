"""The seed example, run end to end on the embedded server.

Three streams (``stream-a`` and ``stream-b`` in pool ``default``, ``stream-c`` in
pool ``second``) and three consumer groups, one of which reads two streams. A
producer publishes while a :class:`~streambroker.apps.worker.Worker` runs a handler per
group with two consumers each; consumers remove the events every group acknowledged
as they go, so every stream ends empty. Nothing to configure, no server to install.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress, TaskID

from ..broker import Broker
from ..config.registry import Registry, ValidatedRegistry
from ..core.effects import Op, Parallel, Send
from ..core.stats import StreamStats
from ..wire.events import Event
from ..wire.keys import dead_letter_key, replay_key
from .worker import Worker

__all__ = ["DemoResult", "Sale", "demo_registry", "run_demo"]

#: Events per stream published in one round trip.
PUBLISH_BATCH = 100
#: Consumers per group.
CONSUMERS = 2


def demo_registry(data_dir: str | Path) -> ValidatedRegistry:
    """The seed's registry, both pools on the embedded server (databases 0 and 3)."""
    registry = Registry()
    registry.register_redis("embedded", db=0, data_dir=data_dir)
    registry.register_stream("stream-a", "default", ["read-group-a", "read-group-ab"])
    registry.register_stream("stream-b", "default", ["read-group-ab"])
    registry.register_redis("embedded", db=3, pool="second", data_dir=data_dir)
    registry.register_stream("stream-c", "second", ["read-group-c"])
    return registry.validate()


@dataclass(frozen=True)
class Sale:
    """The body of a demo event."""

    n: int
    price: float


@dataclass(frozen=True)
class DemoResult:
    """What the demo published, what each group handled (per stream), and the
    statistics of the streams after the workers stopped."""

    published: dict[str, int]
    handled: dict[str, dict[str, int]]
    stats: list[StreamStats]

    @property
    def lengths(self) -> dict[str, int]:
        """Events left in each stream."""
        return {stream.stream: stream.length for stream in self.stats}


class _Tally:
    """Events handled per group and stream, updated by the workers' threads."""

    def __init__(self, groups: Iterable[str]) -> None:
        self.changed = threading.Condition()
        self.counts: dict[str, Counter[str]] = {group: Counter() for group in groups}

    def add(self, group: str, events: list[Event]) -> None:
        with self.changed:
            self.counts[group].update(event.stream for event in events)
            self.changed.notify_all()

    def totals(self) -> dict[str, int]:
        with self.changed:
            return {group: sum(counts.values()) for group, counts in self.counts.items()}


def _start_afresh(config: ValidatedRegistry) -> Op[None]:
    """Delete the demo's streams (their groups go with them) and dead letters."""
    keys: dict[str, list[str]] = {}
    for spec in config.streams.values():
        keys.setdefault(spec.pool, []).append(spec.key)
        for group in spec.groups:
            keys[spec.pool] += [dead_letter_key(spec, group), replay_key(spec, group)]
    yield Parallel([Send(pool, [("DEL", name) for name in names]) for pool, names in keys.items()])


def _register_handlers(broker: Broker, tally: _Tally) -> None:
    for group in broker.registry.groups:

        def handle(events: list[Event], group: str = group) -> None:
            for event in events:
                event.decode(Sale)  # the typed body; an undecodable event would raise
            tally.add(group, events)

        broker.handler(group, count=PUBLISH_BATCH, block_timeout=0.1)(handle)


def run_demo(
    data_dir: str | Path, events: int = 1000, *, progress: Progress | None = None
) -> DemoResult:
    """Publish ``events`` events to each stream while workers consume them.

    The three demo streams are started afresh, so each run shows its own figures.
    ``progress`` shows the publishing and each group's handling as they go.
    """
    config = demo_registry(data_dir)
    streams = list(config.streams)
    expected = {group: events * len(names) for group, names in config.groups.items()}
    tally = _Tally(config.groups)
    with config.broker() as broker:
        broker._driver.run(_start_afresh(config))
        _register_handlers(broker, tally)
        progress = progress or Progress(disable=True)
        with progress, Worker(broker, consumers=CONSUMERS):
            published = progress.add_task("publishing", total=events * len(streams))
            handled = {
                group: progress.add_task(f"{group} handled", total=total)
                for group, total in expected.items()
            }
            for start in range(0, events, PUBLISH_BATCH):
                end = min(events, start + PUBLISH_BATCH)
                with broker.batch() as batch:
                    for stream in streams:
                        for n in range(start, end):
                            batch.publish(stream, Sale(n, round(n * 0.25, 2)), {"source": "demo"})
                progress.advance(published, (end - start) * len(streams))
                _show(progress, handled, tally.totals(), expected)
            while not _show(progress, handled, tally.totals(), expected):
                with tally.changed:
                    tally.changed.wait(0.1)
        stats = broker.stats()
    return DemoResult(
        published=dict.fromkeys(streams, events),
        handled={group: dict(counts) for group, counts in tally.counts.items()},
        stats=stats,
    )


def _show(
    progress: Progress, tasks: dict[str, TaskID], totals: dict[str, int], expected: dict[str, int]
) -> bool:
    """Update each group's progress; True when every group handled everything."""
    for group, task in tasks.items():
        progress.update(task, completed=totals[group])
    return all(totals[group] >= expected[group] for group in tasks)
