"""The benchmarks that run in separate processes: end to end (4) and memory (6)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from .common import GROUP, STREAM, Filler, LengthSampler, check, median, raw_client
from .results import CaseResult, log, throughput_result
from .servers import BenchServer

ROOT = Path(__file__).resolve().parent.parent

E2E_TARGET = 2.0
#: Growth of resident memory from the first mark to the last still called flat.
FLAT_SHARE = 0.10
FLAT_MIB = 4.0


class Worker:
    """A ``bench.worker`` (or ``module``) child process, talked to by JSON lines."""

    def __init__(self, settings: dict[str, Any], module: str = "bench.worker") -> None:
        self.role = settings["role"]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(settings)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")

    def message(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the process prints (other lines are skipped, e.g. a
        profiler's); raises if it exits or stays silent ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.role}: no answer within {timeout} s") from None
            if not line:
                self.process.wait(timeout=10)
                self._stderr.seek(0)
                errors = self._stderr.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"{self.role} exited ({self.process.returncode}): {errors}")
            if line.startswith("{"):
                message: dict[str, Any] = json.loads(line)
                return message

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def close(self) -> None:
        """Wait for the process to end (it ends by itself); kill it if it does not."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.close()


def fresh_stream(server: BenchServer, face: str) -> None:
    """Flush ``server``; for the raw face, create the group its consumer reads (the
    broker's consumer creates its own)."""
    server.flush()
    if face == "raw":
        client = raw_client(server.address)
        try:
            client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        finally:
            client.close()


def _run_pair(
    server: BenchServer, face: str, n: int, batch: int, count: int, limit: float
) -> dict[str, Any]:
    """One end-to-end run: a producer and a consumer process until every event is acked."""
    fresh_stream(server, face)
    common = {"address": server.address, "events": n, "limit": limit}
    consumer = Worker({**common, "role": f"{face}-consumer", "count": count, "block": True})
    producer = Worker({**common, "role": f"{face}-producer", "batch": batch})
    try:
        consumer.message(60)
        producer.message(60)
        with LengthSampler(server.address, limit=limit) as sampler:
            start = time.monotonic()
            consumer.go()
            producer.go()
            produced = producer.message(limit + 30)
            consumed = consumer.message(limit + 30)
    finally:
        consumer.close()
        producer.close()
    check(consumed["handled"] == n, f"{face} e2e: handled {consumed['handled']} of {n}")
    client = raw_client(server.address)
    try:
        pending = int(client.xpending(STREAM, GROUP)["pending"])
        final_length = int(client.xlen(STREAM))
    finally:
        client.close()
    check(pending == 0, f"{face} e2e: {pending} events left pending")
    return {
        "seconds": consumed["end"] - start,
        "producer_seconds": produced["end"] - start,
        "length": sampler.summary(),
        "final_length": final_length,
    }


def bench_e2e(
    server: BenchServer, runs: int, n: int, batch: int, count: int, limit: float
) -> list[CaseResult]:
    """(4) A producer and a consumer process, ``n`` events, until all are acknowledged;
    and (5b) the stream's length sampled meanwhile."""
    sb_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    for i in range(runs):
        faces = [("sb", sb_runs), ("raw", raw_runs)]
        if i % 2:
            faces.reverse()
        for face, into in faces:
            into.append(_run_pair(server, face, n, batch, count, limit))
        log(
            f"  {server.kind} e2e run {i + 1}/{runs}: streambroker "
            f"{n / sb_runs[-1]['seconds']:,.0f}/s (stream length median "
            f"{sb_runs[-1]['length']['median']:,.0f}), raw {n / raw_runs[-1]['seconds']:,.0f}/s"
        )
    sb_rates = [n / r["seconds"] for r in sb_runs]
    raw_rates = [n / r["seconds"] for r in raw_runs]
    e2e = throughput_result(
        "4",
        f"end to end, 2 processes, batches of {batch} / count={count:,}",
        server.kind,
        sb_rates,
        raw_rates,
        E2E_TARGET,
        {
            "events": n,
            "producer_batch": batch,
            "count": count,
            "sb_producer_rate": median([n / r["producer_seconds"] for r in sb_runs]),
            "raw_producer_rate": median([n / r["producer_seconds"] for r in raw_runs]),
        },
    )
    sb_length = median([r["length"]["median"] for r in sb_runs])
    sb_max = max(r["length"]["max"] for r in sb_runs)
    raw_length = median([r["length"]["median"] for r in raw_runs])
    raw_max = max(r["length"]["max"] for r in raw_runs)
    sb_final = max(r["final_length"] for r in sb_runs)
    length = CaseResult(
        case="5b",
        title="stream length (XLEN) while (4) runs",
        server=server.kind,
        unit="entries",
        sb=sb_length,
        raw=raw_length,
        ratio=None,
        target="(info) 0 left at the end",
        passed=sb_final == 0,
        sb_text=f"median {sb_length:,.0f}, max {sb_max:,.0f}, end {sb_final:,}",
        raw_text=f"median {raw_length:,.0f}, max {raw_max:,.0f}",
        details={
            "sb_runs": [r["length"] | {"final": r["final_length"]} for r in sb_runs],
            "raw_runs": [r["length"] | {"final": r["final_length"]} for r in raw_runs],
            "note": "raw consumers acknowledge but never trim, so their stream keeps everything",
        },
    )
    return [e2e, length]


def _memory_run(
    server: BenchServer, face: str, n: int, count: int, filler: Filler, limit: float
) -> dict[str, Any]:
    server.flush()
    filler.fill(n)
    if face == "raw":
        client = raw_client(server.address)
        try:
            client.xgroup_create(STREAM, GROUP, id="0")
        finally:
            client.close()
    marks = sorted({max(1, n // 10), max(1, n // 2), n})
    worker = Worker(
        {
            "role": f"{face}-consumer",
            "address": server.address,
            "events": n,
            "count": count,
            "block": False,
            "limit": limit,
            "marks": marks,
        }
    )
    try:
        worker.message(60)
        worker.go()
        result = worker.message(limit + 30)
    finally:
        worker.close()
    check(result["handled"] == n, f"{face} memory: handled {result['handled']} of {n}")
    return result


def short_count(n: int) -> str:
    """``100000`` as ``100k``, ``1000000`` as ``1M``."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{suffix}"
    return f"{n:,}"


def _marks_text(rss: dict[str, float]) -> str:
    values = [rss[k] for k in sorted(rss, key=int)]
    return " / ".join(f"{v:.1f}" for v in values)


def bench_memory(
    server: BenchServer, n: int, count: int, filler: Filler, limit: float
) -> CaseResult:
    """(6) Resident memory of a consumer process handling ``n`` events."""
    results = {face: _memory_run(server, face, n, count, filler, limit) for face in ("sb", "raw")}

    def growth(result: dict[str, Any]) -> tuple[float, float]:
        rss = [result["rss_mib"][k] for k in sorted(result["rss_mib"], key=int)]
        return rss[0], rss[-1] - rss[0]

    first, grew = growth(results["sb"])
    flat = grew <= max(FLAT_MIB, first * FLAT_SHARE)
    marks = _marks_text(results["sb"]["rss_mib"])
    raw_marks = _marks_text(results["raw"]["rss_mib"])
    labels = " / ".join(short_count(int(k)) for k in sorted(results["sb"]["rss_mib"], key=int))
    log(f"  {server.kind} memory: RSS MiB after {labels}: streambroker {marks}, raw {raw_marks}")
    return CaseResult(
        case="6",
        title=f"consumer RSS (MiB) after {labels} events",
        server=server.kind,
        unit="MiB",
        sb=results["sb"]["peak_rss_mib"],
        raw=results["raw"]["peak_rss_mib"],
        ratio=None,
        target=f"flat (+<= {FLAT_MIB:.0f} MiB or {FLAT_SHARE:.0%})",
        passed=flat,
        sb_text=f"{marks} (peak {results['sb']['peak_rss_mib']:.1f})",
        raw_text=f"{raw_marks} (peak {results['raw']['peak_rss_mib']:.1f})",
        details={"events": n, "count": count, "growth_mib": grew, "first_mib": first}
        | {"sb": results["sb"], "raw": results["raw"]},
    )
