"""State and logic shared by every operation of one broker, free of I/O.

:class:`BrokerCore` knows the validated registry, the codec and limits, and which
pools already have their consumer groups; the sync and async faces both drive it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._effects import Op, Parallel, ReplyError, Send
from .codecs import Codec, get_codec
from .config import StreamSpec, ValidatedRegistry
from .errors import (
    InvalidArgumentError,
    OutOfMemoryError,
    UnknownGroupError,
    UnknownStreamError,
)
from .keys import replay_key
from .observer import Observer

if TYPE_CHECKING:
    from .tracing import Tracing
from .routes import Route, check_kind, check_routes, router

__all__ = ["DEFAULT_MAX_BODY_SIZE", "BrokerCore", "HandlerSpec"]

DEFAULT_MAX_BODY_SIZE = 1 << 20
#: The batch size of a handler registered without ``count``.
DEFAULT_HANDLER_COUNT = 10


@dataclass(frozen=True)
class HandlerSpec:
    """The handler of a group an application registered, run by ``streambroker worker``:
    its function (one that hands each stream's events to that stream's handler when
    there are several, see :mod:`.routes`), batch size and consumer options."""

    group: str
    function: Callable[..., Any]
    count: int
    options: Mapping[str, Any]


@dataclass
class _GroupHandlers:
    routes: dict[str | None, Route]
    count: int | None
    options: dict[str, Any]


class BrokerCore:
    """The I/O-free half of a broker."""

    def __init__(
        self,
        registry: ValidatedRegistry,
        codec: str = "msgpack",
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        if not isinstance(registry, ValidatedRegistry):
            raise InvalidArgumentError(
                "a broker needs a ValidatedRegistry: call registry.validate() first"
            )
        if (
            isinstance(max_body_size, bool)
            or not isinstance(max_body_size, int)
            or (max_body_size < 1)
        ):
            raise InvalidArgumentError(
                f"max_body_size must be a positive number of bytes, got {max_body_size!r}"
            )
        self.registry = registry
        self.codec: Codec = get_codec(codec)
        self.max_body_size = max_body_size
        self._ready_pools: set[str] = set()
        self._handlers: dict[str, _GroupHandlers] = {}
        #: Told what the broker does (its metrics), when set.
        self.observer: Observer | None = None
        #: Makes the spans of publishing and consuming, when set.
        self.tracing: Tracing | None = None
        #: Per stream with retention limits: its events published since this broker's
        #: publishers last collected it, and when they collect it next at the latest.
        self.publisher_collects: dict[str, tuple[int, float]] = {}

    def add_handler(
        self,
        group: str,
        route: Route,
        count: int | None,
        options: Mapping[str, Any],
    ) -> None:
        """Register ``route`` as a handler of ``group``: of one of its streams, or of
        the rest. The group's consumers serve every handler, so ``count`` and
        ``options`` given by two of them must agree."""
        where = f"consumer group {group!r}"
        if route.stream is not None:
            where += f", stream {route.stream!r}"
        handlers = self._handlers.setdefault(group, _GroupHandlers({}, None, {}))
        if route.stream in handlers.routes:
            raise InvalidArgumentError(f"{where} already has a handler")
        check_kind(group, handlers.routes, route.function)
        if count is not None and handlers.count not in (None, count):
            raise InvalidArgumentError(
                f"{where}: count={count} differs from count={handlers.count} given to "
                "another handler of the group (its consumers serve them all)"
            )
        clashing = [k for k, v in options.items() if handlers.options.get(k, v) != v]
        if clashing:
            raise InvalidArgumentError(
                f"{where}: {', '.join(clashing)} differ from another handler of the group "
                "(its consumers serve them all)"
            )
        handlers.routes[route.stream] = route
        handlers.count = handlers.count if count is None else count
        handlers.options.update(options)

    @property
    def handlers(self) -> list[HandlerSpec]:
        """One handler per group that has some, checked to cover its streams."""
        specs = []
        for group, handlers in self._handlers.items():
            streams = [spec.name for spec in self.group_streams(group)]
            check_routes(group, streams, handlers.routes)
            function = router(handlers.routes)
            count = DEFAULT_HANDLER_COUNT if handlers.count is None else handlers.count
            specs.append(HandlerSpec(group, function, count, dict(handlers.options)))
        return specs

    def stream(self, name: str) -> StreamSpec:
        """The registered stream ``name``; raises :class:`UnknownStreamError`."""
        try:
            return self.registry.streams[name]
        except (KeyError, TypeError):
            raise UnknownStreamError(name) from None

    def stream_group(self, stream: str, group: str) -> StreamSpec:
        """The stream ``stream``, checking that ``group`` is registered to read it."""
        spec = self.stream(stream)
        if group not in spec.groups:
            raise InvalidArgumentError(f"consumer group {group!r} does not read stream {stream!r}")
        return spec

    def group_streams(self, group: str) -> tuple[StreamSpec, ...]:
        """The streams the registered ``group`` reads; raises :class:`UnknownGroupError`."""
        try:
            names = self.registry.groups[group]
        except (KeyError, TypeError):
            raise UnknownGroupError(group) from None
        return tuple(self.registry.streams[name] for name in names)

    def ensure_groups(self, pools: Iterable[str]) -> Op[None]:
        """Create every registered group of the streams in ``pools``, once per broker.

        Groups start at the beginning of the stream (id 0), so events published before
        a group's first consumer ran are still delivered to it; each group also gets its
        replay stream. One pipeline per pool.

        A server out of memory refuses ``XGROUP CREATE`` even for a group that exists:
        then the groups are looked up (``XINFO GROUPS``, which needs no memory), and
        :class:`OutOfMemoryError` is raised only for one that is missing.
        """
        todo = [pool for pool in dict.fromkeys(pools) if pool not in self._ready_pools]
        if not todo:
            return
        sends = []
        for pool in todo:
            commands = [
                ("XGROUP", "CREATE", key, group, "0", "MKSTREAM")
                for stream in self.registry.streams.values()
                if stream.pool == pool
                for group in stream.groups
                for key in (stream.key, replay_key(stream, group))
            ]
            if commands:
                sends.append(Send(pool, commands, allow_errors=True))
        results = yield Parallel(sends)
        refused: dict[str, list[tuple[str, str]]] = {}  # per pool: (key, group)
        for send, replies in zip(sends, results, strict=True):
            for command, reply in zip(send.commands, replies, strict=True):
                if not isinstance(reply, ReplyError) or reply.message.startswith("BUSYGROUP"):
                    continue
                key, group = str(command[2]), str(command[3])
                if reply.out_of_memory:
                    refused.setdefault(send.pool, []).append((key, group))
                    continue
                raise reply.error(send.pool, _creating(key, group))
        if refused:
            yield from _check_groups_exist(refused)
        self._ready_pools.update(todo)

    def is_ready(self, pool: str) -> bool:
        """Whether the groups of ``pool`` were created by this broker already."""
        return pool in self._ready_pools

    def forget_groups(self, pool: str) -> None:
        """Make the next operation on ``pool`` create its groups again (they were lost)."""
        self._ready_pools.discard(pool)


def _creating(key: str, group: str) -> str:
    return f"cannot create consumer group {group!r} of stream {key!r}"


def _check_groups_exist(wanted: Mapping[str, list[tuple[str, str]]]) -> Op[None]:
    """Raise :class:`OutOfMemoryError` for the first (key, group) of a pool that is missing."""
    keys = {pool: list(dict.fromkeys(key for key, _ in pairs)) for pool, pairs in wanted.items()}
    sends = [
        Send(pool, [("XINFO", "GROUPS", key) for key in pool_keys], allow_errors=True)
        for pool, pool_keys in keys.items()
    ]
    results = yield Parallel(sends)
    for send, replies in zip(sends, results, strict=True):
        existing: set[tuple[str, str]] = set()
        for key, reply in zip(keys[send.pool], replies, strict=True):
            if isinstance(reply, ReplyError):
                if reply.denied:
                    raise reply.error(send.pool, f"XINFO GROUPS {key}")
                continue  # "no such key": the stream is missing, and so its group
            for row in reply:
                info = dict(zip(row[::2], row[1::2], strict=True))
                existing.add((key, info[b"name"].decode()))
        for key, group in wanted[send.pool]:
            if (key, group) not in existing:
                raise OutOfMemoryError(send.pool, _creating(key, group))
