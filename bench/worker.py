"""A producer or consumer process of the end-to-end and memory benchmarks.

``python -m bench.worker '<json settings>'``. The process sets itself up (connects,
creates the groups), prints ``{"ready": true}``, waits for a line ``go`` on its
standard input, does its work and prints one JSON line of results. Times are
``time.monotonic()``, which every process on the machine shares.

Roles: ``sb-producer``, ``raw-producer``, ``sb-consumer``, ``raw-consumer``.
Every loop is bounded by the event count and by ``limit`` seconds.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import streambroker as sb

from .common import (
    BODY_FIELD,
    CODEC_FIELD,
    CODEC_NAME,
    GROUP,
    STREAM,
    WARM_STREAM,
    encode_body,
    handle_raw,
    make_body,
    peak_rss_mib,
    raw_client,
    registry,
    rss_mib,
)


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _ready_then_wait() -> None:
    _emit({"ready": True, "rss_mib": rss_mib()})
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"expected 'go', got {line!r}")


class _Marks:
    """Records resident memory as the handled count passes each mark."""

    def __init__(self, marks: list[int]) -> None:
        self._marks = sorted(marks)
        self.rss: dict[str, float] = {}

    def passed(self, handled: int) -> None:
        while self._marks and handled >= self._marks[0]:
            self.rss[str(self._marks.pop(0))] = rss_mib()


def consume_within(
    consumer: sb.Consumer,
    handler: Callable[[list[sb.Event]], None],
    count: int,
    block: bool,
    limit: float,
) -> None:
    """``consumer.consume(handler, ...)``, stopped after ``limit`` seconds at the latest
    (``stop()`` makes it return after its batch): a bound on the whole run."""
    timer = threading.Timer(limit, consumer.stop)
    timer.daemon = True
    timer.start()
    try:
        consumer.consume(handler, count=count, block=block)
    finally:
        timer.cancel()


def sb_producer(settings: dict[str, Any]) -> dict[str, Any]:
    n, size = settings["events"], settings["batch"]
    with registry(settings["address"]).broker() as broker:
        broker.collect_garbage(WARM_STREAM)
        _ready_then_wait()
        start = time.monotonic()
        for first in range(0, n, size):
            with broker.batch() as batch:
                for seq in range(first, min(n, first + size)):
                    batch.publish(STREAM, make_body(seq))
        end = time.monotonic()
    return {"start": start, "end": end, "published": n}


def raw_producer(settings: dict[str, Any]) -> dict[str, Any]:
    n, size = settings["events"], settings["batch"]
    client = raw_client(settings["address"])
    try:
        client.ping()
        _ready_then_wait()
        start = time.monotonic()
        for first in range(0, n, size):
            pipe = client.pipeline(transaction=False)
            for seq in range(first, min(n, first + size)):
                pipe.xadd(STREAM, {BODY_FIELD: encode_body(seq), CODEC_FIELD: CODEC_NAME})
            pipe.execute()
        end = time.monotonic()
    finally:
        client.close()
    return {"start": start, "end": end, "published": n}


def sb_consumer(settings: dict[str, Any]) -> dict[str, Any]:
    n, count, block = settings["events"], settings["count"], settings["block"]
    marks = _Marks(settings.get("marks", []))
    handled = [0]
    with registry(settings["address"]).broker() as broker:
        consumer = broker.consumer(GROUP, "bench-consumer", collect=settings.get("collect", True))
        broker.collect_garbage(WARM_STREAM)

        def handler(events: list[sb.Event]) -> None:
            for event in events:
                event.body  # noqa: B018 - decoding is part of consuming
            handled[0] += len(events)
            marks.passed(handled[0])
            if handled[0] >= n:
                consumer.stop()

        rss_before = rss_mib()
        _ready_then_wait()
        consume_within(consumer, handler, count, block, settings["limit"])
        end = time.monotonic()
    return {
        "end": end,
        "handled": handled[0],
        "rss_before_mib": rss_before,
        "rss_mib": marks.rss,
        "peak_rss_mib": peak_rss_mib(),
    }


def raw_consumer(settings: dict[str, Any]) -> dict[str, Any]:
    n, count, block = settings["events"], settings["count"], settings["block"]
    marks = _Marks(settings.get("marks", []))
    handled = 0
    client = raw_client(settings["address"])
    try:
        client.ping()
        rss_before = rss_mib()
        _ready_then_wait()
        deadline = time.monotonic() + settings["limit"]
        while handled < n and time.monotonic() < deadline:
            reply = client.xreadgroup(
                GROUP, "raw-consumer", {STREAM: ">"}, count=count, block=1000 if block else None
            )
            if not reply:
                if block:
                    continue
                break
            for _key, entries in reply:
                ids = handle_raw(entries)
                client.xack(STREAM, GROUP, *ids)
                handled += len(ids)
                marks.passed(handled)
        end = time.monotonic()
    finally:
        client.close()
    return {
        "end": end,
        "handled": handled,
        "rss_before_mib": rss_before,
        "rss_mib": marks.rss,
        "peak_rss_mib": peak_rss_mib(),
    }


ROLES = {
    "sb-producer": sb_producer,
    "raw-producer": raw_producer,
    "sb-consumer": sb_consumer,
    "raw-consumer": raw_consumer,
}


def serve(roles: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Be the worker process of the role the settings (the first argument, JSON) name:
    print what it returns as the last line."""
    settings = json.loads(sys.argv[1])
    _emit(roles[settings["role"]](settings))


def main() -> None:
    serve(ROLES)


if __name__ == "__main__":
    main()
