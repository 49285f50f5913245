"""State and logic shared by every operation of one broker, free of I/O.

:class:`BrokerCore` knows the validated registry, the codec and limits, and which
pools already have their consumer groups; the sync and async faces both drive it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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
from .sizes import DEFAULT_MAX_ENTRY_SIZE, RESERVED_SIZE

__all__ = ["DEFAULT_MAX_BODY_SIZE", "BrokerCore", "HandlerSpec"]

DEFAULT_MAX_BODY_SIZE = 1 << 20


@dataclass(frozen=True)
class HandlerSpec:
    """A handler an application registered for a group, run by ``streambroker worker``."""

    group: str
    function: Callable[..., Any]
    count: int
    options: Mapping[str, Any]


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
        #: The largest entry read (:mod:`~streambroker.sizes`): the limit, and room for
        #: the reserved fields of an event of ``max_body_size``.
        self.entry_limit = max_entry_size + RESERVED_SIZE
        self._ready_pools: set[str] = set()
        self.handlers: list[HandlerSpec] = []

    def add_handler(
        self, group: str, function: Callable[..., Any], count: int, options: Mapping[str, Any]
    ) -> None:
        """Register ``function`` as the handler of ``group`` (one per group)."""
        self.group_streams(group)
        if any(spec.group == group for spec in self.handlers):
            raise InvalidArgumentError(f"consumer group {group!r} already has a handler")
        self.handlers.append(HandlerSpec(group, function, count, dict(options)))

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
                for key in (stream.name, replay_key(stream.name, group))
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
