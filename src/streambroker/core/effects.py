"""The sans-I/O protocol between the broker's logic and its I/O layers.

The logic (publishing, consuming, group creation, ...) is written once, as
generators that yield *effects* and receive their results. An I/O layer
(:mod:`streambroker.io.sync` or :mod:`streambroker.io.aio`) performs each effect and
sends the result back, or throws the error into the generator. No logic lives in an
I/O layer, and nothing here knows redis-py: the I/O layers turn its replies and errors
into the values described here (:mod:`streambroker.io.replies`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import hiredis

from ..errors import (
    OutOfMemoryError,
    PoolConnectionError,
    PoolError,
    PoolPermissionError,
    ServerReplyError,
)

if TYPE_CHECKING:
    from ..wire.events import Event

T = TypeVar("T")

log = logging.getLogger("streambroker")

#: A handler as the I/O layers see it: called with a batch of events.
AnyHandler = Callable[[Any], object]

Arg = str | bytes | int | float
Command = tuple[Arg, ...]
#: A command as a :class:`Send` carries it: its arguments, or the command already in the
#: wire protocol (bytes: see :func:`~streambroker.wire.entry.xadd_packer`).
AnyCommand = Command | bytes

#: An operation: a generator of effects returning ``T``.
Op = Generator["Effect", Any, T]


@dataclass(slots=True)
class Send:
    """Send ``commands`` to ``pool`` in one round trip; the result is the list of replies.

    Replies are raw RESP2 values (bytes, ints, lists, None). With ``allow_errors`` an
    error reply comes back as a :class:`ReplyError` in its place; without, it raises.
    With a ``budget`` (bytes; 0: none), replies larger than that raise
    :class:`ReplyTooLargeError` (see :mod:`~streambroker.core.sizes`) without being read whole;
    the I/O layer then sets ``received`` to the bytes the replies took.
    """

    pool: str
    commands: Sequence[AnyCommand]
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


@dataclass(frozen=True, slots=True)
class Script:
    """A server-side Lua script of the broker, sent as ``EVALSHA`` with its :attr:`sha`.

    Every script made is listed by :func:`scripts`; when the server does not have one
    (``NOSCRIPT``), the I/O layers send it again as ``EVAL`` with its :attr:`text`
    (see :func:`streambroker.io.replies.missing_scripts`).
    """

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())
        _SCRIPTS[self.sha] = self


_SCRIPTS: dict[str, Script] = {}


def scripts() -> list[Script]:
    """Every script made so far (those of the modules imported), oldest first."""
    return list(_SCRIPTS.values())


def is_script(sha: Arg) -> bool:
    """Whether ``sha`` is the SHA1 of one of the broker's scripts."""
    return word_text(sha) in _SCRIPTS


def with_text(command: AnyCommand) -> Command:
    """The ``EVALSHA`` ``command`` of a :class:`Script` as ``EVAL`` with the script's text."""
    command = arguments(command)
    return ("EVAL", _SCRIPTS[word_text(command[1])].text, *command[2:])


class ReplyTooLargeError(PoolError):
    """The replies of a :class:`Send` went over its budget: the I/O layer stopped
    reading them and dropped the connection. The commands were carried out."""

    def __init__(self, pool: str, budget: int) -> None:
        self.budget = budget
        super().__init__(pool, f"the replies of a round trip took more than {budget} bytes")


#: The kinds of error replies the broker tells apart (:attr:`ReplyError.code`).
OOM = "OOM"
NOPERM = "NOPERM"
READONLY = "READONLY"
UNBLOCKED = "UNBLOCKED"
#: A cluster refused the command without running it (``MOVED``, ``ASK``, ``TRYAGAIN``,
#: ``CLUSTERDOWN``) after every attempt to follow it.
CLUSTER = "CLUSTER"


@dataclass(slots=True)
class ReplyError:
    """An error reply from the server, returned in place when ``allow_errors`` is set.

    ``message`` is the server's text; ``code`` is :data:`OOM` (out of memory),
    :data:`NOPERM` (the ACL refused the command, or a command of a script),
    :data:`READONLY` (the server is a replica: its master was switched),
    :data:`UNBLOCKED` (a blocking command was cut short as its master turned
    replica), :data:`CLUSTER` (a cluster refused to run the command, as while its slot
    moves or a failover is under way), or empty.
    """

    message: str
    code: str = ""

    @property
    def out_of_memory(self) -> bool:
        """Whether the server refused for want of memory (``maxmemory`` reached)."""
        return self.code == OOM

    @property
    def switched(self) -> bool:
        """Whether the server turned replica, or the cluster could not run the command
        for now: the reply says nothing of the command, the connection is to the wrong
        server (raised as :class:`~streambroker.PoolConnectionError`)."""
        return self.code in (READONLY, UNBLOCKED, CLUSTER)

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
        if self.switched:
            reason = _DEMOTED if self.code == READONLY else self.message
            return PoolConnectionError(pool, f"{what}: {reason}" if what else reason)
        return ServerReplyError(pool, f"{what}: {self.message}" if what else self.message)


#: Why a write met a replica: not a fault of the command, and nothing was written.
_DEMOTED = (
    "the server is a read-only replica (its master was switched, as in a failover): "
    "the command was not run"
)


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


def arguments(command: AnyCommand) -> Command:
    """The arguments of ``command`` (read back from the wire protocol when packed)."""
    if isinstance(command, bytes):
        reader = hiredis.Reader()
        reader.feed(command)
        return tuple(reader.gets())
    return command


def describe(command: AnyCommand) -> str:
    """A command as an error message names it: its name and what it acts on."""
    words = [word_text(word) for word in arguments(command)[:4]]
    name = words[0].upper()
    if name in ("EVAL", "EVALSHA"):
        return f"script on {words[3]}" if len(words) > 3 else "script"
    if name in ("XGROUP", "XINFO", "XREADGROUP"):  # a subcommand (or GROUP) comes first
        return " ".join(words[:3])
    return " ".join(words[:2])


def word_text(word: Arg) -> str:
    """A command's word as text."""
    return word.decode(errors="replace") if isinstance(word, bytes) else str(word)


def single(pool: str, *command: Arg) -> Send:
    """A :class:`Send` of one command."""
    return Send(pool, (command,))
