"""What the synchronous and asyncio faces share: everything that does no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypedDict, TypeVar, Unpack

from .config import ValidatedRegistry
from .connection import ConnectionOptions
from .consuming import ConsumerCore, ConsumerOptions
from .core import DEFAULT_MAX_BODY_SIZE, BrokerCore, HandlerSpec
from .errors import InvalidArgumentError
from .publishing import BatchBuffer

__all__ = ["DEFAULT_CONSUMER", "BatchFace", "BrokerFace", "ConsumerFace", "ConsumerSettings"]

DEFAULT_CONSUMER = "consumer-1"

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
DriverT = TypeVar("DriverT")


class ConsumerSettings(TypedDict, total=False):
    """The options of a consumer (see :class:`~streambroker.consuming.ConsumerOptions`).

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


class BrokerFace(Generic[DriverT]):
    """The state of a broker that is not I/O: registry, codec, limits, handlers.

    Options: ``codec`` (``"msgpack"``, the default, or ``"json"``) for the bodies it
    publishes; ``max_body_size`` (bytes, default 1 MiB) above which an event is
    refused before anything is sent, counting its encoded body and every meta tag's
    name and value; ``max_entry_size`` (bytes, default 8 MiB, and at least
    ``max_body_size`` + 64) above which an entry is never read: a consumer sets it
    aside as a dead letter, unread, and ``read()`` raises :class:`EntryTooLargeError`
    at it; ``socket_timeout`` and ``connect_timeout`` (seconds).
    """

    def __init__(
        self,
        registry: ValidatedRegistry,
        *,
        codec: str = "msgpack",
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_entry_size: int | None = None,
        socket_timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._core = BrokerCore(
            registry, codec=codec, max_body_size=max_body_size, max_entry_size=max_entry_size
        )
        self._connection = ConnectionOptions(socket_timeout, connect_timeout)
        self._driver: DriverT = self._make_driver(registry, self._connection)

    def _make_driver(self, registry: ValidatedRegistry, connection: ConnectionOptions) -> DriverT:
        raise NotImplementedError

    @property
    def registry(self) -> ValidatedRegistry:
        """The registry this broker serves."""
        return self._core.registry

    @property
    def handlers(self) -> tuple[HandlerSpec, ...]:
        """The handlers registered with :meth:`handler`, in registration order."""
        return tuple(self._core.handlers)

    def handler(
        self, group: str, *, count: int = 10, **options: Unpack[ConsumerSettings]
    ) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as the handler of ``group``.

        ``streambroker worker MODULE:BROKER`` then runs it with consumers of the
        group; ``options`` are those of ``consumer()``.
        """
        self._consumer_options(group, "handler", dict(options))

        def register(function: HandlerT) -> HandlerT:
            self._core.add_handler(group, function, count, options)
            return function

        return register

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

    def __init__(self, face: BrokerFace[Any]) -> None:
        self._buffer = BatchBuffer(face._core)

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
    def name(self) -> str:
        """This consumer's name within its group."""
        return self._core.name
