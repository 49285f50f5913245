"""Prometheus metrics: what the broker does (counters), and what its streams hold
(gauges read from the statistics when scraped).

Needs ``prometheus-client`` (``pip install streambroker[metrics]``)::

    metrics = Metrics()               # its own CollectorRegistry, or registry=...
    metrics.instrument(broker)        # count publishes, deliveries, handler time, GC
    metrics.watch(config)             # the stream and group figures, on scrape

``streambroker worker --metrics-port`` and ``streambroker exporter`` serve them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "streambroker's metrics need prometheus-client: pip install 'streambroker[metrics]'"
    ) from exc

from .core.observer import Outcome
from .core.stats import StreamStats
from .errors import BrokerError

if TYPE_CHECKING:
    from ._face import BrokerFace
    from .broker import Broker
    from .config.registry import ValidatedRegistry

__all__ = ["HANDLER_BUCKETS", "Metrics", "StatsCollector"]

#: Handler duration buckets (seconds): from a fast batch to a slow one.
HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The broker's metrics in one Prometheus registry, and the observer that counts them.

    Counters (created with the object): ``streambroker_events_published_total``,
    ``streambroker_deliveries_total{outcome}``, ``streambroker_handler_duration_seconds``
    and ``streambroker_gc_removed_total``. :meth:`watch` adds the gauges of the
    statistics.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._published = Counter(
            "streambroker_events_published",
            "Events published.",
            ("pool", "stream"),
            registry=self.registry,
        )
        self._deliveries = Counter(
            "streambroker_deliveries",
            "Deliveries of events to groups, by what became of them.",
            ("pool", "stream", "group", "outcome"),
            registry=self.registry,
        )
        self._handler = Histogram(
            "streambroker_handler_duration_seconds",
            "Time a handler took over one batch.",
            ("group", "consumer"),
            buckets=HANDLER_BUCKETS,
            registry=self.registry,
        )
        self._removed = Counter(
            "streambroker_gc_removed",
            "Events removed by garbage collection (every group acknowledged them).",
            ("pool", "stream"),
            registry=self.registry,
        )
        self._collectors: list[StatsCollector] = []

    def instrument(self, broker: BrokerFace[Any]) -> None:
        """Count what ``broker`` (sync or asyncio) does from now on."""
        broker._core.observer = self

    def watch(self, registry: ValidatedRegistry, cache_seconds: float = 2.0) -> StatsCollector:
        """Serve the stream and group figures of ``registry``'s streams, read when
        scraped (at most once per ``cache_seconds``) through a broker of its own."""
        collector = StatsCollector(registry, cache_seconds)
        self.registry.register(collector)
        self._collectors.append(collector)
        return collector

    def exposition(self) -> bytes:
        """The metrics in Prometheus's text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Close the brokers of the collectors :meth:`watch` made."""
        for collector in self._collectors:
            collector.close()

    def published(self, pool: str, stream: str, count: int) -> None:
        self._published.labels(pool, stream).inc(count)

    def delivered(self, pool: str, stream: str, group: str, outcome: Outcome, count: int) -> None:
        self._deliveries.labels(pool, stream, group, outcome).inc(count)

    def handled(self, group: str, consumer: str, seconds: float) -> None:
        self._handler.labels(group, consumer).observe(seconds)

    def collected(self, pool: str, stream: str, count: int) -> None:
        self._removed.labels(pool, stream).inc(count)


#: The gauges of one scrape: (name, help, labels).
_GAUGES = {
    "stream_length": ("Events in the stream.", ("pool", "stream")),
    "stream_oldest_event_age_seconds": (
        "Age of the stream's oldest event (0 when empty).",
        ("pool", "stream"),
    ),
    "group_lag": ("Events the group has not read yet.", ("pool", "stream", "group")),
    "group_lag_seconds": (
        "Age of the oldest event the group has not read yet (0 when none).",
        ("pool", "stream", "group"),
    ),
    "group_pending": (
        "Events delivered to the group and not acknowledged yet.",
        ("pool", "stream", "group"),
    ),
    "group_pending_oldest_age_seconds": (
        "Age of the group's oldest unacknowledged event (0 when none).",
        ("pool", "stream", "group"),
    ),
    "group_dead_letters": ("Dead letters the group set aside.", ("pool", "stream", "group")),
    "consumers": (
        "Consumers of the group: live (holding their lease) or stale (stopped or crashed).",
        ("pool", "stream", "group", "state"),
    ),
}


def stats_families(stats: Sequence[StreamStats]) -> list[GaugeMetricFamily]:
    """The gauges of ``stats``, one family per metric name."""
    families = {
        name: GaugeMetricFamily(f"streambroker_{name}", text, labels=labels)
        for name, (text, labels) in _GAUGES.items()
    }
    for stream in stats:
        where = [stream.pool, stream.stream]
        families["stream_length"].add_metric(where, stream.length)
        families["stream_oldest_event_age_seconds"].add_metric(
            where, stream.oldest_event_age or 0.0
        )
        for group in stream.groups:
            labels = [*where, group.group]
            families["group_lag"].add_metric(labels, group.lag)
            families["group_lag_seconds"].add_metric(labels, group.oldest_unread_age or 0.0)
            families["group_pending"].add_metric(labels, group.pending)
            families["group_pending_oldest_age_seconds"].add_metric(
                labels, group.lowest_pending_age or 0.0
            )
            families["group_dead_letters"].add_metric(labels, group.dead_letters)
            live = sum(consumer.alive for consumer in group.consumers)
            families["consumers"].add_metric([*labels, "live"], live)
            families["consumers"].add_metric([*labels, "stale"], len(group.consumers) - live)
    return list(families.values())


class StatsCollector(Collector):
    """Reads the statistics of a registry's streams when scraped, with a short cache.

    A scrape while a pool does not answer serves no stream gauges (and
    ``streambroker_stats_up 0``), rather than failing the whole scrape.
    """

    def __init__(self, registry: ValidatedRegistry, cache_seconds: float = 2.0) -> None:
        self._registry = registry
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._broker: Broker | None = None
        self._read_at = -float("inf")
        self._stats: list[StreamStats] = []
        self.error: BrokerError | None = None

    def read(self) -> list[StreamStats]:
        """The statistics, read afresh unless the cached ones are recent enough;
        raises the pool's error when they cannot be read."""
        with self._lock:
            if time.monotonic() - self._read_at >= self._cache_seconds:
                if self._broker is None:
                    self._broker = self._registry.broker()
                try:
                    self._stats = self._broker.stats()
                except BrokerError as exc:
                    self.error = exc
                    self._read_at = -float("inf")
                    raise
                self.error = None
                self._read_at = time.monotonic()
            return self._stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "streambroker_stats_up", "Whether the last reading of the statistics succeeded."
        )
        try:
            stats = self.read()
        except BrokerError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from stats_families(stats)

    def close(self) -> None:
        """Close the broker this collector reads with."""
        with self._lock:
            if self._broker is not None:
                self._broker.close()
                self._broker = None
