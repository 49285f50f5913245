"""Prometheus metrics, the operators' HTTP endpoints and ``streambroker exporter``, on the
real servers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import streambroker as sb
from streambroker.apps.serving import OpsServer
from streambroker.metrics import Metrics

from .conftest import SEED_YAML_TEMPLATE, OpenBroker, Server, free_port, seed_registry, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((f"streambroker_{name}", tuple(sorted(labels.items()))))


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    metrics = Metrics()
    yield metrics
    metrics.close()


def test_the_broker_counts_publishes_and_collection(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, metrics: Metrics
) -> None:
    with open_broker(config) as broker:
        metrics.instrument(broker)
        for n in range(3):
            broker.publish("stream-a", n)
        with broker.batch() as batch:
            batch.publish("stream-a", 3)
            batch.publish("stream-c", 4)
        for group in ("read-group-a", "read-group-ab"):
            broker.consumer(group, collect=False).consume(lambda events: None, block=False)
        assert broker.collect_garbage("stream-a") == {"stream-a": 4}
    found = parse(metrics.exposition().decode())
    published = "events_published_total"
    assert value(found, published, pool="default", stream="stream-a") == 4
    assert value(found, published, pool="second", stream="stream-c") == 1
    assert value(found, "gc_removed_total", pool="default", stream="stream-a") == 4


def test_a_broker_without_metrics_counts_nothing(
    config: sb.ValidatedRegistry, metrics: Metrics
) -> None:
    with config.broker() as broker:
        broker.publish("stream-a", 1)
    found = parse(metrics.exposition().decode())
    assert value(found, "events_published_total", pool="default", stream="stream-a") is None


def test_the_gauges_show_each_stream_and_group(
    config: sb.ValidatedRegistry, server: Server, metrics: Metrics
) -> None:
    collector = metrics.watch(config, cache_seconds=0)
    with config.broker() as broker:
        for n in range(3):
            broker.publish("stream-a", n)

        def fail_first(events: list[sb.Event]) -> None:
            for event in events:
                if event.body == 0:
                    event.fail("no")

        broker.consumer("read-group-a", "c1", max_deliveries=1).consume(
            fail_first, count=1, block=False
        )
        time.sleep(0.05)  # ages are read from the server's clock: let it move on
        found = parse(metrics.exposition().decode())
    stream_a = {"pool": "default", "stream": "stream-a"}
    assert value(found, "stats_up") == 1
    assert value(found, "stream_length", **stream_a) == 3
    assert value(found, "stream_oldest_event_age_seconds", **stream_a) >= 0.05  # type: ignore[operator]
    group_a = {**stream_a, "group": "read-group-a"}
    group_ab = {**stream_a, "group": "read-group-ab"}
    assert value(found, "group_lag", **group_a) == 0
    assert value(found, "group_lag_seconds", **group_a) == 0
    assert value(found, "group_lag", **group_ab) == 3
    assert value(found, "group_lag_seconds", **group_ab) >= 0.05  # type: ignore[operator]
    assert value(found, "group_pending", **group_a) == 0
    assert value(found, "group_dead_letters", **group_a) == 1
    # The one-shot consumer left its lease behind when it returned: stale, not live.
    assert value(found, "consumers", **group_a, state="stale") == 1
    assert value(found, "consumers", **group_a, state="live") == 0
    assert value(found, "consumers", **group_ab, state="live") == 0
    assert collector.error is None


def test_a_pool_that_does_not_answer_leaves_the_scrape_working(metrics: Metrics) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    collector = metrics.watch(seed_registry(f"{nowhere}:0", f"{nowhere}:3"))
    found = parse(metrics.exposition().decode())
    assert value(found, "stats_up") == 0
    assert not any(name == "streambroker_stream_length" for name, _ in found)
    assert isinstance(collector.error, sb.PoolConnectionError)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_endpoints(metrics: Metrics) -> None:
    reasons: list[str | None] = ["the consumers are starting"]
    server = OpsServer(metrics.exposition, lambda: reasons[0]).start()
    try:
        host, port = server.address
        base = f"http://{host}:{port}"
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (503, "not ready: the consumers are starting\n")
        reasons[0] = None
        assert get(f"{base}/readyz") == (200, "ready\n")
        status, text = get(f"{base}/metrics")
        assert status == 200
        assert "streambroker_events_published_total" in text
        assert get(f"{base}/other")[0] == 404
    finally:
        server.close()


def test_a_taken_port_is_a_clear_error(metrics: Metrics) -> None:
    first = OpsServer(metrics.exposition, lambda: None).start()
    try:
        with pytest.raises(sb.InvalidArgumentError, match=r"cannot serve metrics on 127\.0\.0\.1"):
            OpsServer(metrics.exposition, lambda: None, port=first.address[1])
    finally:
        first.close()


def test_the_exporter_serves_a_whole_configuration(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "streambroker.yaml"
    config.write_text(
        SEED_YAML_TEMPLATE.format(default=f"{server.address}:0", second=f"{server.address}:3")
    )
    with seed_registry(f"{server.address}:0", f"{server.address}:3").broker() as broker:
        broker.publish("stream-c", "x")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "streambroker", "exporter", "--port", str(port), "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return get(f"{base}/readyz")[0] == 200
            except OSError:
                return False

        wait_for(answers, timeout=30, what="the exporter to answer")
        found = parse(get(f"{base}/metrics")[1])
        labels: dict[str, Any] = {"pool": "second", "stream": "stream-c", "group": "read-group-c"}
        assert value(found, "group_lag", **labels) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert out == f"serving metrics on http://127.0.0.1:{port}/metrics\n"


def test_the_consumer_counts_what_became_of_each_delivery(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, metrics: Metrics
) -> None:
    with open_broker(config) as broker:
        metrics.instrument(broker)
        for n in range(5):
            broker.publish("stream-a", n)

        def handle(events: list[sb.Event]) -> None:
            for event in events:
                if event.body == 1:
                    event.fail("poison")

        consumer = broker.consumer("read-group-a", "c1", max_deliveries=2, retry_delay=0.01)

        def dead_lettered() -> bool:
            consumer.consume(handle, block=False)
            return broker.group_stats("stream-a", "read-group-a").dead_letters == 1

        wait_for(dead_lettered, what="the poison event to be dead-lettered")
        broker.consumer("read-group-ab", "c1").consume(lambda events: None, count=2, block=False)
    found = parse(metrics.exposition().decode())
    group_a = {"pool": "default", "stream": "stream-a", "group": "read-group-a"}
    assert value(found, "deliveries_total", **group_a, outcome="acked") == 4
    assert value(found, "deliveries_total", **group_a, outcome="failed") == 1
    assert value(found, "deliveries_total", **group_a, outcome="dead_lettered") == 1
    group_ab = {**group_a, "group": "read-group-ab"}
    assert value(found, "deliveries_total", **group_ab, outcome="dead_lettered") is None
    handled = value(found, "handler_duration_seconds_count", group="read-group-a", consumer="c1")
    assert handled is not None
    assert handled >= 2
    # read-group-ab acknowledged the last events the other group had settled: collected.
    assert value(found, "gc_removed_total", pool="default", stream="stream-a") == 5
