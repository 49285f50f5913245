"""OpenTelemetry spans of publishing and consuming, read back from the SDK's in-memory
exporter; on the real servers, both faces."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import streambroker as sb
from streambroker.tracing import Tracing

from .conftest import OpenBroker


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider)


def spans(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind == kind]


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def test_a_publish_is_a_producer_span_whose_context_the_event_carries(
    open_broker: OpenBroker,
    config: sb.ValidatedRegistry,
    tracing: Tracing,
    exporter: InMemorySpanExporter,
) -> None:
    with open_broker(config) as broker:
        tracing.instrument(broker)
        event_id = broker.publish("stream-a", {"n": 1}, meta={"kind": "order"})
        (read,) = broker.read("stream-a")
    (span,) = spans(exporter, SpanKind.PRODUCER)
    assert span.name == "send stream-a"
    assert dict(span.attributes or {}) == {
        "messaging.system": "redis",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "stream-a",
        "messaging.message.id": event_id,
        "server.address": config.pools["default"].server_address,
    }
    assert read.meta == {"kind": "order", "traceparent": traceparent_of(span)}
    assert read.body == {"n": 1}


def test_a_batch_is_one_producer_span_for_all_its_events(
    open_broker: OpenBroker,
    config: sb.ValidatedRegistry,
    tracing: Tracing,
    exporter: InMemorySpanExporter,
) -> None:
    with open_broker(config) as broker:
        tracing.instrument(broker)
        with broker.batch() as batch:
            batch.publish("stream-a", 1)
            batch.publish("stream-a", 2)
        with broker.batch() as batch:
            batch.publish("stream-a", 3)
            batch.publish("stream-c", 4)
        events = broker.read("stream-a") + broker.read("stream-c")
    one_stream, two_streams = spans(exporter, SpanKind.PRODUCER)
    assert one_stream.name == "send stream-a"
    assert (one_stream.attributes or {})["messaging.batch.message_count"] == 2
    assert two_streams.name == "send"
    assert "messaging.destination.name" not in (two_streams.attributes or {})
    assert [event.meta["traceparent"] for event in events] == [
        traceparent_of(one_stream),
        traceparent_of(one_stream),
        traceparent_of(two_streams),
        traceparent_of(two_streams),
    ]


def test_a_failed_publish_records_its_error(
    open_broker: OpenBroker,
    config: sb.ValidatedRegistry,
    tracing: Tracing,
    exporter: InMemorySpanExporter,
) -> None:
    with open_broker(config) as broker:
        tracing.instrument(broker)
        with pytest.raises(sb.EncodeError):
            broker.publish("stream-a", object())

        def failing_batch() -> None:
            with broker.batch() as batch:
                batch.publish("stream-a", 1)
                raise RuntimeError("changed my mind")

        with pytest.raises(RuntimeError):
            failing_batch()
        assert broker.read("stream-a") == []
    single, batch_span = spans(exporter, SpanKind.PRODUCER)
    for span, error in ((single, "EncodeError"), (batch_span, "RuntimeError")):
        assert span.status.status_code == StatusCode.ERROR
        assert (span.attributes or {})["error.type"] == error


def test_a_consumer_makes_a_process_span_per_batch_linked_to_the_producers(
    open_broker: OpenBroker,
    config: sb.ValidatedRegistry,
    tracing: Tracing,
    exporter: InMemorySpanExporter,
) -> None:
    from opentelemetry import trace

    inside: list[tuple[int, int]] = []
    with open_broker(config) as broker:
        tracing.instrument(broker)
        first = broker.publish("stream-a", 1)
        broker.publish("stream-b", 2)

        def handle(events: list[sb.Event]) -> None:
            context = trace.get_current_span().get_span_context()
            inside.append((context.trace_id, context.span_id))
            for event in events:
                with tracing.event_span(event):
                    pass

        broker.consumer("read-group-ab").consume(handle, count=10, block=False)

        def failing(events: list[sb.Event]) -> None:
            raise ValueError("bad batch")

        broker.publish("stream-c", 3)
        with pytest.raises(ValueError, match="bad batch"):
            broker.consumer("read-group-c").consume(failing, block=False)
    producers = spans(exporter, SpanKind.PRODUCER)
    consumers = spans(exporter, SpanKind.CONSUMER)
    batch = next(span for span in consumers if span.name == "process")
    per_event = [span for span in consumers if span.parent is not None]
    failed = next(span for span in consumers if span.name == "process stream-c")
    attributes = dict(batch.attributes or {})
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.consumer.group.name"] == "read-group-ab"
    assert attributes["messaging.batch.message_count"] == 2
    assert "messaging.destination.name" not in attributes  # two streams in the batch
    assert [link.context.span_id for link in batch.links] == [
        span.get_span_context().span_id for span in producers[:2]
    ]
    # The handler ran inside the batch's span, and the per-event spans are its children.
    assert inside == [(batch.context.trace_id, batch.context.span_id)]
    assert [span.name for span in per_event] == ["process stream-a", "process stream-b"]
    assert all(span.parent.span_id == batch.context.span_id for span in per_event)
    assert (per_event[0].attributes or {})["messaging.message.id"] == first
    assert failed.status.status_code == StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "ValueError"
