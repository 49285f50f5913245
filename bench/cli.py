"""The command line: ``python -m bench [--quick] [options]``."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import ackdel, async_cases, cases, cluster, latency, processes, report
from .common import Filler, registry
from .results import CaseResult, console, log
from .servers import BENCH_KINDS, REDIS8, SERVER_KINDS, BenchServer, start_servers

CASES = (
    "publish",
    "batch",
    "consume",
    "e2e",
    "gc",
    "memory",
    "async",
    "metrics",
    "latency",
    "cluster",
    "ackdel",
)
#: Cases that run only on a server of their own kind, started for them when selected.
OWN_SERVER = {"ackdel": REDIS8}
CASE_NUMBERS = {str(i): name for i, name in enumerate(CASES, start=1)}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"

#: Sizes of the full run, and of ``--quick``.
FULL = {
    "runs": 5,
    "publish_events": 20_000,
    "batch_events": 200_000,
    "consume_events": 200_000,
    "e2e_events": 200_000,
    "gc_events": 1_000_000,
    "memory_events": 1_000_000,
    "latency_seconds": 3,
}
QUICK = {
    "runs": 3,
    "publish_events": 2_000,
    "batch_events": 20_000,
    "consume_events": 20_000,
    "e2e_events": 20_000,
    "gc_events": 100_000,
    "memory_events": 100_000,
    "latency_seconds": 1,
}


def _positive(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _cases(text: str) -> list[str]:
    names = []
    for item in text.split(","):
        item = item.strip()
        name = CASE_NUMBERS.get(item, item)
        if name not in CASES:
            raise argparse.ArgumentTypeError(f"unknown case {item!r}: choose from {CASES}")
        names.append(name)
    return names


def _servers(text: str) -> list[str]:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    for kind in kinds:
        if kind not in BENCH_KINDS:
            raise argparse.ArgumentTypeError(f"unknown server {kind!r}: choose from {BENCH_KINDS}")
    return kinds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmarks of streambroker against the equivalent raw redis-py code, on servers "
            "it starts itself (the bundled Valkey, and redis-server when installed). Prints "
            "a table and writes the figures as JSON."
        ),
    )
    p.add_argument("--quick", action="store_true", help="fewer runs and smaller sizes (<1 min)")
    p.add_argument("--runs", type=_positive, help="runs per case; medians are reported (5)")
    p.add_argument(
        "--cases",
        type=_cases,
        default=list(CASES),
        help=f"comma-separated cases, by name or number: {','.join(CASES)} (all)",
    )
    p.add_argument(
        "--servers",
        type=_servers,
        default=list(SERVER_KINDS),
        help=(
            "comma-separated server kinds: valkey,redis,redis8 (valkey,redis; redis when "
            "installed; redis8, Redis 8.2, is started for the ackdel case anyway)"
        ),
    )
    sizes = p.add_argument_group("sizes (defaults: full run / --quick)")
    for key, help_text in (
        ("publish_events", "events published one at a time (1)"),
        ("batch_events", "events published in batches (2)"),
        ("consume_events", "events in the pre-filled stream consumed (3, 11)"),
        ("e2e_events", "events from producer to consumer process (4)"),
        ("gc_events", "acknowledged backlog collected (5)"),
        ("memory_events", "events handled by the measured consumer process (6)"),
        ("latency_seconds", "seconds counted per rate, face and run (9)"),
    ):
        sizes.add_argument(
            "--" + key.replace("_", "-"),
            type=_positive,
            help=f"{help_text} ({FULL[key]:,} / {QUICK[key]:,})",
        )
    sizes.add_argument("--batch-size", type=_positive, default=1000, help="batch size (1,000)")
    sizes.add_argument("--count", type=_positive, default=1000, help="consume count (1,000)")
    sizes.add_argument(
        "--e2e-batch", type=_positive, default=100, help="producer batch size in (4) (100)"
    )
    p.add_argument(
        "--limit",
        type=_positive,
        default=300,
        help="seconds after which a producer or consumer process gives up (300)",
    )
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON file written")
    p.add_argument(
        "--markdown", action="store_true", help="also print the table as Markdown at the end"
    )
    return p


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Every option, with the sizes of the full or quick run filled in."""
    base = QUICK if args.quick else FULL
    options = dict(vars(args))
    for key, value in base.items():
        if options.get(key) is None:
            options[key] = value
    options["output"] = str(args.output)
    return options


def run_server(
    server: BenchServer,
    options: dict[str, Any],
    selected: list[str],
    skipped: list[str],
    durations: dict[str, float],
) -> list[CaseResult]:
    """Every selected case on one server; ``durations`` gets each case's seconds."""
    runs = options["runs"]
    count = options["count"]
    limit = options["limit"]
    filler = Filler(server.address)

    def asyncio_face() -> list[CaseResult]:
        if not async_cases.available(registry(server.address)):
            note = "7 (asyncio face): skipped, streambroker has no async_broker yet"
            if note not in skipped:
                skipped.append(note)
            log(note)
            return []
        return [
            async_cases.bench_async_batch(
                server, runs, options["batch_events"], options["batch_size"]
            ),
            async_cases.bench_async_consume(server, runs, options["consume_events"], count, filler),
        ]

    runners: dict[str, Callable[[], list[CaseResult]]] = {
        "publish": lambda: [cases.bench_publish(server, runs, options["publish_events"])],
        "batch": lambda: [
            cases.bench_batch(server, runs, options["batch_events"], options["batch_size"])
        ],
        "consume": lambda: [
            cases.bench_consume(server, runs, options["consume_events"], count, filler, collect)
            for collect in (True, False)
        ],
        "e2e": lambda: processes.bench_e2e(
            server, runs, options["e2e_events"], options["e2e_batch"], count, limit
        ),
        "gc": lambda: [cases.bench_gc(server, runs, options["gc_events"], filler)],
        "memory": lambda: [
            processes.bench_memory(server, options["memory_events"], count, filler, limit)
        ],
        "async": asyncio_face,
        "metrics": lambda: [
            cases.bench_metrics(server, runs, options["consume_events"], count, filler)
        ],
        "latency": lambda: latency.bench_latency(
            server, runs, options["latency_seconds"], count, limit
        ),
        "cluster": lambda: cluster.bench_cluster(
            server, runs, options["e2e_events"], options["batch_size"], count, limit
        ),
        "ackdel": lambda: ackdel.bench_ackdel(server, runs, options["consume_events"], filler),
    }
    console.rule(f"{server.kind} on {server.address}")
    results: list[CaseResult] = []
    for name in CASES:
        if name in selected:
            start = time.monotonic()
            results.extend(runners[name]())
            durations[f"{server.kind}/{name}"] = round(time.monotonic() - start, 1)
            log(f"  {server.kind} {name}: {durations[f'{server.kind}/{name}']:.0f} s")
    server.flush()
    return results


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    options = resolve(args)
    selected: list[str] = options["cases"]
    started = time.monotonic()
    # The selected cases of each server kind: a case of its own server runs on that
    # kind alone, which is started for it when not asked for; the others on those asked.
    asked: list[str] = options["servers"]
    cases_of: dict[str, list[str]] = {}
    for kind in [*asked, *(OWN_SERVER[name] for name in selected if name in OWN_SERVER)]:
        names = [
            name
            for name in selected
            if OWN_SERVER.get(name) == kind or (name not in OWN_SERVER and kind in asked)
        ]
        if names:
            cases_of[kind] = names
    servers, missing = start_servers(list(cases_of))
    skipped = [f"server {kind}: not installed" for kind in missing]
    if not servers:
        raise SystemExit("no server to benchmark against")
    results: list[CaseResult] = []
    durations: dict[str, float] = {}
    load_before = _load()
    if load_before and load_before[0] > 0.5:
        console.print(
            f"[yellow]the machine is busy (load average {load_before[0]}): figures will be "
            "lower and noisier[/yellow]"
        )
    try:
        versions = {server.kind: server.version() for server in servers}
        for server in servers:
            results.extend(run_server(server, options, cases_of[server.kind], skipped, durations))
    finally:
        for server in servers:
            server.stop()
    order = {kind: i for i, kind in enumerate(BENCH_KINDS)}
    results.sort(key=lambda r: (_case_key(r.case), order[r.server]))
    env = report.environment(versions)
    env["seconds"] = round(time.monotonic() - started, 1)
    env["case_seconds"] = durations
    env["load_average"] = {"before": load_before, "after": _load()}
    console.print(report.table(results, env))
    for note in skipped:
        console.print(f"[yellow]skipped:[/yellow] {note}")
    console.print(f"took {env['seconds']:.0f} s")
    report.write_json(Path(options["output"]), results, env, options, skipped)
    if args.markdown:
        console.print(report.markdown(results), markup=False, soft_wrap=True)


def _load() -> list[float] | None:
    """The machine's load averages (1, 5, 15 min): another busy process skews the figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _case_key(case: str) -> tuple[int, str]:
    number, _, rest = case.partition("/")
    digits = "".join(ch for ch in number if ch.isdigit())
    return int(digits), number[len(digits) :] + rest
