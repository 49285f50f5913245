"""Making redis-py clients for pools.

The I/O layers use a client for its connection pool (each thread or task takes a
connection as it needs one): they write each round trip's commands, packed at once,
and read the raw RESP2 replies, which the I/O-free core parses itself, the same way
for the sync and async faces. Nothing is retried behind the caller's back (a re-sent
XADD could publish twice): the caller sees the failure, and consumers retry with
back-off and a log line themselves.

A Sentinel pool's connections go to the master the sentinels name: they are asked
when a connection opens, and at least every :data:`MASTER_CHECK_INTERVAL` seconds
while the pool is used, so that connections to a master that was switched are
closed (each goes to the new master next) instead of writing to a demoted one.

A cluster pool is a :class:`SyncCluster` or :class:`AsyncCluster`: redis-py's cluster
client serves only for the topology (the slot map, read again on :meth:`refresh`) and a
connection pool per node, whose connections read through the same counting parsers;
:mod:`~streambroker.routing` decides what goes where.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.exceptions as rex
import redis.sentinel
from redis._parsers import _AsyncHiredisParser, _HiredisParser
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from ..config.registry import PoolSpec
from ..core.effects import ReplyTooLargeError, Send
from ..core.routing import Refusal
from ..errors import PoolConnectionError
from .embedded import EmbeddedServer

__all__ = [
    "MASTER_CHECK_INTERVAL",
    "AsyncCluster",
    "ConnectionOptions",
    "ReplyBudget",
    "SyncCluster",
    "async_client",
    "async_cluster",
    "client_kwargs",
    "is_error",
    "ready",
    "refusal_of",
    "reply_budget",
    "sync_client",
    "sync_cluster",
]

log = logging.getLogger("streambroker")

#: The longest a Sentinel pool goes on using connections without asking the sentinels
#: where the master is (seconds).
MASTER_CHECK_INTERVAL = 1.0


@dataclass(frozen=True)
class ConnectionOptions:
    """Timeouts of every connection a broker opens (seconds)."""

    socket_timeout: float = 10.0
    connect_timeout: float = 5.0


def client_kwargs(spec: PoolSpec, options: ConnectionOptions) -> dict[str, Any]:
    """Keyword arguments for a redis-py client of ``spec`` (starts an embedded server)."""
    kwargs: dict[str, Any] = {
        "db": spec.db,
        "protocol": 2,
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": options.connect_timeout,
        "client_name": "streambroker",
    }
    # No CLIENT SETINFO when connecting: Redis 7.0 lacks it, so an ACL cannot allow it
    # there, and on later servers a user not allowed it fills the ACL log.
    if hasattr(redis, "DriverInfo"):
        kwargs["driver_info"] = None
    else:  # older redis-py
        kwargs.update(lib_name=None, lib_version=None)
    if spec.kind == "tcp":
        kwargs.update(host=spec.host, port=spec.port)
    elif spec.kind == "embedded":
        assert spec.data_dir is not None
        kwargs["unix_socket_path"] = EmbeddedServer(spec.data_dir).start()
    elif spec.tls:
        # The URL's ssl_password wins over this. Without one, OpenSSL would ask for the
        # passphrase of a protected client key on the terminal, and wait there.
        kwargs["ssl_password"] = _missing_passphrase
    return kwargs


def _missing_passphrase() -> str:
    raise ssl.SSLError("the client key is protected by a passphrase: give ssl_password")


class ReplyBudget:
    """What the replies of the round trip in progress on a connection may still take."""

    __slots__ = ("left", "send")

    def __init__(self) -> None:
        self.send: Send | None = None
        self.left = 0

    def start(self, send: Send) -> None:
        """Count the replies of ``send`` from now on, when it has a budget."""
        self.send = send if send.budget else None
        self.left = send.budget

    def stop(self) -> None:
        """Stop counting (the round trip is over): the send's ``received`` tells how much
        its replies took."""
        if self.send is not None:
            self.send.received = self.send.budget - self.left
            self.send = None

    def spend(self, size: int) -> None:
        """Count ``size`` bytes that arrived; past the budget, raise before they are kept."""
        send = self.send
        if send is not None:
            self.left -= size
            if self.left < 0:
                raise ReplyTooLargeError(send.pool, send.budget)


class _CountingReader:
    """A ``hiredis.Reader`` whose input is counted against a :class:`ReplyBudget`."""

    __slots__ = ("_budget", "_reader", "gets")

    def __init__(self, reader: Any, budget: ReplyBudget) -> None:
        self._reader = reader
        self._budget = budget
        self.gets = reader.gets  # its own: a reply taken costs no call of Python's

    def feed(self, data: Any, offset: int = 0, length: int = -1) -> None:
        self._budget.spend(len(data) - offset if length < 0 else length)
        self._reader.feed(data, offset, length)

    def has_data(self) -> bool:
        return bool(self._reader.has_data())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


class _CountingParser(_HiredisParser):
    """redis-py's hiredis parser, reading through a :class:`_CountingReader`."""

    def __init__(self, socket_read_size: int) -> None:
        super().__init__(socket_read_size)  # type: ignore[no-untyped-call]
        self.budget = ReplyBudget()

    def on_connect(self, connection: Any, **kwargs: Any) -> None:
        super().on_connect(connection, **kwargs)  # type: ignore[no-untyped-call]
        self._reader = _CountingReader(self._reader, self.budget)  # type: ignore[assignment]


class _AsyncCountingParser(_AsyncHiredisParser):
    """redis.asyncio's hiredis parser, reading through a :class:`_CountingReader`."""

    def __init__(self, socket_read_size: int) -> None:
        super().__init__(socket_read_size)
        self.budget = ReplyBudget()

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[no-untyped-call]
        self._reader = _CountingReader(self._reader, self.budget)  # type: ignore[assignment]


def _drain(connection: Any, replies: list[Any], count: int) -> None:
    """Take the replies already in ``connection``'s parser buffer, up to ``count`` in
    ``replies`` (error replies in place, as ``ResponseError`` instances)."""
    gets = connection._parser._reader.gets
    append = replies.append
    for _ in range(count - len(replies)):
        reply = gets()
        if reply.__class__ is not bytes:  # the usual reply (an XADD's id) needs no check
            if reply is NOT_ENOUGH_DATA:
                return
            if isinstance(reply, rex.ConnectionError):
                raise reply
            if isinstance(reply, list) and reply and isinstance(reply[0], rex.ConnectionError):
                raise reply[0]
        append(reply)


def read_replies(connection: Any, count: int) -> list[Any]:
    """The ``count`` replies of a round trip on a connection, error replies in place.

    Replies already in the parser's buffer are taken at once; only when it runs dry is
    one read through redis-py's ``read_response`` (with its timeout and its handling of
    a closed connection), which costs a call per reply otherwise.
    """
    replies: list[Any] = []
    while len(replies) < count:
        try:
            replies.append(connection.read_response())
        except rex.ResponseError as exc:
            replies.append(exc)
        _drain(connection, replies, count)
    return replies


def ready(connection: Any) -> bool:
    """Whether a connection kept idle since its last round trip can take the next one:
    nothing arrived on it meanwhile, not even the server closing it (what redis-py's pool
    checks of a connection it hands out)."""
    try:
        return not connection.can_read()
    except (rex.ConnectionError, rex.TimeoutError, OSError):
        return False


async def read_replies_async(connection: Any, count: int) -> list[Any]:
    """:func:`read_replies` on an asyncio connection: one await per buffer's worth of
    replies, not one per reply (which made the asyncio face's batches half as fast)."""
    replies: list[Any] = []
    while len(replies) < count:
        try:
            replies.append(await connection.read_response())
        except rex.ResponseError as exc:
            replies.append(exc)
        _drain(connection, replies, count)
    return replies


def reply_budget(connection: Any) -> ReplyBudget:
    """The budget of a connection of a client made here (sync or asyncio)."""
    budget: ReplyBudget = connection._parser.budget
    return budget


ClientT = TypeVar("ClientT", redis.Redis, redis.asyncio.Redis)


def _warn_if_unverified(spec: PoolSpec) -> None:
    """Log that the pool's TLS certificates or host names are not checked, when so."""
    if spec.tls_warning:
        log.warning(
            "redis pool %s (%s): TLS verification is off (%s)",
            spec.name,
            spec.display_address,
            spec.tls_warning,
        )


def _client(cls: type[ClientT], spec: PoolSpec, kwargs: dict[str, Any]) -> ClientT:
    if spec.kind in ("url", "sentinel"):
        assert spec.url is not None
        _warn_if_unverified(spec)
    if spec.kind == "sentinel":
        return _master_client(cls, spec, kwargs)
    if spec.kind == "url":
        assert spec.url is not None
        return cls.from_url(spec.url, **kwargs)
    return cls(**kwargs)


def _sentinel_kwargs(
    spec: PoolSpec, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword arguments of the master's connections and of the sentinels'.

    The URL's parameters are read by redis-py itself (as for a ``redis://`` URL) and
    win over ``kwargs``; the sentinels take the same timeouts, name and TLS options, with
    their own credentials.
    """
    assert spec.url is not None
    rest = spec.url.partition("://")[2]
    rest, _, query = rest.partition("?")
    userinfo, at, _ = rest.rpartition("@")
    parameters = dict(parse_qsl(query, keep_blank_values=True))
    sentinel_auth = {
        "username": parameters.pop("sentinel_username", None),
        "password": parameters.pop("sentinel_password", None),
    }
    scheme = "rediss" if spec.tls else "redis"
    url = f"{scheme}://{userinfo}{at}sentinel?{urlencode(parameters)}"
    parsed: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    del parsed["host"]
    parsed.pop("connection_class", None)  # the pool picks the class
    master = {**kwargs, **parsed, "ssl": spec.tls}
    shared = {k: v for k, v in master.items() if k not in ("db", "username", "password")}
    return master, {**shared, **sentinel_auth}


class _MasterCheck:
    """When a Sentinel pool asks the sentinels where its master is, besides on connecting."""

    def __init__(self) -> None:
        self._next = 0.0

    def due(self) -> bool:
        """Whether it is time to ask (it then counts as asked)."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + MASTER_CHECK_INTERVAL
        return True


def _elsewhere(pool: Any, connection: Any) -> bool:
    """Whether ``connection`` of a Sentinel ``pool`` is open to another server than the
    master it knows (a master that was switched)."""
    master = pool.master_address
    return master is not None and (connection.host, connection.port) != tuple(master)


class _SyncMasterPool(redis.sentinel.SentinelConnectionPool):
    """The connections to a Sentinel service's master, checked as the module says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._check = _MasterCheck()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._check.due():  # this closes the idle connections when the master moved
            self.get_master_address()  # type: ignore[no-untyped-call]
        return super().get_connection(*args, **kwargs)

    def release(self, connection: Any) -> None:
        if _elsewhere(self, connection):
            connection.disconnect()
        super().release(connection)

    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if inuse_connections:  # the client is closed: so are the sentinels' connections
            self.sentinel_manager.close()


class _AsyncMasterPool(redis.asyncio.sentinel.SentinelConnectionPool):
    """The asyncio connections to a Sentinel service's master (as :class:`_SyncMasterPool`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._check = _MasterCheck()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._check.due():
            await self.get_master_address()  # type: ignore[no-untyped-call]
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def release(self, connection: Any) -> None:
        if _elsewhere(self, connection):
            await connection.disconnect()
        await super().release(connection)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:
            await self.sentinel_manager.aclose()


def _master_client(cls: type[ClientT], spec: PoolSpec, kwargs: dict[str, Any]) -> ClientT:
    master, sentinel = _sentinel_kwargs(spec, kwargs)
    assert spec.service is not None
    if cls is redis.Redis:
        manager: Any = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(spec.sentinels), sentinel_kwargs=sentinel
        )
        pool_class: type = _SyncMasterPool
    else:
        manager = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(spec.sentinels), sentinel_kwargs=sentinel
        )
        pool_class = _AsyncMasterPool
    client: ClientT = manager.master_for(
        spec.service, redis_class=cls, connection_pool_class=pool_class, **master
    )
    return client


def sync_client(spec: PoolSpec, options: ConnectionOptions) -> redis.Redis:
    """A synchronous client of the pool ``spec``."""
    kwargs = client_kwargs(spec, options)
    client = _client(redis.Redis, spec, {**kwargs, "retry": Retry(NoBackoff(), 0)})
    client.connection_pool.connection_kwargs["parser_class"] = _CountingParser
    return client


async def async_client(spec: PoolSpec, options: ConnectionOptions) -> redis.asyncio.Redis:
    """An asyncio client of the pool ``spec`` (an embedded server starts in a thread)."""
    kwargs = await asyncio.to_thread(client_kwargs, spec, options)
    retry = AsyncRetry(NoBackoff(), 0)
    client = _client(redis.asyncio.Redis, spec, {**kwargs, "retry": retry})
    client.connection_pool.connection_kwargs["parser_class"] = _AsyncCountingParser
    return client


# -- Redis Cluster -----------------------------------------------------------------------


def refusal_of(reply: Any) -> Refusal | None:
    """What refusal of the cluster a raw reply is (``MOVED``, ``ASK``, ``TRYAGAIN``,
    ``CLUSTERDOWN``: the command did not run), or None."""
    if not isinstance(reply, rex.ResponseError):
        return None
    code = getattr(reply, "status_code", None)
    return Refusal.parse(code, str(reply)) if isinstance(code, str) else None


def is_error(reply: Any) -> bool:
    """Whether a raw reply is an error reply."""
    return isinstance(reply, rex.ResponseError)


class _CountingConnection(redis.Connection):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "parser_class": _CountingParser})  # type: ignore[no-untyped-call]


class _CountingSSLConnection(redis.SSLConnection):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "parser_class": _CountingParser})


def _cluster_kwargs(spec: PoolSpec, options: ConnectionOptions) -> dict[str, Any]:
    """The keyword arguments of a cluster's node connections: the URL's parameters (read
    by redis-py as for a ``redis://`` URL) over the broker's."""
    assert spec.url is not None
    rest = spec.url.partition("://")[2]
    rest, _, query = rest.partition("?")
    userinfo, at, _ = rest.rpartition("@")
    scheme = "rediss" if spec.tls else "redis"
    parsed: dict[str, Any] = parse_url(f"{scheme}://{userinfo}{at}cluster?{query}")  # type: ignore[no-untyped-call]
    for key in ("host", "db", "connection_class"):
        parsed.pop(key, None)
    kwargs = {**client_kwargs(spec, options), **parsed, "ssl": spec.tls}
    del kwargs["db"]
    return kwargs


def _unreachable(spec: PoolSpec, exc: BaseException) -> PoolConnectionError:
    """The error of a cluster whose slot map could not be read from any seed node."""
    # redis-py gives the nodes' errors as text only: a TLS failure shows as "[SSL: ...]".
    if spec.tls and "SSL" in str(exc):
        what = "no TLS connection to a seed node of the cluster could be made"
    else:
        what = "no seed node of the cluster answered"
    return PoolConnectionError(spec.name, f"{what} ({spec.display_address}): {exc}")


class SyncCluster:
    """The topology of a cluster pool and a connection pool per node (sync)."""

    def __init__(self, spec: PoolSpec, options: ConnectionOptions) -> None:
        self.spec = spec
        kwargs = _cluster_kwargs(spec, options)
        del kwargs["ssl"]  # the connection class says it
        kwargs["connection_class"] = _CountingSSLConnection if spec.tls else _CountingConnection
        _warn_if_unverified(spec)
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in spec.seeds[1:]]  # type: ignore[no-untyped-call]
        # Given a URL (of the first seed only), redis-py makes each node's connection pool
        # of the keyword arguments, connection class included.
        host, port = spec.seeds[0]
        seed = f"redis://[{host}]:{port}" if ":" in host else f"redis://{host}:{port}"
        try:
            self._client = redis.cluster.RedisCluster(url=seed, startup_nodes=nodes, **kwargs)
        except (rex.RedisError, rex.RedisClusterException) as exc:
            raise _unreachable(spec, exc) from exc
        self._manager = self._client.nodes_manager
        #: Whether the slot map must be read again before the next round trip (a
        #: connection to a node failed: it may have been failed over).
        self.stale = False

    def owner(self, slot: int) -> str:
        """The master serving ``slot`` (``host:port``)."""
        try:
            name: str = self._manager.get_node_from_slot(slot).name
        except rex.RedisClusterException as exc:
            raise PoolConnectionError(self.spec.name, str(exc)) from exc
        return name

    def masters(self) -> list[str]:
        """Every master (``host:port``)."""
        return [node.name for node in self._client.get_primaries()]  # type: ignore[no-untyped-call]

    def pool(self, node: str) -> Any:
        """The connection pool of ``node``; the slot map is read again for a node not in
        it (the target of an ``ASK``)."""
        found = self._manager.get_node(node_name=node)
        if found is None:
            self.refresh()
            found = self._manager.get_node(node_name=node)
        if found is None or found.redis_connection is None:
            raise PoolConnectionError(self.spec.name, f"node {node} is not in the cluster")
        return found.redis_connection.connection_pool

    def refresh(self) -> None:
        """Read the slot map again."""
        try:
            self._manager.initialize()
        except (rex.RedisError, rex.RedisClusterException) as exc:
            raise _unreachable(self.spec, exc) from exc
        self.stale = False

    def close(self) -> None:
        """Close every connection."""
        self._client.close()


class AsyncCluster:
    """The topology of a cluster pool and the connections of each node (asyncio)."""

    def __init__(self, spec: PoolSpec, client: redis.asyncio.cluster.RedisCluster) -> None:
        self.spec = spec
        self._client = client
        self._manager = client.nodes_manager
        self._refreshing = asyncio.Lock()
        self.stale = False

    def owner(self, slot: int) -> str:
        """The master serving ``slot`` (``host:port``)."""
        try:
            return self._manager.get_node_from_slot(slot).name
        except rex.RedisClusterException as exc:
            raise PoolConnectionError(self.spec.name, str(exc)) from exc

    def masters(self) -> list[str]:
        """Every master (``host:port``)."""
        return [node.name for node in self._client.get_primaries()]

    async def node(self, name: str) -> Any:
        """The ``ClusterNode`` of ``name`` (its connections: ``acquire_connection``,
        ``release``); the slot map is read again for a node not in it."""
        found = self._manager.get_node(node_name=name)
        if found is None:
            await self.refresh()
            found = self._manager.get_node(node_name=name)
        if found is None:
            raise PoolConnectionError(self.spec.name, f"node {name} is not in the cluster")
        return found

    async def refresh(self) -> None:
        """Read the slot map again (once for callers waiting together)."""
        async with self._refreshing:
            try:
                await self._manager.initialize()
            except (rex.RedisError, rex.RedisClusterException) as exc:
                raise _unreachable(self.spec, exc) from exc
            self.stale = False

    async def close(self) -> None:
        """Close every connection."""
        await self._client.aclose()


def sync_cluster(spec: PoolSpec, options: ConnectionOptions) -> SyncCluster:
    """The topology and node connections of the cluster pool ``spec`` (reads its slot map)."""
    return SyncCluster(spec, options)


_ASYNC_CLUSTER_ARGUMENTS = frozenset(
    inspect.signature(redis.asyncio.cluster.RedisCluster.__init__).parameters
)


async def async_cluster(spec: PoolSpec, options: ConnectionOptions) -> AsyncCluster:
    """:func:`sync_cluster` for the asyncio face."""
    kwargs = _cluster_kwargs(spec, options)
    unsupported = sorted(set(kwargs) - _ASYNC_CLUSTER_ARGUMENTS - {"ssl_password"})
    if unsupported:
        raise PoolConnectionError(
            spec.name, f"the asyncio face cannot pass {', '.join(unsupported)} to a cluster's nodes"
        )
    if kwargs.pop("ssl_password", _missing_passphrase) is not _missing_passphrase:
        raise PoolConnectionError(
            spec.name, "the asyncio face cannot open a protected client key for a cluster"
        )
    _warn_if_unverified(spec)
    nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in spec.seeds]
    client = redis.asyncio.cluster.RedisCluster(startup_nodes=nodes, **kwargs)
    client.nodes_manager.connection_kwargs["parser_class"] = _AsyncCountingParser
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_kwargs["parser_class"] = _AsyncCountingParser
    try:
        await client.initialize()
    except (rex.RedisError, rex.RedisClusterException) as exc:
        await client.aclose()
        raise _unreachable(spec, exc) from exc
    return AsyncCluster(spec, client)
