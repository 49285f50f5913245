"""One benchmark's figures, and the comparison loop every throughput case uses."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

from .common import median

#: Wide enough for the table even when the output is not a terminal.
console = Console(highlight=False, width=max(shutil.get_terminal_size((160, 40)).columns, 120))


def log(message: str) -> None:
    """A progress line."""
    console.print(f"[dim]{message}[/dim]")


@dataclass
class CaseResult:
    """The figures of one case on one server.

    ``sb`` and ``raw`` are medians in ``unit``. ``ratio`` is streambroker / raw as a
    throughput (higher is better): the median of the ratios of the runs, each run
    measuring both faces back to back, so that a slow spell of the machine weighs on
    both; ``ratio_range`` is the lowest and highest of those ratios. None where a
    ratio means nothing. ``passed`` is None for figures without a target.
    """

    case: str
    title: str
    server: str
    unit: str
    sb: float | None
    raw: float | None
    ratio: float | None
    target: str
    passed: bool | None
    ratio_range: tuple[float, float] | None = None
    sb_text: str = ""
    raw_text: str = ""
    sb_runs: list[float] = field(default_factory=list)
    raw_runs: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: A timed run of one face: takes the number of events, returns the seconds measured.
Run = Callable[[int], float]


def compare(
    label: str,
    runs: int,
    n: int,
    sb_run: Run,
    raw_run: Run,
    prepare: Callable[[int], None],
    warmup: int = 0,
) -> tuple[list[float], list[float]]:
    """Throughputs (events/s) of ``runs`` runs of each face, alternating which goes first.

    ``prepare(events)`` runs before every run of ``events`` events (it flushes the
    server, and may fill it); ``warmup`` events are run once per face first and not
    counted.
    """
    if warmup:
        for run in (sb_run, raw_run):
            prepare(warmup)
            run(warmup)
    sb_rates: list[float] = []
    raw_rates: list[float] = []
    for i in range(runs):
        faces = [("sb", sb_run, sb_rates), ("raw", raw_run, raw_rates)]
        if i % 2:
            faces.reverse()
        for _, run, rates in faces:
            prepare(n)
            gc.collect()
            seconds = run(n)
            rates.append(n / seconds)
        log(
            f"  {label} run {i + 1}/{runs}: streambroker {sb_rates[-1]:,.0f}/s, "
            f"raw {raw_rates[-1]:,.0f}/s, ratio {sb_rates[-1] / raw_rates[-1]:.2f}"
        )
    return sb_rates, raw_rates


def throughput_result(
    case: str,
    title: str,
    server: str,
    sb_rates: list[float],
    raw_rates: list[float],
    minimum: float | None,
    details: dict[str, Any] | None = None,
    target: str | None = None,
) -> CaseResult:
    """A result from the throughputs of paired runs; passes when the median of the runs'
    ratios is ``minimum`` or more."""
    sb = median(sb_rates)
    raw = median(raw_rates)
    ratios = [s / r for s, r in zip(sb_rates, raw_rates, strict=True)]
    ratio = median(ratios)
    return CaseResult(
        case=case,
        title=title,
        server=server,
        unit="events/s",
        sb=sb,
        raw=raw,
        ratio=ratio,
        target=target if target is not None else (f">= {minimum:.2f}" if minimum else ""),
        passed=None if minimum is None else ratio >= minimum,
        ratio_range=(min(ratios), max(ratios)),
        sb_text=f"{sb:,.0f}/s",
        raw_text=f"{raw:,.0f}/s",
        sb_runs=sb_rates,
        raw_runs=raw_rates,
        details={"ratio_of_medians": sb / raw, "ratios": ratios} | (details or {}),
    )
