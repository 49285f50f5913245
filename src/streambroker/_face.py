"""What the synchronous and asyncio faces share: everything that does no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypedDict, TypeVar, Unpack

from .config.registry import ValidatedRegistry
from .core.consuming import ConsumerCore, ConsumerOptions, check_count
from .core.publishing import BatchBuffer, Replication, replication
from .core.routes import Route
from .core.state import DEFAULT_MAX_BODY_SIZE, BrokerCore, HandlerSpec
from .errors import InvalidArgumentError, UnknownGroupError
from .io.connection import ConnectionOptions

__all__ = [
    "DEFAULT_CONSUMER",
    "BatchFace",
    "BrokerFace",
    "BrokerSettings",
    "ConsumerFace",
    "ConsumerSettings",
]

DEFAULT_CONSUMER = "consumer-1"

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
DriverT = TypeVar("DriverT")


class ConsumerSettings(TypedDict, total=False):
    """The options of a consumer (see :class:`~streambroker.core.consuming.ConsumerOptions`).

    - ``block_timeout``: the longest one blocking read waits, so also the longest
      ``stop()`` takes to be noticed (seconds, default 1).
    - ``collect``: acknowledging also removes the events every group acknowledged
      (default True).
    - ``retry_after``: pending events idle this long (their consumer crashed or
      hangs) are taken over by a live consumer of the group (seconds, default 30).
    - ``lease``: how long a consumer name stays taken after its process died
      (seconds, default 30).
    - ``max_deliveries``: deliveries after which a failing event is set aside as a
      dead letter (default 5).
    - ``retry_delay``: back-off before a failed event is delivered again; doubles
      with each delivery, jittered, up to ``retry_after`` (seconds, default 1).
    - ``forget_after``: other consumers of the group idle this long and holding
      nothing pending (stopped or crashed long ago) are deleted from the group, so
      their names stop showing in its statistics (seconds, default 3600; 0: never).
    """

    block_timeout: float
    collect: bool
    retry_after: float
    lease: float
    max_deliveries: int
    retry_delay: float
    forget_after: float


class BrokerSettings(TypedDict, total=False):
    """The options of a broker (see :class:`~streambroker.Broker`)."""

    codec: str
    max_body_size: int
    max_entry_size: int | None
    socket_timeout: float
    connect_timeout: float


class BrokerFace(Generic[DriverT]):
    """The state of a broker that is not I/O: registry, codec, limits, handlers.

    Options: ``codec`` (``"msgpack"``, the default, or ``"json"``) for the bodies it
    publishes; ``max_body_size`` (bytes, default 1 MiB) above which an event is
    refused before anything is sent, counting its encoded body and every meta tag's
    name and value; ``max_entry_size`` (bytes, default 8 MiB, and at least
    ``max_body_size``, with 64 bytes more allowed for the reserved fields) above which
    an entry is never read: a consumer sets it aside as a dead letter, unread, and
    ``read()`` raises :class:`EntryTooLargeError` at it; ``socket_timeout`` and
    ``connect_timeout`` (seconds).
    """

    def __init__(self, registry: ValidatedRegistry, **options: Unpack[BrokerSettings]) -> None:
        unknown = sorted(set(options) - set(BrokerSettings.__annotations__))
        if unknown:
            raise InvalidArgumentError(
                f"unknown broker options {', '.join(unknown)} "
                f"(expected {', '.join(BrokerSettings.__annotations__)})"
            )
        self._core = BrokerCore(
            registry,
            codec=options.get("codec", "msgpack"),
            max_body_size=options.get("max_body_size", DEFAULT_MAX_BODY_SIZE),
            max_entry_size=options.get("max_entry_size"),
        )
        self._connection = ConnectionOptions(
            options.get("socket_timeout", 10.0), options.get("connect_timeout", 5.0)
        )
        self._driver: DriverT = self._make_driver(registry, self._connection)

    def _make_driver(self, registry: ValidatedRegistry, connection: ConnectionOptions) -> DriverT:
        raise NotImplementedError

    @property
    def registry(self) -> ValidatedRegistry:
        """The registry this broker serves."""
        return self._core.registry

    def __repr__(self) -> str:
        pools = {name: spec.display_address for name, spec in self._core.registry.pools.items()}
        return f"{type(self).__name__}(pools={pools!r}, codec={self._core.codec.name!r})"

    @property
    def handlers(self) -> tuple[HandlerSpec, ...]:
        """The handlers registered with :meth:`handler`, in registration order."""
        return tuple(self._core.handlers)

    def handler(
        self,
        group: str,
        *,
        stream: str | None = None,
        model: Any = None,
        count: int | None = None,
        **options: Unpack[ConsumerSettings],
    ) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as a handler of ``group``.

        ``streambroker worker MODULE:BROKER`` then runs it with consumers of the
        group. With ``stream``, it handles that stream's events only (the group's
        other streams go to its other handlers, or to the one without ``stream``).
        With ``model`` (a dataclass, msgspec Struct, pydantic model, ...) each
        ``event.body`` arrives decoded into it; an event that does not decode is failed
        with the :class:`~streambroker.DecodeError`, so it becomes a dead letter after
        ``max_deliveries``. ``count`` (default 10) is the batch size and ``options``
        are those of ``consumer()``; they belong to the group's consumers, so the
        handlers of one group must not disagree on them.
        """
        if not isinstance(group, str):
            hint = (
                ": write @broker.handler(GROUP), with the group's name" if callable(group) else ""
            )
            raise InvalidArgumentError(
                f"a handler's consumer group must be a name, got {group!r}{hint}"
            )
        try:
            self._core.group_streams(group)
        except UnknownGroupError:
            known = ", ".join(map(repr, self._core.registry.groups)) or "none"
            raise InvalidArgumentError(
                f"cannot register a handler for consumer group {group!r}: it is not "
                f"registered (groups: {known})"
            ) from None
        if stream is not None:
            self._core.stream_group(stream, group)
        if count is not None:
            check_count(count, f"the handler of consumer group {group!r}")
        if model is not None and not isinstance(model, type) and not hasattr(model, "__origin__"):
            raise InvalidArgumentError(
                f"the handler of consumer group {group!r}: model must be a type, got {model!r}"
            )
        self._consumer_options(group, "handler", dict(options))

        def register(function: HandlerT) -> HandlerT:
            if not callable(function):
                raise InvalidArgumentError(
                    f"the handler of consumer group {group!r} must be callable, got {function!r}"
                )
            self._core.add_handler(group, Route(function, stream, model), count, options)
            return function

        return register

    def _replication(self, replicas: object, timeout: object) -> Replication | None:
        return replication(replicas, timeout, self._connection.socket_timeout)

    def _consumer_options(
        self, group: str, name: str, options: Mapping[str, Any]
    ) -> ConsumerOptions:
        try:
            return ConsumerOptions(**options)
        except TypeError:
            unknown = sorted(set(options) - set(ConsumerSettings.__annotations__))
            raise InvalidArgumentError(
                f"consumer {name} of group {group}: unknown options {', '.join(unknown)}"
            ) from None

    def _consumer_core(self, group: str, name: str, options: Mapping[str, Any]) -> ConsumerCore:
        settings = self._consumer_options(group, name, options)
        return ConsumerCore(self._core, group, name, settings, self._connection.socket_timeout)


class BatchFace:
    """A batch's queue of encoded events; the faces add the sending."""

    def __init__(self, face: BrokerFace[Any], wait: Replication | None = None) -> None:
        self._buffer = BatchBuffer(face._core, wait)

    @property
    def ids(self) -> list[str]:
        """The ids of the events sent so far, in publish order."""
        return self._buffer.ids

    def __len__(self) -> int:
        return len(self._buffer)

    def publish(self, stream: str, body: Any = None, meta: Mapping[str, str] | None = None) -> None:
        """Queue one event; it is encoded now (a bad body raises here) and sent later."""
        self._buffer.add(stream, body, meta)


class ConsumerFace:
    """A consumer's identity; the faces add consuming."""

    def __init__(self, core: ConsumerCore) -> None:
        self._core = core

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group={self.group!r}, name={self.name!r})"

    @property
    def group(self) -> str:
        """The consumer group's name."""
        return self._core.group

    @property
    def running(self) -> bool:
        """Whether it consumes now: it holds its name's lease and its last round trip
        to the server succeeded."""
        return self._core.running

    @property
    def problem(self) -> str | None:
        """Why its last round trip failed, while it tries again; None when it did not."""
        return self._core.problem

    @property
    def name(self) -> str:
        """This consumer's name within its group."""
        return self._core.name
