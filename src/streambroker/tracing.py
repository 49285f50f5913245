"""OpenTelemetry tracing of publishing and consuming.

Needs ``opentelemetry-api`` (``pip install streambroker[otel]``) and, to export
spans, an SDK configured by the application::

    sb.Tracing().instrument(broker)

- Publishing one event makes a PRODUCER span ``send <stream>``; a batch makes one
  PRODUCER span ``send`` for all its events (``messaging.batch.message_count``). The
  span's W3C context (``traceparent``, ``tracestate``) is written into each event's
  meta, so any consumer can continue the trace.
- A consumer makes a CONSUMER span ``process <stream>`` per batch, linked to the
  producer context of each of its events, and current while the handler runs (spans
  the handler starts are its children). :meth:`Tracing.event_span` makes a child span
  per event when the handler wants one.

Attributes follow OpenTelemetry's messaging semantic conventions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "streambroker's tracing needs opentelemetry-api: pip install 'streambroker[otel]'"
    ) from exc

from . import __version__

if TYPE_CHECKING:
    from ._face import BrokerFace
    from .wire.events import Event

__all__ = ["TRACE_FIELDS", "Tracing"]

#: The meta tags that carry an event's producer context (W3C Trace Context).
TRACE_FIELDS = ("traceparent", "tracestate")
SYSTEM = "redis"


class Tracing:
    """Makes the spans of the brokers it instruments, with ``tracer_provider``'s tracer
    (the global one by default)."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("streambroker", __version__, tracer_provider)

    def instrument(self, broker: BrokerFace[Any]) -> None:
        """Trace what ``broker`` (sync or asyncio) publishes and consumes from now on."""
        broker._core.tracing = self

    def start_send(self, stream: str, server: str) -> Span:
        """Start the PRODUCER span of publishing to ``stream`` (the first stream of a
        batch): :meth:`finish_send` ends it."""
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "server.address": server,
        }
        return self._tracer.start_span(
            f"send {stream}", kind=SpanKind.PRODUCER, attributes=attributes
        )

    def finish_send(
        self, span: Span, streams: Sequence[str], ids: Sequence[str], error: BaseException | None
    ) -> None:
        """End a span :meth:`start_send` made for the events of ``streams`` (one per
        event), which got ``ids`` (none when ``error`` stopped them)."""
        if len(set(streams)) == 1:
            span.set_attribute("messaging.destination.name", streams[0])
        else:
            span.update_name("send")
        if len(streams) > 1:
            span.set_attribute("messaging.batch.message_count", len(streams))
        elif ids:
            span.set_attribute("messaging.message.id", ids[0])
        self.finish(span, error)

    def carrier(self, span: Span, meta: Mapping[str, str] | None) -> dict[str, str]:
        """``meta`` with ``span``'s context added (as ``traceparent``/``tracestate``)."""
        with_context = dict(meta or {})
        propagate.inject(with_context, context=trace.set_span_in_context(span))
        return with_context

    def start_process(
        self, group: str, consumer: str, events: Sequence[Event], server: str
    ) -> tuple[Span, object]:
        """Start the CONSUMER span of handling ``events`` and make it current; returns
        (span, token) for :meth:`finish_process`."""
        streams = list(dict.fromkeys(event.stream for event in events))
        links = [link for event in events if (link := _producer_link(event)) is not None]
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.consumer.group.name": group,
            "messaging.batch.message_count": len(events),
            "messaging.client.id": consumer,
            "server.address": server,
        }
        if len(streams) == 1:
            attributes["messaging.destination.name"] = streams[0]
        if len(events) == 1:
            attributes["messaging.message.id"] = events[0].id
        name = f"process {streams[0]}" if len(streams) == 1 else "process"
        span = self._tracer.start_span(
            name, kind=SpanKind.CONSUMER, attributes=attributes, links=links
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    def finish_process(self, span: Span, token: object, error: BaseException | None) -> None:
        """End a span :meth:`start_process` made, recording ``error`` if the handler raised."""
        otel_context.detach(token)  # type: ignore[arg-type]
        self.finish(span, error)

    def finish(self, span: Span, error: BaseException | None) -> None:
        """End ``span``, recording ``error`` (and ``error.type``) when there is one."""
        if error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    @contextmanager
    def event_span(self, event: Event) -> Iterator[Span]:
        """A span for handling one event, child of the current ``process`` span and
        linked to the event's producer context."""
        link = _producer_link(event)
        attributes = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.destination.name": event.stream,
            "messaging.message.id": event.id,
        }
        with self._tracer.start_as_current_span(
            f"process {event.stream}",
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=[link] if link is not None else None,
        ) as span:
            yield span


def _producer_link(event: Event) -> Link | None:
    try:
        meta = event.meta
    except ValueError:  # meta that is not text: no context to follow
        return None
    if "traceparent" not in meta:
        return None
    span_context = trace.get_current_span(propagate.extract(meta)).get_span_context()
    return Link(span_context) if span_context.is_valid else None
