"""(8) A cluster of three masters against one server, in the same run.

Batch publish by two producer processes, then consume + ack by two consumer processes,
over six streams whose keys hash to the three masters (two each); on the cluster and on
one server of the same kind, streambroker (a ``redis+cluster://`` pool on the cluster)
against raw redis-py (``RedisCluster`` pipelines on the cluster, ``redis.Redis``
pipelines on the server).

``python -m bench.cluster '<json settings>'`` is one of those processes, run as
``bench.worker``'s are: it sets itself up, prints ``{"ready": true}``, waits for ``go``,
works, prints one JSON line of results.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count as counting
from pathlib import Path
from typing import Any

import redis
import redis.cluster
from redis.crc import key_slot
from tests.servers import CLUSTER_SLOT_RANGES, ClusterSet

import streambroker as sb

from .common import check, handle_raw, make_body, median, raw_client, raw_fields
from .processes import Worker
from .results import CaseResult, log, throughput_result
from .servers import BenchServer
from .worker import _ready_then_wait, consume_within, serve

PROCESSES = 2
GROUPS = tuple(f"g{index}" for index in range(PROCESSES))


def _streams() -> tuple[str, ...]:
    """Six stream names: the first three on the three masters in turn, then three more."""
    by_master: list[list[str]] = [[] for _ in CLUSTER_SLOT_RANGES]
    for index in counting():
        slot = key_slot(f"bench-{index}".encode())
        master = next(i for i, (low, high) in enumerate(CLUSTER_SLOT_RANGES) if low <= slot <= high)
        if len(by_master[master]) < PROCESSES:
            by_master[master].append(f"bench-{index}")
        if all(len(names) == PROCESSES for names in by_master):
            return tuple(names[turn] for turn in range(PROCESSES) for names in by_master)
    raise AssertionError("unreachable")


#: Event ``seq`` goes to ``STREAMS[seq % 6]``; consumer ``c`` reads ``streams_of(c)``
#: (one stream on each master) in group ``GROUPS[c]``.
STREAMS = _streams()


def streams_of(consumer: int) -> tuple[str, ...]:
    per = len(STREAMS) // PROCESSES
    return STREAMS[consumer * per : (consumer + 1) * per]


def expected(n: int) -> dict[str, int]:
    """How many of ``n`` events each stream gets."""
    return {stream: len(range(i, n, len(STREAMS))) for i, stream in enumerate(STREAMS)}


def bench_registry(address: str) -> sb.ValidatedRegistry:
    """The case's registry: the six streams, each read by its consumer's group."""
    reg = sb.Registry()
    reg.register_redis(address)
    for consumer, group in enumerate(GROUPS):
        for stream in streams_of(consumer):
            reg.register_stream(stream, "default", [group])
    return reg.validate()


def _raw(settings: dict[str, Any]) -> Any:
    """The raw client: ``RedisCluster`` knowing every master, or ``redis.Redis``."""
    nodes = settings["nodes"]
    if not settings["cluster"]:
        return raw_client(nodes[0])
    startup = []
    for node in nodes:
        host, _, port = node.rpartition(":")
        startup.append(redis.cluster.ClusterNode(host, int(port)))
    return redis.cluster.RedisCluster(startup_nodes=startup, socket_timeout=60)


# -- the processes -----------------------------------------------------------------


def _timed(work: Callable[[], int]) -> dict[str, Any]:
    _ready_then_wait()
    start = time.monotonic()
    done = work()
    return {"start": start, "end": time.monotonic(), "done": done}


def sb_producer(settings: dict[str, Any]) -> dict[str, Any]:
    first, last, size = settings["first"], settings["last"], settings["batch"]
    with bench_registry(settings["address"]).broker() as broker:
        for stream in STREAMS:  # connects to every master, creates nothing
            broker.collect_garbage(stream)

        def work() -> int:
            for start in range(first, last, size):
                with broker.batch() as batch:
                    publish = batch.publish
                    for seq in range(start, min(last, start + size)):
                        publish(STREAMS[seq % len(STREAMS)], make_body(seq))
            return last - first

        return _timed(work)


def raw_producer(settings: dict[str, Any]) -> dict[str, Any]:
    first, last, size = settings["first"], settings["last"], settings["batch"]
    client = _raw(settings)
    try:
        _ping(client, settings["cluster"])

        def work() -> int:
            for start in range(first, last, size):
                pipe = client.pipeline(transaction=False)
                for seq in range(start, min(last, start + size)):
                    pipe.xadd(STREAMS[seq % len(STREAMS)], raw_fields(seq))
                pipe.execute()
            return last - first

        return _timed(work)
    finally:
        client.close()


def sb_consumer(settings: dict[str, Any]) -> dict[str, Any]:
    consumer_index, n, count = settings["consumer"], settings["events"], settings["count"]
    handled = [0]
    with bench_registry(settings["address"]).broker() as broker:
        consumer = broker.consumer(GROUPS[consumer_index], f"bench-consumer-{consumer_index}")
        for stream in streams_of(consumer_index):
            broker.collect_garbage(stream)

        def handler(events: list[sb.Event]) -> None:
            for event in events:
                event.body  # noqa: B018 - decoding is part of consuming
            handled[0] += len(events)
            if handled[0] >= n:
                consumer.stop()

        def work() -> int:
            consume_within(consumer, handler, count, False, settings["limit"])
            return handled[0]

        return _timed(work)


def raw_consumer(settings: dict[str, Any]) -> dict[str, Any]:
    """Rounds of a pipeline of one ``XREADGROUP`` a stream (a cluster refuses one over
    keys of several slots), then a pipeline of their ``XACK``s, until every stream is
    empty."""
    consumer_index, n, count = settings["consumer"], settings["events"], settings["count"]
    group, name = GROUPS[consumer_index], f"raw-consumer-{consumer_index}"
    streams = streams_of(consumer_index)
    client = _raw(settings)
    try:
        _ping(client, settings["cluster"])

        def work() -> int:
            handled = 0
            deadline = time.monotonic() + settings["limit"]
            while handled < n and time.monotonic() < deadline:
                pipe = client.pipeline(transaction=False)
                for stream in streams:
                    pipe.xreadgroup(group, name, {stream: ">"}, count=count)
                acks = client.pipeline(transaction=False)
                for reply in pipe.execute():
                    for key, entries in reply or ():
                        ids = handle_raw(entries)
                        acks.xack(key, group, *ids)
                        handled += len(ids)
                if not len(acks):
                    break
                acks.execute()
            return handled

        return _timed(work)
    finally:
        client.close()


def _ping(client: Any, cluster: bool) -> None:
    """Connect to every node before the clock starts."""
    if cluster:
        client.ping(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    else:
        client.ping()


ROLES = {
    "sb-producer": sb_producer,
    "raw-producer": raw_producer,
    "sb-consumer": sb_consumer,
    "raw-consumer": raw_consumer,
}


def main() -> None:
    serve(ROLES)


# -- the case ----------------------------------------------------------------------


@dataclass
class Target:
    """Where a run goes: the cluster or the single server."""

    name: str
    #: streambroker's address of it.
    address: str
    #: ``host:port`` of the masters (of the server).
    nodes: list[str]
    flush: Callable[[], None]

    @property
    def cluster(self) -> bool:
        return self.name == "cluster"

    def client(self) -> Any:
        return _raw({"nodes": self.nodes, "cluster": self.cluster})


def _phase(target: Target, settings: list[dict[str, Any]], limit: float) -> float:
    """Seconds from ``go`` until the last of the processes is done."""
    common = {"address": target.address, "nodes": target.nodes, "cluster": target.cluster}
    workers = [Worker(common | s | {"limit": limit}, module="bench.cluster") for s in settings]
    try:
        for worker in workers:
            worker.message(60)
        start = time.monotonic()
        for worker in workers:
            worker.go()
        results = [worker.message(limit + 30) for worker in workers]
    finally:
        for worker in workers:
            worker.close()
    for wanted, result in zip(settings, results, strict=True):
        should = wanted["events"] if "events" in wanted else wanted["last"] - wanted["first"]
        done = result["done"]
        check(done == should, f"cluster case {wanted['role']}: {done} events of {should}")
    return float(max(result["end"] for result in results) - start)


def _run(
    target: Target, face: str, n: int, batch: int, count: int, limit: float
) -> tuple[float, float]:
    """One run of ``face`` on ``target``: (publish rate, consume rate) in events/s."""
    target.flush()
    per_stream = expected(n)
    client = target.client()
    try:
        for consumer, group in enumerate(GROUPS):
            for stream in streams_of(consumer):
                client.xgroup_create(stream, group, id="0", mkstream=True)
        bounds = [n * p // PROCESSES for p in range(PROCESSES + 1)]
        producers = [
            {"role": f"{face}-producer", "first": bounds[p], "last": bounds[p + 1], "batch": batch}
            for p in range(PROCESSES)
        ]
        publish = _phase(target, producers, limit)
        for stream, length in per_stream.items():
            check(client.xlen(stream) == length, f"cluster case: {stream} has a wrong length")
        consumers = [
            {
                "role": f"{face}-consumer",
                "consumer": c,
                "events": sum(per_stream[s] for s in streams_of(c)),
                "count": count,
            }
            for c in range(PROCESSES)
        ]
        consume = _phase(target, consumers, limit)
        for consumer, group in enumerate(GROUPS):
            for stream in streams_of(consumer):
                pending = int(client.xpending(stream, group)["pending"])
                check(pending == 0, f"cluster case: {pending} events left pending in {stream}")
    finally:
        client.close()
    return n / publish, n / consume


@contextmanager
def started_cluster(server: BenchServer) -> Iterator[ClusterSet]:
    """A cluster of three masters of ``server``'s kind, in a temporary directory."""
    directory = Path(tempfile.mkdtemp(prefix="sb-bench-cluster-"))
    cluster = ClusterSet(server.kind, server.binary, directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def bench_cluster(
    server: BenchServer, runs: int, n: int, batch: int, count: int, limit: float
) -> list[CaseResult]:
    """(8) Batch publish, then consume + ack, by two processes each, on a cluster of three
    masters and on ``server``; streambroker against raw redis-py on each."""
    with started_cluster(server) as cluster:
        targets = [
            Target("cluster", cluster.url(), [m.address for m in cluster.masters], cluster.flush),
            Target("server", server.address, [server.address], server.flush),
        ]
        rates: dict[tuple[str, str], list[tuple[float, float]]] = {
            (target.name, face): [] for target in targets for face in ("sb", "raw")
        }
        for i in range(runs):
            for target in targets:
                faces = ["sb", "raw"] if i % 2 == 0 else ["raw", "sb"]
                for face in faces:
                    rates[target.name, face].append(_run(target, face, n, batch, count, limit))
                sb_rate, raw_rate = rates[target.name, "sb"][-1], rates[target.name, "raw"][-1]
                log(
                    f"  {server.kind} {target.name} run {i + 1}/{runs}: publish streambroker "
                    f"{sb_rate[0]:,.0f}/s, raw {raw_rate[0]:,.0f}/s; consume streambroker "
                    f"{sb_rate[1]:,.0f}/s, raw {raw_rate[1]:,.0f}/s"
                )
    details = {"events": n, "batch": batch, "count": count, "streams": list(STREAMS)}
    results = []
    for target, label in (("cluster", "cluster of 3 masters"), ("server", "one server")):
        for phase, (case, what) in enumerate(
            ((f"8/2{target[0]}", f"batches of {batch:,}"), (f"8/3{target[0]}", f"count={count:,}"))
        ):
            results.append(
                throughput_result(
                    case,
                    f"{label}: {('batch publish', 'consume + ack')[phase]}, "
                    f"{PROCESSES} processes, {what}, {len(STREAMS)} streams",
                    server.kind,
                    [r[phase] for r in rates[target, "sb"]],
                    [r[phase] for r in rates[target, "raw"]],
                    None,
                    details,
                    target="(info)",
                )
            )
    results.append(_scaling(server.kind, rates))
    return results


def _scaling(kind: str, rates: dict[tuple[str, str], list[tuple[float, float]]]) -> CaseResult:
    """Cluster / one server, per face and phase: medians of the runs' ratios."""
    factors = {
        (face, phase): median(
            [
                c[phase] / s[phase]
                for c, s in zip(rates["cluster", face], rates["server", face], strict=True)
            ]
        )
        for face in ("sb", "raw")
        for phase in (0, 1)
    }

    def text(face: str) -> str:
        return f"publish x{factors[face, 0]:.2f}, consume x{factors[face, 1]:.2f}"

    return CaseResult(
        case="8/x",
        title="cluster / one server (the 3 servers and the clients share the cores)",
        server=kind,
        unit="x",
        sb=factors["sb", 0],
        raw=factors["raw", 0],
        ratio=None,
        target="(info)",
        passed=None,
        sb_text=text("sb"),
        raw_text=text("raw"),
        details={
            f"{face}_{('publish', 'consume')[phase]}": v for (face, phase), v in factors.items()
        },
    )


if __name__ == "__main__":
    main()
