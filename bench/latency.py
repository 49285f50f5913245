"""(9) Latency from publish to handler at a steady rate, in two processes.

A producer process publishes one event at a time, paced at a fixed rate against
absolute deadlines (a late send does not push the later ones back); each event
carries the ``time.monotonic_ns()`` it was sent at, a clock every process on the
machine shares. A consumer process records, in its handler, the time it got the
event minus that send time. The first ``WARMUP`` seconds of events are not counted.

streambroker: ``broker.publish(stream, body)`` and ``consumer.consume(handler,
count=..., block=True)`` with the default ``block_timeout``. Raw redis-py: ``xadd``
and a blocking ``XREADGROUP`` + ``XACK`` loop.

This module is also the worker of those processes:
``python -m bench.latency '<json settings>'``, driven as ``bench.worker`` is.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

import streambroker as sb

from .common import (
    BODY_FIELD,
    CODEC_FIELD,
    CODEC_NAME,
    GROUP,
    STREAM,
    WARM_STREAM,
    check,
    count_round_trips,
    decode_body,
    median,
    raw_client,
    registry,
)
from .processes import Worker, fresh_stream
from .results import CaseResult, log
from .servers import BenchServer
from .worker import _ready_then_wait, serve

#: The case's number in the table (its place in ``bench.cli.CASES``: ``--cases 9``).
CASE = "9"
#: Steady rates measured, in events per second.
RATES = (1_000, 10_000)
#: Seconds of events sent first and not counted (connections, caches, the first reads).
WARMUP = 0.5
#: Target: streambroker's p99 at most this many times raw's.
LATENCY_TARGET = 1.2
#: A side sending or receiving below this share of the rate did not keep it.
KEPT_SHARE = 0.95
#: The raw consumer's blocking time, as streambroker's default ``block_timeout``.
RAW_BLOCK_MS = 1000
#: Percentiles reported per run (as fractions).
QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "p999": 0.999}

_FILLER = "x" * 83
_encode = msgspec.msgpack.Encoder().encode


def latency_body(seq: int, sent_ns: int) -> dict[str, Any]:
    """The body of the ``seq``-th event, sent at ``sent_ns`` (110-114 bytes of msgpack)."""
    return {"seq": seq, "sent": sent_ns, "data": _FILLER}


# -- the processes -----------------------------------------------------------------


def _paced(settings: dict[str, Any], send: Callable[[int, int], None]) -> dict[str, Any]:
    """Call ``send(seq, sent_ns)`` ``total`` times at ``rate`` per second, each at its
    deadline ``start + seq / rate`` (or at once when late)."""
    total, rate, warm = settings["total"], settings["rate"], settings["warm"]
    start = time.monotonic_ns() + 1_000_000
    last = start
    behind = 0
    for seq in range(total):
        due = start + seq * 1_000_000_000 // rate
        now = time.monotonic_ns()
        if now < due:
            time.sleep((due - now) / 1e9)
        last = time.monotonic_ns()
        send(seq, last)
        if seq >= warm:
            behind = max(behind, last - due)
    # From the deadline of the first counted event to the last send: a producer that
    # fell behind (and is catching up) does not look faster than the rate.
    first = start + warm * 1_000_000_000 // rate
    return {
        "sent": total,
        "rate": (total - warm - 1) * 1e9 / (last - first) if last > first else float("nan"),
        "max_behind_ms": behind / 1e6,
    }


def sb_producer(settings: dict[str, Any]) -> dict[str, Any]:
    with registry(settings["address"]).broker() as broker:
        broker.collect_garbage(WARM_STREAM)
        publish = broker.publish
        _ready_then_wait()
        return _paced(settings, lambda seq, sent: publish(STREAM, latency_body(seq, sent)))


def raw_producer(settings: dict[str, Any]) -> dict[str, Any]:
    client = raw_client(settings["address"])
    try:
        client.ping()
        xadd = client.xadd

        def send(seq: int, sent: int) -> None:
            xadd(STREAM, {BODY_FIELD: _encode(latency_body(seq, sent)), CODEC_FIELD: CODEC_NAME})

        _ready_then_wait()
        return _paced(settings, send)
    finally:
        client.close()


class _Recorder:
    """Latencies (ns) of the counted events, and when the first and last arrived."""

    def __init__(self, warm: int) -> None:
        self.warm = warm
        self.latencies: list[int] = []
        self.handled = 0
        self.batches = 0
        self.first = self.last = 0

    def got(self, now: int, bodies: list[Any]) -> None:
        self.batches += 1
        self.handled += len(bodies)
        for body in bodies:
            if body["seq"] >= self.warm:
                self.latencies.append(now - body["sent"])
                self.first = self.first or now
                self.last = now

    def summary(self, round_trips: int) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        n = len(ordered)
        figures: dict[str, Any] = {
            name: ordered[min(n - 1, math.ceil(q * n) - 1)] / 1e6 for name, q in QUANTILES.items()
        }
        span = self.last - self.first
        return figures | {
            "max": ordered[-1] / 1e6,
            "counted": n,
            "handled": self.handled,
            "batches": self.batches,
            "round_trips": round_trips,
            "rate": (n - 1) * 1e9 / span if span > 0 else float("nan"),
        }


def sb_consumer(settings: dict[str, Any]) -> dict[str, Any]:
    total, count = settings["total"], settings["count"]
    seen = _Recorder(settings["warm"])
    with registry(settings["address"]).broker() as broker:
        consumer = broker.consumer(GROUP, "latency-consumer")
        broker.collect_garbage(WARM_STREAM)

        def handler(events: list[sb.Event]) -> None:
            now = time.monotonic_ns()
            seen.got(now, [event.body for event in events])
            if seen.handled >= total:
                consumer.stop()

        _ready_then_wait()
        timer = threading.Timer(settings["limit"], consumer.stop)
        timer.daemon = True
        timer.start()
        try:
            with count_round_trips() as trips:
                consumer.consume(handler, count=count, block=True)
        finally:
            timer.cancel()
    return seen.summary(trips[0])


def raw_consumer(settings: dict[str, Any]) -> dict[str, Any]:
    total, count = settings["total"], settings["count"]
    seen = _Recorder(settings["warm"])
    client = raw_client(settings["address"])
    try:
        client.ping()
        _ready_then_wait()
        deadline = time.monotonic() + settings["limit"]
        with count_round_trips() as trips:
            while seen.handled < total and time.monotonic() < deadline:
                reply = client.xreadgroup(
                    GROUP, "raw-consumer", {STREAM: ">"}, count=count, block=RAW_BLOCK_MS
                )
                if not reply:
                    continue
                now = time.monotonic_ns()
                for _key, entries in reply:
                    seen.got(now, [decode_body(fields[BODY_FIELD]) for _id, fields in entries])
                    client.xack(STREAM, GROUP, *[event_id for event_id, _ in entries])
    finally:
        client.close()
    return seen.summary(trips[0])


ROLES = {
    "sb-producer": sb_producer,
    "raw-producer": raw_producer,
    "sb-consumer": sb_consumer,
    "raw-consumer": raw_consumer,
}


# -- the case ------------------------------------------------------------------------


def _run_pair(
    server: BenchServer, face: str, rate: int, seconds: int, count: int, limit: float
) -> dict[str, Any]:
    """One run of one face at ``rate``: a consumer and a producer process."""
    fresh_stream(server, face)
    warm = int(rate * WARMUP)
    common = {
        "address": server.address,
        "rate": rate,
        "warm": warm,
        "total": warm + rate * seconds,
        "limit": limit,
    }
    consumer = Worker(
        {**common, "role": f"{face}-consumer", "count": count}, module="bench.latency"
    )
    producer = Worker({**common, "role": f"{face}-producer"}, module="bench.latency")
    wait = WARMUP + seconds + limit + 30
    try:
        consumer.message(60)
        producer.message(60)
        consumer.go()
        producer.go()
        produced = producer.message(wait)
        consumed = consumer.message(wait)
    finally:
        consumer.close()
        producer.close()
    check(
        consumed["handled"] == common["total"],
        f"{face} latency: handled {consumed['handled']} of {common['total']}",
    )
    client = raw_client(server.address)
    try:
        pending = int(client.xpending(STREAM, GROUP)["pending"])
    finally:
        client.close()
    check(pending == 0, f"{face} latency: {pending} events left pending")
    return consumed | {"sent_rate": produced["rate"], "max_behind_ms": produced["max_behind_ms"]}


def _kept(runs: list[dict[str, Any]], rate: int) -> tuple[float, float, bool]:
    """The median rates the producer sent and the consumer received at, and whether
    both kept ``rate``."""
    sent = median([r["sent_rate"] for r in runs])
    received = median([r["rate"] for r in runs])
    return sent, received, min(sent, received) >= rate * KEPT_SHARE


def _ms(value: float) -> str:
    return f"{value:.3f} ms" if value < 10 else f"{value:,.1f} ms"


def _results(
    server: BenchServer,
    rate: int,
    seconds: int,
    count: int,
    sb_runs: list[Any],
    raw_runs: list[Any],
) -> list[CaseResult]:
    faces = {"sb": sb_runs, "raw": raw_runs}
    rates = {face: _kept(runs, rate) for face, runs in faces.items()}
    texts: dict[str, dict[str, str]] = {"p50": {}, "p99": {}}
    for face, runs in faces.items():
        sent, received, kept = rates[face]
        missed = "" if kept else " (RATE NOT KEPT)"
        pace = f" at {min(sent, received):,.0f}/s"
        texts["p50"][face] = _ms(median([r["p50"] for r in runs])) + pace + missed
        texts["p99"][face] = (
            _ms(median([r["p99"] for r in runs]))
            + f" (max {_ms(max(r['max'] for r in runs))})"
            + missed
        )
    results = []
    for name in ("p50", "p99"):
        ratios = [s[name] / r[name] for s, r in zip(sb_runs, raw_runs, strict=True)]
        ratio = median(ratios)
        # Raw code that fell behind queues events: nothing to compare against.
        passed = None
        if name == "p99" and rates["raw"][2]:
            passed = ratio <= LATENCY_TARGET and rates["sb"][2]
        results.append(
            CaseResult(
                case=CASE,
                title=f"latency {name}, publish to handler, {rate:,}/s for {seconds} s",
                server=server.kind,
                unit="ms",
                sb=median([r[name] for r in sb_runs]),
                raw=median([r[name] for r in raw_runs]),
                ratio=ratio,
                target="(info)" if name == "p50" else f"<= {LATENCY_TARGET:.2f} (sb / raw)",
                passed=passed,
                ratio_range=(min(ratios), max(ratios)),
                sb_text=texts[name]["sb"],
                raw_text=texts[name]["raw"],
                sb_runs=[r[name] for r in sb_runs],
                raw_runs=[r[name] for r in raw_runs],
                details={
                    "rate": rate,
                    "seconds": seconds,
                    "warmup_seconds": WARMUP,
                    "count": count,
                    "ratio_is": "streambroker / raw latency (lower is better)",
                    "rate_kept": {face: rates[face][2] for face in faces},
                    "sent_rate": {face: rates[face][0] for face in faces},
                    "received_rate": {face: rates[face][1] for face in faces},
                    "sb": sb_runs,
                    "raw": raw_runs,
                },
            )
        )
    return results


def bench_latency(
    server: BenchServer, runs: int, seconds: int, count: int, limit: float
) -> list[CaseResult]:
    """(9) Publish-to-handler latency at each of ``RATES``, ``seconds`` counted per run."""
    results: list[CaseResult] = []
    for rate in RATES:
        sb_runs: list[dict[str, Any]] = []
        raw_runs: list[dict[str, Any]] = []
        for i in range(runs):
            faces = [("sb", sb_runs), ("raw", raw_runs)]
            if i % 2:
                faces.reverse()
            for face, into in faces:
                into.append(_run_pair(server, face, rate, seconds, count, limit))
            sb, raw = sb_runs[-1], raw_runs[-1]
            log(
                f"  {server.kind} latency {rate:,}/s run {i + 1}/{runs}: streambroker p50 "
                f"{sb['p50']:.3f} p99 {sb['p99']:.3f} max {sb['max']:.2f} ms at "
                f"{sb['sent_rate']:,.0f}/{sb['rate']:,.0f}/s in {sb['round_trips']:,} round "
                f"trips, raw p50 {raw['p50']:.3f} p99 {raw['p99']:.3f} max {raw['max']:.2f} ms "
                f"at {raw['sent_rate']:,.0f}/{raw['rate']:,.0f}/s in {raw['round_trips']:,}"
            )
        for face, face_runs in (("streambroker", sb_runs), ("raw", raw_runs)):
            sent, received, kept = _kept(face_runs, rate)
            if not kept:
                log(
                    f"  {server.kind} latency: {face} did not keep {rate:,}/s (sent at "
                    f"{sent:,.0f}/s, received at {received:,.0f}/s)"
                )
        results.extend(_results(server, rate, seconds, count, sb_runs, raw_runs))
    return results


def main() -> None:
    serve(ROLES)


if __name__ == "__main__":
    main()
