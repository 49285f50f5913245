"""The sans-I/O protocol between the broker's logic and its I/O layers.

The logic (publishing, consuming, group creation, ...) is written once, as
generators that yield *effects* and receive their results. An I/O layer (the
synchronous one in ``_sync``) performs each effect and sends the result back, or
throws the error into the generator. No logic lives in an I/O layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import hiredis
import redis.exceptions as rex

from .errors import (
    BrokerError,
    OutOfMemoryError,
    PoolAuthenticationError,
    PoolConnectionError,
    PoolError,
    PoolPermissionError,
    ServerReplyError,
)

if TYPE_CHECKING:
    from .events import Event

T = TypeVar("T")

log = logging.getLogger("streambroker")

#: A handler as the I/O layers see it: called with a batch of events.
AnyHandler = Callable[[Any], object]

Arg = str | bytes | int | float
Command = tuple[Arg, ...]

#: An operation: a generator of effects returning ``T``.
Op = Generator["Effect", Any, T]


@dataclass(slots=True)
class Send:
    """Send ``commands`` to ``pool`` in one round trip; the result is the list of replies.

    Replies are raw RESP2 values (bytes, ints, lists, None). With ``allow_errors`` an
    error reply comes back as a :class:`ReplyError` in its place; without, it raises.
    With a ``budget`` (bytes; 0: none), replies larger than that raise
    :class:`ReplyTooLargeError` (see :mod:`~streambroker.sizes`) without being read whole;
    the I/O layer then sets ``received`` to the bytes the replies took.
    """

    pool: str
    commands: Sequence[Command]
    allow_errors: bool = False
    budget: int = 0
    received: int = 0


@dataclass(slots=True)
class Parallel:
    """Perform several :class:`Send` (to different pools) at once; the result lists theirs."""

    sends: Sequence[Send]


@dataclass(slots=True)
class Handle:
    """Call the user's handler with ``events``; the result is what it returned.

    While the handler runs, the I/O layer runs the operation ``heartbeat()`` every
    ``interval`` seconds (concurrently), when one is given.
    """

    events: list[Event]
    heartbeat: Callable[[], Op[None]] | None = None
    interval: float = 0.0


@dataclass(slots=True)
class Sleep:
    """Wait ``seconds``, or less if the consumer is stopped meanwhile."""

    seconds: float


Effect = Send | Parallel | Handle | Sleep


class ReplyTooLargeError(PoolError):
    """The replies of a :class:`Send` went over its budget: the I/O layer stopped
    reading them and dropped the connection. The commands were carried out."""

    def __init__(self, pool: str, budget: int) -> None:
        self.budget = budget
        super().__init__(pool, f"the replies of a round trip took more than {budget} bytes")


#: A command of a script refused by the ACL makes a plain ``ERR`` reply, not ``NOPERM``:
#: "ACL failure in script: …" (Valkey), "The user executing the script can't …" (Redis 7.0).
_SCRIPT_ACL_FAILURES = ("ACL failure in script", "The user executing the script can't")
#: The kinds of error replies the broker tells apart (:attr:`ReplyError.code`).
OOM = "OOM"
NOPERM = "NOPERM"


@dataclass(slots=True)
class ReplyError:
    """An error reply from the server, returned in place when ``allow_errors`` is set.

    ``message`` is the server's text; ``code`` is :data:`OOM` (out of memory),
    :data:`NOPERM` (the ACL refused the command, or a command of a script), or empty.
    """

    message: str
    code: str = ""

    @classmethod
    def of(cls, exc: rex.ResponseError) -> ReplyError:
        """The error reply redis-py's parser made ``exc`` of."""
        message = str(exc)
        if isinstance(exc, rex.OutOfMemoryError):
            return cls(message, OOM)
        if isinstance(exc, rex.NoPermissionError) or message.startswith(_SCRIPT_ACL_FAILURES):
            return cls(message, NOPERM)
        return cls(message)

    @property
    def out_of_memory(self) -> bool:
        """Whether the server refused for want of memory (``maxmemory`` reached)."""
        return self.code == OOM

    @property
    def denied(self) -> bool:
        """Whether the pool's user may not run the command (or one its script runs)."""
        return self.code == NOPERM

    def error(self, pool: str, what: str = "") -> PoolError:
        """The error raised for this reply: ``what`` names the refused command (as
        :func:`describe` gives it) or operation."""
        if self.out_of_memory:
            return OutOfMemoryError(pool, what)
        if self.denied:
            return PoolPermissionError(pool, self.message, what)
        return ServerReplyError(pool, f"{what}: {self.message}" if what else self.message)


def translate_error(exc: rex.RedisError, pool: str) -> BrokerError:
    """Turn a redis-py error into the broker's error naming the pool."""
    if isinstance(exc, rex.ResponseError):
        return ReplyError.of(exc).error(pool)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return PoolAuthenticationError(pool, text)
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
        return PoolConnectionError(pool, text)
    return PoolError(pool, text)


class Driving(Generic[T]):
    """An operation being driven: the I/O layer performs :attr:`effect`, then hands
    the outcome to :meth:`resume`, until :attr:`done`; then :attr:`result` holds
    what the operation returned."""

    effect: Effect

    def __init__(self, op: Op[T]) -> None:
        self._op = op
        self.done = False
        self.result: T | None = None
        self.resume(None, None)

    def resume(self, value: Any, error: BaseException | None) -> None:
        """Send the effect's result, or throw its error, into the operation."""
        try:
            self.effect = self._op.send(value) if error is None else self._op.throw(error)
        except StopIteration as stop:
            self.done = True
            self.result = stop.value


def outcome(perform: Callable[..., Any], *args: Any) -> tuple[Any, BaseException | None]:
    """Call ``perform``; return (its result, None) or (None, what it raised)."""
    try:
        return perform(*args), None
    except BaseException as exc:
        return None, exc


class translated:  # noqa: N801 - used as a function: ``with translated(pool):``
    """Within the block, redis-py errors become the broker's errors naming ``pool``."""

    __slots__ = ("pool",)

    def __init__(self, pool: str) -> None:
        self.pool = pool

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, rex.RedisError):
            raise translate_error(exc, self.pool) from exc


def pack(commands: Sequence[Command]) -> list[bytes]:
    """``commands`` in the wire protocol, as one buffer: a round trip is one write.

    The list is the form redis-py connections' ``send_packed_command`` takes.
    """
    # hiredis's stub declares a 1-tuple where any tuple of arguments is meant.
    return [b"".join([hiredis.pack_command(command) for command in commands])]  # type: ignore[arg-type]


def settle(send: Send, replies: list[Any]) -> list[Any]:
    """The replies to ``send``, read in order with error replies in place (redis-py's
    ``ResponseError``): those become :class:`ReplyError` with ``allow_errors``; without,
    the first one raises its :meth:`ReplyError.error`, naming the command (after every
    reply was read, so the connection stays usable).
    """
    for index, reply in enumerate(replies):
        if isinstance(reply, rex.ResponseError):
            error = ReplyError.of(reply)
            if not send.allow_errors:
                raise error.error(send.pool, describe(send.commands[index])) from reply
            replies[index] = error
    return replies


def describe(command: Command) -> str:
    """A command as an error message names it: its name and what it acts on."""
    words = [_text(word) for word in command[:4]]
    name = words[0].upper()
    if name in ("EVAL", "EVALSHA"):
        return f"script on {words[3]}" if len(words) > 3 else "script"
    if name in ("XGROUP", "XINFO", "XREADGROUP"):  # a subcommand (or GROUP) comes first
        return " ".join(words[:3])
    return " ".join(words[:2])


def _text(word: Arg) -> str:
    return word.decode(errors="replace") if isinstance(word, bytes) else str(word)


def single(pool: str, *command: Arg) -> Send:
    """A :class:`Send` of one command."""
    return Send(pool, (command,))
