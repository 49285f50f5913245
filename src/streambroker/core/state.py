"""State and logic shared by every operation of one broker, free of I/O.

:class:`BrokerCore` knows the validated registry, the codec and limits, and which
consumer groups it created already; the sync and async faces both drive it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config.registry import StreamSpec, ValidatedRegistry
from ..errors import (
    InvalidArgumentError,
    UnknownGroupError,
    UnknownStreamError,
)
from ..wire.codecs import Codec, get_codec
from ..wire.keys import replay_key
from .effects import Op, Parallel, ReplyError, Script, Send
from .observer import Observer

if TYPE_CHECKING:
    from ..tracing import Tracing
from ..wire.entry import XaddPacker
from .routes import Route, check_kind, check_routes, router
from .sizes import DEFAULT_MAX_ENTRY_SIZE, RESERVED_SIZE

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
        max_entry_size: int | None = None,
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
        if max_entry_size is None:
            max_entry_size = max(DEFAULT_MAX_ENTRY_SIZE, max_body_size)
        elif (
            isinstance(max_entry_size, bool)
            or not isinstance(max_entry_size, int)
            or max_entry_size < max_body_size
        ):
            raise InvalidArgumentError(
                f"max_entry_size must be a number of bytes of at least max_body_size "
                f"({max_body_size}), got {max_entry_size!r}"
            )
        self.registry = registry
        self.codec: Codec = get_codec(codec)
        self.max_body_size = max_body_size
        self.max_entry_size = max_entry_size
        #: The largest entry read (:mod:`~streambroker.core.sizes`): the limit, and room for
        #: the reserved fields of an event of ``max_body_size``.
        self.entry_limit = max_entry_size + RESERVED_SIZE
        self._ready: set[tuple[str, str, str]] = set()  # (pool, key, group) created
        self._handlers: dict[str, _GroupHandlers] = {}
        #: Told what the broker does (its metrics), when set.
        self.observer: Observer | None = None
        #: Makes the spans of publishing and consuming, when set.
        self.tracing: Tracing | None = None
        #: Per stream with retention limits: its events published since this broker's
        #: publishers last collected it, and when they collect it next at the latest.
        self.publisher_collects: dict[str, tuple[int, float]] = {}
        #: Per stream published to: its spec, and what packs its ``XADD`` commands.
        self.packers: dict[str, tuple[StreamSpec, XaddPacker]] = {}

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

    def group_keys(self, group: str) -> list[tuple[str, str, str]]:
        """``(pool, key, group)`` for every stream the registered ``group`` reads and for
        the group's replay stream of each: what a consumer of ``group`` reads."""
        return [
            (spec.pool, key, group)
            for spec in self.group_streams(group)
            for key in (spec.key, replay_key(spec, group))
        ]

    def ensure_groups(self, wanted: Iterable[tuple[str, str, str]]) -> Op[None]:
        """Create the groups ``wanted`` (``(pool, key, group)`` each), once per broker.

        Only what an operation touches is created: a consumer its own group, on its
        streams and replay streams. Groups start at the beginning of the stream (id 0),
        so events published before a group's first consumer ran are still delivered to
        it (and garbage collection keeps them until then). One pipeline per pool.

        A script creates them, one that runs even when the server is out of memory:
        consumers that start then must be able to drain it.
        """
        todo = [item for item in dict.fromkeys(wanted) if item not in self._ready]
        if not todo:
            return
        per_pool: dict[str, list[tuple[str, str, str]]] = {}
        for item in todo:
            per_pool.setdefault(item[0], []).append(item)
        sends = [
            Send(
                pool,
                [("EVALSHA", _CREATE_GROUP.sha, 1, key, group) for _, key, group in items],
                allow_errors=True,
            )
            for pool, items in per_pool.items()
        ]
        results = yield Parallel(sends)
        for send, replies in zip(sends, results, strict=True):
            for (_, key, group), reply in zip(per_pool[send.pool], replies, strict=True):
                if isinstance(reply, ReplyError):
                    raise reply.error(send.pool, _creating(key, group))
        self._ready.update(todo)

    def forget_groups(self, pool: str) -> None:
        """Make the next operation on ``pool`` create its groups again (they were lost)."""
        self._ready = {item for item in self._ready if item[0] != pool}


# Create group ARGV[1] of stream KEYS[1] at id 0 (and the stream) unless it exists:
# 1 when created, 0 when it existed. It runs when the server is out of memory, which
# refuses XGROUP CREATE itself (a group and an empty stream take a few bytes).
_CREATE_GROUP = Script("""#!lua flags=allow-oom
local reply = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(reply) == 'table' and reply.err then
  if string.sub(reply.err, 1, 9) == 'BUSYGROUP' then return 0 end
  return reply
end
return 1
""")


def _creating(key: str, group: str) -> str:
    return f"cannot create consumer group {group!r} of stream {key!r}"
