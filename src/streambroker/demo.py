"""The seed example, run end to end on the embedded server.

Three streams (``stream-a`` and ``stream-b`` in pool ``default``, ``stream-c`` in
pool ``second``) and three consumer groups, one of which reads two streams.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .config import Registry, ValidatedRegistry
from .events import Event

__all__ = ["DemoResult", "demo_registry", "run_demo"]


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
class DemoResult:
    """What the demo published, and what each group handled, per stream."""

    published: dict[str, int]
    handled: dict[str, dict[str, int]]
    lengths: dict[str, int]


def run_demo(data_dir: str | Path, events: int = 1000) -> DemoResult:
    """Publish ``events`` events to each stream, then let every group consume them.

    The three demo streams are started afresh, so each run shows its own figures.
    """
    config = demo_registry(data_dir)
    published: dict[str, int] = {}
    handled: dict[str, dict[str, int]] = {}
    with config.broker() as broker:
        for stream, spec in config.streams.items():
            broker._driver.client(spec.pool).delete(stream)
        with broker.batch() as batch:
            for stream in config.streams:
                for n in range(events):
                    batch.publish(
                        stream, {"n": n, "price": round(n * 0.25, 2)}, meta={"source": "demo"}
                    )
                published[stream] = events
        for group in config.groups:
            counts: Counter[str] = Counter()

            def count(batch_events: list[Event], counts: Counter[str] = counts) -> None:
                counts.update(event.stream for event in batch_events if event.body is not None)

            broker.consumer(group).consume(count, count=100, block=False)
            handled[group] = dict(counts)
        lengths = {}
        for stream, spec in config.streams.items():
            client = broker._driver.client(spec.pool)
            lengths[stream] = int(client.xlen(stream))
    return DemoResult(published, handled, lengths)
