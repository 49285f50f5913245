"""Registering pools, streams and consumer groups, and validating them.

A :class:`Registry` collects registrations (in code or from YAML) without checking
them; :meth:`Registry.validate` checks everything at once, without a server, and
returns an immutable :class:`ValidatedRegistry` from which brokers are made.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from ..errors import ConfigError
from ..wire.keys import decode_key, slot_tag
from .entries import PoolEntry, StreamEntry
from .loading import load_yaml

if TYPE_CHECKING:
    from ..async_broker import AsyncBroker
    from ..broker import Broker

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_POOL",
    "PoolSpec",
    "Registry",
    "StreamSpec",
    "ValidatedRegistry",
    "check_key_prefix",
    "check_name",
]

DEFAULT_POOL = "default"
DEFAULT_DATA_DIR = ".streambroker"
MAX_NAME_LENGTH = 128

_BAD_NAME_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f*?\[\]]")
_URL_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_TLS_SCHEMES = ("rediss", "rediss+sentinel", "rediss+cluster")
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\s]+)):(?P<port>[^:]+)(?::(?P<db>.*))?")


def check_name(kind: str, name: object) -> str | None:
    """Return why ``name`` is not a valid name of a ``kind``, or None when it is valid.

    Names must be non-empty strings of at most 128 characters without whitespace,
    control characters or glob characters (``*?[]``), so that they are safe as Redis
    keys, in ``SCAN``/``KEYS`` patterns and on a command line.
    """
    if not isinstance(name, str):
        return f"{kind} name must be a string, got {type(name).__name__} {name!r}"
    if not name:
        return f"{kind} name must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"{kind} name {name[:20]!r}... is longer than {MAX_NAME_LENGTH} characters"
    bad = _BAD_NAME_CHARS.search(name)
    if bad:
        return (
            f"{kind} name {name!r} holds {bad.group()!r}: names may not hold whitespace, "
            "control characters or glob characters (*?[])"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"{kind} name {name!r} is not valid Unicode text (it holds a lone surrogate)"
    return None


@dataclass(frozen=True)
class PoolSpec:
    """Where one named Redis pool lives.

    ``kind`` is ``"tcp"`` (``host:port`` with ``db``), ``"url"`` (a ``redis://``,
    ``rediss://`` or ``unix://`` URL, which may carry credentials), ``"sentinel"`` (a
    ``redis+sentinel://`` or ``rediss+sentinel://`` URL: the master of the Sentinel
    ``service``, found through the ``sentinels``), ``"cluster"`` (a ``redis+cluster://``
    or ``rediss+cluster://`` URL: a Redis Cluster found through its ``seeds``, database 0
    only) or ``"embedded"`` (the bundled server under ``data_dir``).
    """

    name: str
    kind: Literal["tcp", "url", "sentinel", "cluster", "embedded"]
    db: int = 0
    host: str | None = None
    port: int | None = None
    url: str | None = field(default=None, repr=False)
    data_dir: str | None = None
    #: The Sentinel service whose master this pool is, and its sentinels (host, port).
    service: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    #: The nodes of a Redis Cluster its topology is first asked of (host, port).
    seeds: tuple[tuple[str, int], ...] = ()
    #: Why TLS certificates or host names of this pool are not checked, when they are not.
    tls_warning: str | None = field(default=None, repr=False, compare=False)

    @property
    def server_address(self) -> str:
        """The server's host name or address, or its unix socket (as traces name it)."""
        if self.kind == "tcp":
            return str(self.host)
        if self.kind == "embedded":
            return f"{self.data_dir}/valkey.sock"
        if self.kind == "sentinel":
            return self.sentinels[0][0]
        if self.kind == "cluster":
            return self.seeds[0][0]
        assert self.url is not None
        parts = urlsplit(self.url)
        return parts.hostname or parts.path

    @property
    def display_address(self) -> str:
        """The address with any password masked, fit for logs and messages."""
        if self.kind == "tcp":
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"{host}:{self.port}/{self.db}"
        if self.kind == "embedded":
            return f"embedded:{self.data_dir} db {self.db}"
        assert self.url is not None
        return _mask_url(self.url)

    @property
    def tls(self) -> bool:
        """Whether the pool's connections use TLS (a ``rediss://``, ``rediss+sentinel://``
        or ``rediss+cluster://`` URL)."""
        return self.url is not None and self.url.startswith(
            tuple(f"{scheme}://" for scheme in _TLS_SCHEMES)
        )

    @property
    def cluster(self) -> bool:
        """Whether the pool is a Redis Cluster (its keys live in hash slots of nodes)."""
        return self.kind == "cluster"

    def __repr__(self) -> str:
        return f"PoolSpec(name={self.name!r}, address={self.display_address!r})"


@dataclass(frozen=True)
class StreamSpec:
    """A registered stream: its name, its pool, the consumer groups that read it, its
    registry's ``key_prefix`` and its retention limits.

    ``max_length`` (events) and ``max_age`` (seconds) are None when not set: past a
    limit, the oldest events are removed even if not every group acknowledged them
    (see the README's "Retention limits").
    """

    name: str
    pool: str
    groups: tuple[str, ...]
    key_prefix: str = ""
    max_length: int | None = None
    max_age: float | None = None

    @cached_property
    def limited(self) -> bool:
        """Whether the stream has a retention limit."""
        return self.max_length is not None or self.max_age is not None

    @cached_property
    def key(self) -> str:
        """The stream's key on the server: the registry's key prefix, then its name."""
        return self.key_prefix + self.name


#: The faces' classes, by kind (``"sync"``, ``"asyncio"``), for
#: :meth:`ValidatedRegistry.broker` and :meth:`ValidatedRegistry.async_broker`. Each
#: face's module adds its own when imported (``import streambroker`` imports both), so
#: that the registry, below the faces, does not import them.
FACES: dict[str, Callable[..., Any]] = {}


@dataclass(frozen=True)
class ValidatedRegistry:
    """An immutable, checked set of pools and streams; make brokers from it.

    Two validated registries are equal when they register the same pools (same
    addresses) and the same streams with the same groups and retention limits, under
    the same key prefix.
    """

    pools: Mapping[str, PoolSpec]
    streams: Mapping[str, StreamSpec]
    key_prefix: str = ""
    groups: Mapping[str, tuple[str, ...]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        groups: dict[str, list[str]] = {}
        for stream in self.streams.values():
            for group in stream.groups:
                groups.setdefault(group, []).append(stream.name)
        object.__setattr__(
            self, "groups", MappingProxyType({g: tuple(s) for g, s in groups.items()})
        )

    def broker(self, **options: Any) -> Broker:
        """Make a synchronous :class:`~streambroker.Broker`; see its options."""
        broker: Broker = FACES["sync"](self, **options)
        return broker

    def async_broker(self, **options: Any) -> AsyncBroker:
        """Make an :class:`~streambroker.AsyncBroker` (asyncio); same options."""
        broker: AsyncBroker = FACES["asyncio"](self, **options)
        return broker


class Registry:
    """Collects Redis pools and streams; :meth:`validate` checks them all at once.

    ``key_prefix`` starts every key the broker writes (streams, dead letters, replays,
    leases), so that applications sharing a server do not see each other's keys;
    it may not hold ``{`` or ``}``, whitespace, control or glob characters.
    """

    def __init__(self, key_prefix: str = "") -> None:
        self._pools: list[PoolEntry] = []
        self._streams: list[StreamEntry] = []
        self._key_prefix: object = key_prefix
        self._key_prefix_origin: str | None = None  # where the YAML gives it

    def register_redis(
        self,
        address: str,
        db: int | None = None,
        pool: str = DEFAULT_POOL,
        *,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Register a Redis pool named ``pool``.

        ``address`` is ``host:port`` (with ``db``), ``host:port:db`` as in the YAML
        format, a ``redis://``, ``rediss://`` or ``unix://`` URL, a Sentinel service
        (``redis+sentinel://host:port[,host:port...]/SERVICE[/DB]``), a Redis Cluster
        (``redis+cluster://host:port[,host:port...]``, database 0 only; TLS:
        ``rediss+``), or ``embedded`` for the bundled server (``embedded:DIR`` or
        ``data_dir=`` picks its data directory, default ``./.streambroker``).
        """
        self._pools.append(PoolEntry(pool, address, db, data_dir, None))

    def register_stream(
        self,
        name: str,
        pool: str = DEFAULT_POOL,
        groups: Sequence[str] = (),
        *,
        max_length: int | None = None,
        max_age: float | None = None,
    ) -> None:
        """Register the stream ``name`` in ``pool``, read by the consumer ``groups``.

        ``max_length`` (events) and ``max_age`` (seconds) are retention limits: past
        them the oldest events are removed even if not every group acknowledged them,
        with a warning naming what each group lost. Without them, an event stays until
        every group acknowledged it.
        """
        groups_value: object = groups if isinstance(groups, str) else tuple(groups)
        self._streams.append(
            StreamEntry(name, pool, groups_value, None, max_length=max_length, max_age=max_age)
        )

    def validate(self) -> ValidatedRegistry:
        """Check every registration and return the immutable result.

        Raises :class:`~streambroker.ConfigError` listing every problem found. No
        server is contacted.
        """
        problems: list[str] = []
        prefix_problem = check_key_prefix(self._key_prefix)
        if prefix_problem:
            origin = self._key_prefix_origin
            problems.append(f"{origin}: {prefix_problem}" if origin else prefix_problem)
        # A bad prefix is reported once: the streams are checked as if there were none.
        prefix = (
            self._key_prefix if isinstance(self._key_prefix, str) and not prefix_problem else ""
        )
        pools: dict[str, PoolSpec] = {}
        # Names registered so far, valid or not: a repeat is reported even when the
        # first registration has a problem of its own.
        pool_names: set[str] = set()
        bad_pool_names: set[str] = set()  # reported already; streams in them are not blamed
        for entry in self._pools:
            where = f"{entry.origin}: " if entry.origin else ""
            name_where = f"{entry.name_origin}: " if entry.name_origin else where
            problem = check_name("redis pool", entry.name)
            if problem:
                problems.append(name_where + problem)
                if isinstance(entry.name, str):
                    bad_pool_names.add(entry.name)
                continue
            assert isinstance(entry.name, str)
            if entry.name in pool_names:
                problems.append(f"{name_where}redis pool {entry.name} is already registered")
                continue
            pool_names.add(entry.name)
            try:
                pools[entry.name] = _parse_address(
                    entry.name, entry.address, entry.db, entry.data_dir
                )
            except ValueError as exc:
                problems.append(f"{where}redis pool {entry.name}: {exc}")

        streams: dict[str, StreamSpec] = {}
        stream_names: set[str] = set()
        for s in self._streams:
            where = f"{s.origin}: " if s.origin else ""
            problem = check_name("stream", s.name)
            if problem:
                problems.append(where + problem)
                continue
            assert isinstance(s.name, str)
            if s.name in stream_names:
                problems.append(f"{where}stream with name {s.name} already exists")
                continue
            stream_names.add(s.name)
            key_problem = _check_stream_key(prefix, s.name)
            if key_problem:
                problems.append(f"{where}stream {s.name}: {key_problem}")
            stream_problems = _check_stream(s, pool_names, bad_pool_names)
            problems.extend(stream_problems)
            if not stream_problems and not key_problem:
                assert isinstance(s.pool, str)
                assert isinstance(s.groups, tuple)
                groups = tuple(map(str, s.groups))
                max_length = s.max_length if isinstance(s.max_length, int) else None
                max_age = float(s.max_age) if isinstance(s.max_age, int | float) else None
                streams[s.name] = StreamSpec(s.name, s.pool, groups, prefix, max_length, max_age)
        if problems:
            raise ConfigError(problems)
        return ValidatedRegistry(MappingProxyType(pools), MappingProxyType(streams), prefix)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike[str]) -> Registry:
        """Load a registry from YAML text or a YAML file (see the README for the format).

        The top-level key ``key_prefix`` (a string, beside the pools) sets the key prefix.

        Syntax and shape errors raise :class:`~streambroker.ConfigError` naming the
        file and line; the other checks happen in :meth:`validate`, also with lines.
        """
        loaded = load_yaml(source)
        registry = cls()
        registry._pools.extend(loaded.pools)
        registry._streams.extend(loaded.streams)
        if loaded.key_prefix_origin is not None:
            registry._key_prefix = loaded.key_prefix
            registry._key_prefix_origin = loaded.key_prefix_origin
        return registry


def check_key_prefix(prefix: object) -> str | None:
    """Return why ``prefix`` is not a valid key prefix, or None when it is valid.

    A prefix is a name (see :func:`check_name`) or empty, and holds neither ``{`` nor
    ``}``: a brace would change which part of the keys Redis Cluster hashes.
    """
    if prefix == "":
        return None
    problem = check_name("key prefix", prefix)
    if problem:
        return problem.replace("key prefix name", "key prefix")
    assert isinstance(prefix, str)
    if "{" in prefix or "}" in prefix:
        return (
            f"key prefix {prefix!r} holds a brace: a prefix may not hold {{ or }}, which "
            "would change the hash slot of the keys it starts"
        )
    return None


def _check_stream_key(prefix: str, name: str) -> str | None:
    """Why the stream ``name``'s key cannot be used, or None when it can."""
    key = prefix + name
    derived = decode_key(prefix, key)
    if derived is not None:
        return f"its key {key!r} is {derived.describe()}: choose another name"
    tag = slot_tag(key)
    if tag is None:
        return (
            f"the name holds '}}' without a hash tag ({{...}} with text inside before it): "
            f"Redis Cluster hashes the whole key {key!r}, so the stream's dead letters and "
            "replays cannot share its hash slot; remove the '}' or give the name a hash tag"
        )
    if tag.startswith("sb:lease:"):
        return (
            f"its hash tag {{{tag}}} starts with 'sb:lease:', which is kept for the keys of "
            "consumer leases: its dead letters and replays could take a lease's key"
        )
    return None


def _check_stream(s: StreamEntry, pools: set[str], bad_pools: set[str]) -> list[str]:
    """The problems of one stream, each prefixed with where it is (when known)."""
    where = f"{s.origin}: " if s.origin else ""
    problems = []
    pool_problem = check_name("redis pool", s.pool)
    if pool_problem:
        if not (isinstance(s.pool, str) and s.pool in bad_pools):
            problems.append(f"{where}stream {s.name}: {pool_problem}")
    elif s.pool not in pools:
        problems.append(f"{where}stream {s.name}: redis pool {s.pool} is not registered")
    problems.extend(_check_limits(s))
    if not isinstance(s.groups, tuple):
        problems.append(
            f"{where}stream {s.name}: consumer groups must be a list of names, got {s.groups!r}"
        )
        return problems
    if not s.groups:
        problems.append(f"{where}stream {s.name} has no consumer groups")
    seen: set[str] = set()
    for index, group in enumerate(s.groups):
        at = f"{s.group_origins[index]}: " if index < len(s.group_origins) else where
        problem = check_name("consumer group", group)
        if problem:
            problems.append(f"{at}stream {s.name}: {problem}")
            continue
        assert isinstance(group, str)
        if group in seen:
            problems.append(f"{at}stream {s.name}: consumer group {group} is listed twice")
        seen.add(group)
    return problems


#: The shortest ``max_age``: stream ids count milliseconds.
MIN_MAX_AGE = 0.001


def _check_limits(s: StreamEntry) -> list[str]:
    """The problems of a stream's retention limits, each with where it is (when known)."""
    problems = []

    def fail(limit: str, message: str) -> None:
        origin = s.limit_origins.get(limit) or s.origin
        problems.append(f"{origin + ': ' if origin else ''}stream {s.name}: {limit} {message}")

    length = s.max_length
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
        fail("max_length", f"must be a number of events (an integer >= 1), got {length!r}")
    elif isinstance(length, int) and length < 1:
        fail("max_length", f"must be at least 1 event, got {length}")
    age = s.max_age
    if age is not None and (isinstance(age, bool) or not isinstance(age, int | float)):
        fail("max_age", f"must be a number of seconds, got {age!r}")
    elif isinstance(age, int | float) and not (MIN_MAX_AGE <= age < math.inf):
        fail("max_age", f"must be at least {MIN_MAX_AGE} s (a millisecond) and finite, got {age}")
    return problems


def _parse_int(text: str, what: str, minimum: int, maximum: int | None = None) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{what} {text!r} is not a number")
    value = int(text)
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{what} {value} is out of range")
    return value


def _parse_address(pool: str, address: object, db: object, data_dir: object) -> PoolSpec:
    if db is not None and (isinstance(db, bool) or not isinstance(db, int) or db < 0):
        raise ValueError(f"db {db!r} is not a database number (an integer >= 0)")
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address must be a non-empty string, got {address!r}")
    if address == "embedded" or address.startswith("embedded:"):
        address_dir = address.partition(":")[2]
        if re.fullmatch(r".*:[0-9]+", address_dir):
            raise ValueError(
                f"{address!r} does not select a database: give the db apart (db: in YAML, "
                "db= in code), or data_dir= for a directory whose name ends like this"
            )
        directory = address_dir or data_dir or DEFAULT_DATA_DIR
        if not isinstance(directory, str | os.PathLike):
            raise ValueError(f"data_dir {directory!r} is not a path")
        resolved = str(Path(directory).expanduser().resolve())
        if address_dir and data_dir is not None and _resolve_dir(data_dir) != resolved:
            raise ValueError(
                f"the address selects data directory {address_dir!r} "
                f"but data_dir={data_dir!r} was given"
            )
        return PoolSpec(pool, "embedded", db=db or 0, data_dir=resolved)
    if data_dir is not None:
        raise ValueError("data_dir applies only to the embedded server")
    scheme = address.partition("://")[0]
    if scheme in _SENTINEL_SCHEMES:
        return _parse_sentinel(pool, address, db)
    if scheme in _CLUSTER_SCHEMES:
        return _parse_cluster(pool, address, db)
    if "://" in address:
        if scheme not in _URL_SCHEMES:
            raise ValueError(
                f"cannot parse address {_mask_url(address)!r}: the URL scheme must be one "
                f"of {', '.join(_URL_SCHEMES + _SENTINEL_SCHEMES + _CLUSTER_SCHEMES)}"
            )
        url_db, tls_warning = _check_url(address)
        if db is not None and url_db is not None and db != url_db:
            raise ValueError(f"the URL selects db {url_db} but db={db} was given")
        chosen = url_db if url_db is not None else (db or 0)
        return PoolSpec(pool, "url", db=chosen, url=address, tls_warning=tls_warning)
    return _parse_host_port(pool, address, db)


def _check_url(url: str) -> tuple[int | None, str | None]:
    """The db a URL selects and why it turns TLS verification off (None when it does not)."""
    shown = _mask_url(url)
    parts = urlsplit(url)
    if "#" in url or "@" in parts.path + parts.query:
        # What follows such a character may be the rest of a password: never parse it.
        raise ValueError(
            f"the URL {shown!r} holds '#', or '@' after its host: write '/', '?', '#' and '@' "
            "in a user name or password as %2F, %3F, %23 and %40"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the port in {shown!r} is not valid") from None
    del port
    query = _check_query(parts.scheme, parts.query)
    query_db = query.get("db")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs a socket path")
        return (_parse_int(query_db, "db", 0) if query_db else None), None
    if not parts.hostname:
        raise ValueError(f"the URL {shown!r} has no host")
    path = parts.path.strip("/")
    path_db = _parse_int(path, "db", 0) if path else None
    tls_warning = _tls_warning(query)
    if not query_db:
        return path_db, tls_warning
    # redis-py lets ?db= win over the path; refuse a URL that says both, differently.
    url_db = _parse_int(query_db, "db", 0)
    if path_db is not None and path_db != url_db:
        raise ValueError(f"the URL selects db {path_db} in its path but db={url_db} in its query")
    return url_db, tls_warning


def _split_hosts_url(url: str, what: str) -> tuple[str, tuple[tuple[str, int], ...], str, str]:
    """A URL naming several hosts (``what``: sentinel, cluster node): its scheme, the
    hosts, its path and its query."""
    shown = _mask_url(url)
    scheme, _, rest = url.partition("://")
    rest, _, query_text = rest.partition("?")
    if "#" in url or "@" in query_text:
        raise ValueError(
            f"the URL {shown!r} holds '#', or '@' after its hosts: write '/', '?', '#' and '@' "
            "in a user name or password as %2F, %3F, %23 and %40"
        )
    userinfo, _, rest = rest.rpartition("@")
    if any(c in userinfo for c in "/?"):
        raise ValueError(f"the URL {shown!r}: write '/' and '?' in a password as %2F and %3F")
    hosts, _, path = rest.partition("/")
    parsed = tuple(_parse_url_host(host, shown, what) for host in hosts.split(","))
    return scheme, parsed, path, query_text


def _parse_cluster(pool: str, url: str, db: object) -> PoolSpec:
    """A ``redis+cluster://[user:password@]host:port[,host:port...]`` URL (database 0)."""
    shown = _mask_url(url)
    scheme, seeds, path, query_text = _split_hosts_url(url, "cluster node")
    query = _check_query(scheme, query_text)
    dbs = [("its path", path)] if path else []
    dbs += [("its query", query["db"])] if "db" in query else []
    for where, text in dbs:
        if _parse_int(text, "db", 0) != 0:
            raise ValueError(
                f"the URL {shown!r} selects db {text} in {where}: a Redis Cluster has "
                "database 0 only"
            )
    if db:
        raise ValueError(f"db={db} was given: a Redis Cluster has database 0 only")
    return PoolSpec(pool, "cluster", url=url, seeds=seeds, tls_warning=_tls_warning(query))


def _parse_sentinel(pool: str, url: str, db: object) -> PoolSpec:
    """A ``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB]`` URL."""
    shown = _mask_url(url)
    scheme, sentinels, path, query_text = _split_hosts_url(url, "sentinel")
    service, _, db_text = path.partition("/")
    service = unquote_plus(service)
    if not service:
        raise ValueError(
            f"the URL {shown!r} names no Sentinel service: "
            f"{scheme}://host:port[,host:port...]/SERVICE[/DB]"
        )
    problem = check_name("sentinel service", service)
    if problem:
        raise ValueError(problem)
    if "/" in db_text:
        raise ValueError(f"the URL {shown!r} holds more than /SERVICE/DB in its path")
    query = _check_query(scheme, query_text)
    url_db = _parse_int(db_text, "db", 0) if db_text else None
    query_db = _parse_int(query["db"], "db", 0) if "db" in query else None
    if url_db is not None and query_db is not None and url_db != query_db:
        raise ValueError(f"the URL selects db {url_db} in its path but db={query_db} in its query")
    url_db = url_db if url_db is not None else query_db
    if db is not None and url_db is not None and db != url_db:
        raise ValueError(f"the URL selects db {url_db} but db={db} was given")
    chosen = url_db if url_db is not None else db
    assert chosen is None or isinstance(chosen, int)
    return PoolSpec(
        pool,
        "sentinel",
        db=chosen or 0,
        url=url,
        service=service,
        sentinels=sentinels,
        tls_warning=_tls_warning(query),
    )


def _parse_url_host(text: str, shown: str, what: str) -> tuple[str, int]:
    match = _HOST_PORT.fullmatch(text)
    if not match or match.group("db") is not None:
        raise ValueError(
            f"the URL {shown!r}: cannot parse {what} {text!r}: expected host:port "
            f"({what}s separated by commas)"
        )
    host = match.group("v6") or match.group("host")
    return host, _parse_int(match.group("port"), f"{what} port", 1, 65535)


def _check_seconds(value: str) -> str | None:
    try:
        seconds = float(value)
    except ValueError:
        return "is not a number of seconds"
    return None if 0 < seconds < float("inf") else "must be a positive number of seconds"


def _check_boolean(value: str) -> str | None:
    # redis-py reads any other text (``off``, ``disabled``) as true: refuse it.
    return None if value.lower() in _BOOLEANS else "must be true or false (or yes/no, 1/0)"


def _check_cert_reqs(value: str) -> str | None:
    return None if value in _CERT_REQS else f"must be one of {', '.join(_CERT_REQS)}"


def _check_client_name(value: str) -> str | None:
    # Redis refuses a connection name holding spaces or other characters outside ! to ~.
    ok = all("!" <= c <= "~" for c in value)
    return None if ok else "may hold only visible ASCII characters (no spaces)"


def _check_text(value: str) -> str | None:
    return None


_FALSE = ("false", "no", "0")
_BOOLEANS = ("true", "yes", "1", *_FALSE)
_CERT_REQS = ("none", "optional", "required")
_SECRET_PARAMETERS = ("password", "ssl_password", "sentinel_password")
_Check = Callable[[str], str | None]
#: The URL query parameters a pool accepts, each with its check; the TLS ones need rediss://.
_URL_PARAMETERS: Mapping[str, _Check] = MappingProxyType(
    {
        "db": _check_text,  # checked with the path's db
        "username": _check_text,
        "password": _check_text,
        "client_name": _check_client_name,
        "socket_timeout": _check_seconds,
        "socket_connect_timeout": _check_seconds,
    }
)
#: The parameters of the sentinels themselves, in ``redis+sentinel://`` URLs only.
_SENTINEL_URL_PARAMETERS: Mapping[str, _Check] = MappingProxyType(
    {"sentinel_username": _check_text, "sentinel_password": _check_text}
)
_TLS_URL_PARAMETERS: Mapping[str, _Check] = MappingProxyType(
    {
        "ssl_cert_reqs": _check_cert_reqs,
        "ssl_check_hostname": _check_boolean,
        "ssl_ca_certs": _check_text,
        "ssl_ca_path": _check_text,
        "ssl_certfile": _check_text,
        "ssl_keyfile": _check_text,
        "ssl_password": _check_text,
    }
)


_KNOWN_PARAMETERS = (_URL_PARAMETERS, _SENTINEL_URL_PARAMETERS, _TLS_URL_PARAMETERS)


def _check_query(scheme: str, query: str) -> dict[str, str]:
    """The parameters of a URL's query, each checked; a bad one raises naming it."""
    values: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        check = _URL_PARAMETERS.get(name) or _TLS_URL_PARAMETERS.get(name)
        if scheme in _SENTINEL_SCHEMES:
            check = check or _SENTINEL_URL_PARAMETERS.get(name)
        if check is None and any(secret in values for secret in _SECRET_PARAMETERS):
            # It may be the rest of a password holding '&': do not name it.
            raise ValueError(
                "the URL holds a parameter that is not accepted after a password "
                "(write '&' in a password as %26)"
            )
        if check is None:
            sentinel = [*_SENTINEL_URL_PARAMETERS] if scheme in _SENTINEL_SCHEMES else []
            accepted = ", ".join([*_URL_PARAMETERS, *sentinel, *_TLS_URL_PARAMETERS])
            raise ValueError(f"the URL parameter {name!r} is not accepted (accepted: {accepted})")
        if name in _TLS_URL_PARAMETERS and scheme not in _TLS_SCHEMES:
            raise ValueError(
                f"the URL parameter {name!r} applies only to rediss://, rediss+sentinel:// "
                "and rediss+cluster:// URLs"
            )
        if name in values:
            raise ValueError(f"the URL parameter {name!r} is given twice")
        if not value:
            raise ValueError(f"the URL parameter {name!r} has no value")
        problem = check(value)
        if problem:
            shown = "***" if name in _SECRET_PARAMETERS else repr(value)
            raise ValueError(f"the URL parameter {name}={shown} {problem}")
        values[name] = value
    return values


def _tls_warning(query: Mapping[str, str]) -> str | None:
    if query.get("ssl_cert_reqs") == "none":
        return "ssl_cert_reqs=none: the server's TLS certificate is not verified"
    if query.get("ssl_check_hostname", "true").lower() in _FALSE:
        return "ssl_check_hostname=false: the server's TLS certificate may name another host"
    return None


def _parse_host_port(pool: str, address: str, db: object) -> PoolSpec:
    if "@" in address:  # never echo what may be a password
        raise ValueError(
            "an address with credentials must be a URL: redis://user:password@host:port/db"
        )
    match = _HOST_PORT.fullmatch(address)
    if not match:
        raise ValueError(
            f"cannot parse address {address!r}: expected host:port, host:port:db, "
            "a redis://, rediss:// or unix:// URL, or embedded"
        )
    host = match.group("v6") or match.group("host")
    port = _parse_int(match.group("port"), "port", 1, 65535)
    db_text = match.group("db")
    address_db = _parse_int(db_text, "db", 0) if db_text is not None else None
    if db is not None and address_db is not None and db != address_db:
        raise ValueError(f"the address selects db {address_db} but db={db} was given")
    chosen = address_db if address_db is not None else db
    assert chosen is None or isinstance(chosen, int)
    return PoolSpec(pool, "tcp", db=chosen or 0, host=host, port=port)


def _resolve_dir(directory: object) -> str | None:
    if not isinstance(directory, str | os.PathLike):
        return None
    return str(Path(directory).expanduser().resolve())


def _mask_url(url: str) -> str:
    """Mask the credentials of a URL by ``***``, in its user info and in its query.

    The user info ends at the last ``@`` (so a password holding an unencoded ``@``,
    ``/``, ``?`` or ``#`` is masked whole, even in a URL that cannot be parsed); the
    ``password`` and ``ssl_password`` parameters are masked however their names are
    encoded, with what follows them up to the next accepted parameter (the rest of a
    password holding ``&``), and so is anything after a ``#``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, rest = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if any(c in user for c in "/?#"):
            userinfo = "***"
        elif colon:
            userinfo = f"{user}:***"
    rest, hash_sign, _ = rest.partition("#")
    head, question, query = rest.partition("?")
    masked: list[str] = []
    in_secret = False
    for part in query.split("&") if question else ():
        name = unquote_plus(part.partition("=")[0])
        if name.lower() in _SECRET_PARAMETERS:
            in_secret = True
            masked.append(f"{part.partition('=')[0]}=***")
        elif not (in_secret and not any(name in known for known in _KNOWN_PARAMETERS)):
            in_secret = False
            masked.append(part)
    return (
        f"{scheme}://{userinfo}{at}{head}{question}{'&'.join(masked)}{'#***' if hash_sign else ''}"
    )
