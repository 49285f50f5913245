"""Case 11 (``ackdel``): acknowledge-and-delete on the server (``XACKDEL``, Redis 8.2+)
against what the broker does (``XACK``, and its collect script at most every 50 ms).

Both sides are raw redis-py loops over the same pre-filled stream, shaped as the
broker's consumer: ``XREADGROUP COUNT n``, decode each body with msgspec, and
acknowledge the batch with the next read, in one round trip.

- (a) ``XACK``, plus the broker's collect script (:data:`COLLECT_SCRIPT`, as a consumer
  sends it) in the acking round trip when 50 ms passed since the last one;
- (b) ``XACKDEL key group ACKED IDS n id…``, which deletes what every group on the
  server acknowledged.

Both run the collect script once at the end (for (b), for what ``ACKED`` could not
remove), then check that the stream is empty and nothing is pending. With two groups,
both read the whole stream in turn (one round trip each), so ``ACKED`` deletes an entry
only at the second group's acknowledgement. ``INFO commandstats`` gives the server's
time per entry of ``XACK``, ``XACKDEL`` and ``EVALSHA`` (the script).

(c) The cost of removing alone: the collect script removing ``n`` acknowledged entries
(one ``XTRIM MINID``), against ``XACKDEL`` of the same ``n`` entries, read but not yet
acknowledged, in calls of 1,000 ids (``XACKDEL`` removes only what it acknowledges) and
``XACK`` of them (acknowledging alone), by the server's time.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from streambroker.core.gc import COLLECT_SCRIPT, collect_command

from .common import STREAM, Filler, Stopwatch, check, handle_raw, median, raw_client
from .results import CaseResult, log
from .servers import BenchServer

#: The broker's consumers collect at most this often (seconds).
COLLECT_EVERY = 0.05
GROUP_SETS = (("g1",), ("g1", "g2"))
COUNTS = (100, 1000)
MODES = ("xack", "xackdel")
#: Ids per call in (c).
CALL_IDS = 1000


def has_xackdel(server: BenchServer) -> bool:
    """Whether ``server`` has ``XACKDEL`` (Redis 8.2+)."""
    client = raw_client(server.address)
    try:
        return bool(client.command_list(pattern="xackdel"))
    finally:
        client.close()


def _stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """(calls, usec) of each command since the last ``CONFIG RESETSTAT``."""
    return {
        name.removeprefix("cmdstat_"): (int(stat["calls"]), int(stat["usec"]))
        for name, stat in client.info("commandstats").items()
    }


def _prepare(server: BenchServer, filler: Filler, n: int, groups: tuple[str, ...]) -> None:
    """The stream with ``n`` events and ``groups`` at its start; the script loaded."""
    filler.afresh(n)
    client = raw_client(server.address)
    try:
        for group in groups:
            client.xgroup_create(STREAM, group, id="0")
        client.script_load(COLLECT_SCRIPT.text)
    finally:
        client.close()


def _ack(mode: str, group: str, ids: list[bytes]) -> tuple[Any, ...]:
    if mode == "xack":
        return ("XACK", STREAM, group, *ids)
    return ("XACKDEL", STREAM, group, "ACKED", "IDS", len(ids), *ids)


def consume(
    server: BenchServer, n: int, count: int, groups: tuple[str, ...], mode: str
) -> dict[str, Any]:
    """One timed run of (a) (``mode`` ``xack``) or (b) (``xackdel``) over ``n`` events:
    its seconds and the server's time per entry of each command."""
    client = raw_client(server.address)
    collect = collect_command(STREAM, groups)
    unacked: dict[str, list[bytes]] = {group: [] for group in groups}
    done: set[str] = set()
    handled = 0
    collected = 0
    rounds = 0
    try:
        client.config_resetstat()
        with Stopwatch() as sw:
            next_collect = time.monotonic() + COLLECT_EVERY
            while len(done) < len(groups):
                for group in groups:
                    if group in done:
                        continue
                    pipe = client.pipeline(transaction=False)
                    ids = unacked[group]
                    if ids:
                        pipe.execute_command(*_ack(mode, group, ids))
                    collecting = mode == "xack" and bool(ids) and time.monotonic() >= next_collect
                    if collecting:
                        pipe.execute_command(*collect)
                    pipe.execute_command(
                        "XREADGROUP", "GROUP", group, "c", "COUNT", count, "STREAMS", STREAM, ">"
                    )
                    replies = pipe.execute()
                    rounds += 1
                    if collecting:
                        collected += sum(int(x) for x in replies[-2][:2])
                        next_collect = time.monotonic() + COLLECT_EVERY
                    unacked[group] = [] if not replies[-1] else handle_raw(replies[-1][0][1])
                    handled += len(unacked[group])
                    if not unacked[group]:
                        done.add(group)
            reply = client.execute_command(*collect)
        at_end = sum(int(x) for x in reply[:2])
        stats = _stats(client)
        check(handled == n * len(groups), f"ackdel: handled {handled} of {n * len(groups)}")
        check(int(client.xlen(STREAM)) == 0, f"ackdel ({mode}): the stream is not empty")
        for group in groups:
            pending = int(client.xpending(STREAM, group)["pending"])
            check(pending == 0, f"ackdel ({mode}): {pending} pending in {group}")
    finally:
        client.close()
    acked = n * len(groups)
    ack_calls, ack_usec = stats.get(mode, (0, 0))
    script_calls, script_usec = stats.get("evalsha", (0, 0))
    removed = collected + at_end
    return {
        "seconds": sw.seconds,
        "round_trips": rounds,
        "ack_calls": ack_calls,
        "ack_usec_per_entry": ack_usec / acked,
        "script_calls": script_calls,
        "script_removed": removed,
        "script_removed_at_end": at_end,
        "script_usec_per_removed": script_usec / removed if removed else None,
        # Everything the server spent acknowledging and removing, per event.
        "server_usec_per_event": (ack_usec + script_usec) / n,
    }


def _read_all(client: redis.Redis, group: str) -> list[bytes]:
    """Deliver every entry to ``group`` (untimed); their ids."""
    ids: list[bytes] = []
    while reply := client.xreadgroup(group, "c", {STREAM: ">"}, count=10_000):
        ids.extend(event_id for event_id, _ in reply[0][1])
    return ids


def remove_only(server: BenchServer, filler: Filler, n: int, how: str) -> dict[str, Any]:
    """(c): ``how`` is ``script`` (the collect script, the entries acknowledged),
    ``xackdel`` or ``xack`` (of the delivered entries, :data:`CALL_IDS` a call)."""
    _prepare(server, filler, n, ("g1",))
    client = raw_client(server.address)
    try:
        ids = _read_all(client, "g1")
        if how == "script":
            for start in range(0, n, CALL_IDS):
                client.xack(STREAM, "g1", *ids[start : start + CALL_IDS])
        client.config_resetstat()
        with Stopwatch() as sw:
            if how == "script":
                client.execute_command(*collect_command(STREAM, ("g1",)))
            else:
                for start in range(0, n, CALL_IDS):
                    client.execute_command(*_ack(how, "g1", ids[start : start + CALL_IDS]))
        stats = _stats(client)
        left = int(client.xlen(STREAM))
        check(left == (n if how == "xack" else 0), f"ackdel (c, {how}): {left} left")
    finally:
        client.close()
    calls, usec = stats["evalsha" if how == "script" else how]
    return {"seconds": sw.seconds, "calls": calls, "server_usec": usec}


def bench_ackdel(server: BenchServer, runs: int, n: int, filler: Filler) -> list[CaseResult]:
    """Case 11 on ``server`` (one with ``XACKDEL``): (a) against (b) for one and two groups
    and each of :data:`COUNTS`, then (c)."""
    check(has_xackdel(server), f"ackdel: {server.version()} has no XACKDEL")
    results = []
    for groups in GROUP_SETS:
        for count in COUNTS:
            label = f"{len(groups)} group{'s' if len(groups) > 1 else ''}, count={count:,}"
            for mode in MODES:  # warm-up
                _prepare(server, filler, min(n, count * 5), groups)
                consume(server, min(n, count * 5), count, groups, mode)
            measured: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for i in range(runs):
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    _prepare(server, filler, n, groups)
                    measured[mode].append(consume(server, n, count, groups, mode))
                a, b = (measured[mode][-1]["seconds"] for mode in MODES)
                log(
                    f"  ackdel {label} run {i + 1}/{runs}: XACK + script {n / a:,.0f}/s, "
                    f"XACKDEL {n / b:,.0f}/s, ratio {a / b:.2f}"
                )
            results.append(_consume_result(server.kind, groups, count, n, measured))
    results.append(_remove_result(server, filler, runs, n))
    return results


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over ``runs`` (None where no run has it)."""
    medians: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        medians[key] = median(values) if values else None
    return medians


def _consume_result(
    kind: str,
    groups: tuple[str, ...],
    count: int,
    n: int,
    measured: dict[str, list[dict[str, Any]]],
) -> CaseResult:
    a_rates = [n / r["seconds"] for r in measured["xack"]]
    b_rates = [n / r["seconds"] for r in measured["xackdel"]]
    ratios = [b / a for a, b in zip(a_rates, b_rates, strict=True)]
    a, b = _medians(measured["xack"]), _medians(measured["xackdel"])
    return CaseResult(
        case=f"11/{len(groups)}g/{count}",
        title=(
            f"ack and delete, {len(groups)} group{'s' if len(groups) > 1 else ''}, "
            f"count={count:,}: XACK + collect script vs XACKDEL ACKED (us: server time per entry)"
        ),
        server=kind,
        unit="events/s",
        sb=median(a_rates),
        raw=median(b_rates),
        ratio=median(ratios),
        target="(info)",
        passed=None,
        ratio_range=(min(ratios), max(ratios)),
        sb_text=(
            f"{median(a_rates):,.0f}/s, "
            f"{a['ack_usec_per_entry']:.3f}+{a['script_usec_per_removed']:.3f} us"
        ),
        raw_text=f"{median(b_rates):,.0f}/s, {b['ack_usec_per_entry']:.3f} us",
        sb_runs=a_rates,
        raw_runs=b_rates,
        details={
            "events": n,
            "count": count,
            "groups": len(groups),
            "ratios": ratios,
            "xack": a,
            "xackdel": b,
        },
    )


def _remove_result(server: BenchServer, filler: Filler, runs: int, n: int) -> CaseResult:
    hows = ("script", "xackdel", "xack")
    measured: dict[str, list[dict[str, Any]]] = {how: [] for how in hows}
    for i in range(runs):
        for how in hows if i % 2 == 0 else hows[::-1]:
            measured[how].append(remove_only(server, filler, n, how))
    usec = {how: median([float(r["server_usec"]) for r in measured[how]]) for how in hows}
    seconds = {how: median([r["seconds"] for r in measured[how]]) for how in hows}
    log(
        f"  ackdel remove {n:,}: script {usec['script'] / 1000:.1f} ms, XACKDEL "
        f"{usec['xackdel'] / 1000:.1f} ms, XACK {usec['xack'] / 1000:.1f} ms (server time)"
    )
    return CaseResult(
        case="11/c",
        title=(
            f"removing {n:,} entries, server time: collect script (acknowledged) / "
            f"XACKDEL (pending; XACK of them alone), {CALL_IDS:,} ids a call"
        ),
        server=server.kind,
        unit="s",
        sb=usec["script"] / 1e6,
        raw=usec["xackdel"] / 1e6,
        ratio=None,
        target="(info)",
        passed=None,
        sb_text=f"{usec['script'] / 1000:.1f} ms, {usec['script'] / n:.3f} us",
        raw_text=(
            f"{usec['xackdel'] / 1000:.1f} ms, {usec['xackdel'] / n:.3f} us "
            f"(XACK {usec['xack'] / n:.3f})"
        ),
        details={
            "events": n,
            "ids_per_call": CALL_IDS,
            "server_usec": usec,
            "wall_seconds": seconds,
            "runs": {how: [r["server_usec"] for r in measured[how]] for how in hows},
        },
    )
