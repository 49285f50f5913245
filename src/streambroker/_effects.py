"""The sans-I/O protocol between the broker's logic and its I/O layers.

The logic (publishing, consuming, group creation, ...) is written once, as
generators that yield *effects* and receive their results. An I/O layer (the
synchronous one in ``_sync``) performs each effect and sends the result back, or
throws the error into the generator. No logic lives in an I/O layer.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import hiredis
import redis.asyncio.sentinel
import redis.exceptions as rex
import redis.sentinel

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
#: A command as a :class:`Send` carries it: its arguments, or the command already in the
#: wire protocol (bytes, as :func:`pack` would make it: see :func:`~.wire.xadd_packer`).
AnyCommand = Command | bytes

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
    (see :func:`missing_scripts`).
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


def with_text(command: AnyCommand) -> Command:
    """The ``EVALSHA`` ``command`` of a :class:`Script` as ``EVAL`` with the script's text."""
    command = arguments(command)
    return ("EVAL", _SCRIPTS[_text(command[1])].text, *command[2:])


def arguments(command: AnyCommand) -> Command:
    """The arguments of ``command`` (read back from the wire protocol when packed)."""
    if isinstance(command, bytes):
        reader = hiredis.Reader()
        reader.feed(command)
        return tuple(reader.gets())
    return command


class LoadedScripts:
    """What an I/O layer knows of the scripts each pool's server holds, so that a script
    the server lacks goes out with its text (``EVAL``) in its own place of the round
    trip: the commands after it must see what it did (a dead letter's acknowledgement
    before a re-read of the pending events, say).

    Before the first round trip with scripts to a pool, one ``SCRIPT EXISTS`` asks which
    of the broker's scripts the server holds; after that, a script is held once it ran.
    A ``NOSCRIPT`` (the server restarted or flushed its scripts) makes it ask again; that
    round trip's missing scripts are sent again after it (see :func:`missing_scripts`).
    Threads may share it: each method reads or changes one dict at a time. The methods
    take the round trip's :func:`scripts_of`, found once: round trips without scripts
    (batches of events) pay nothing more.
    """

    def __init__(self) -> None:
        self._held: dict[str, dict[str, bool]] = {}  # per pool: SHA1 -> held by its server
        self._unasked: set[str] = set()  # pools whose user may not run SCRIPT EXISTS

    def probe(self, pool: str, shas: Sequence[tuple[int, str]]) -> Command | None:
        """The ``SCRIPT EXISTS`` to send before a round trip of ``shas``, or None."""
        if pool in self._unasked:
            return None
        held = self._held.get(pool)
        if held is None:
            return ("SCRIPT", "EXISTS", *_SCRIPTS)
        unknown = [sha for _, sha in shas if sha not in held]
        return ("SCRIPT", "EXISTS", *unknown) if unknown else None

    def learn(self, pool: str, probe: Command, reply: Any) -> None:
        """Take in the reply to :meth:`probe`'s command."""
        if isinstance(reply, BaseException):
            self._unasked.add(pool)  # EVALSHA and its NOSCRIPT fallback still work
            return
        held = self._held.setdefault(pool, {})
        for sha, is_held in zip(probe[2:], reply, strict=True):
            held[str(sha)] = bool(is_held)

    def commands(self, send: Send, shas: Sequence[tuple[int, str]]) -> Sequence[AnyCommand]:
        """The commands of ``send``, with the scripts the server lacks as ``EVAL``."""
        held = self._held.get(send.pool)
        lacking = [index for index, sha in shas if held is not None and not held.get(sha, True)]
        if not lacking:
            return send.commands
        commands = list(send.commands)
        for index in lacking:
            commands[index] = with_text(commands[index])
        return commands

    def ran(self, pool: str, shas: Sequence[tuple[int, str]], replies: Sequence[Any]) -> None:
        """Take in the replies of a round trip of ``shas``: the scripts that ran are held
        by the server now; a ``NOSCRIPT`` means it forgot them (ask again next time)."""
        held = self._held.get(pool)
        for index, sha in shas:
            reply = replies[index]
            if isinstance(reply, rex.NoScriptError):
                self._held.pop(pool, None)
                return
            if held is not None and not isinstance(reply, BaseException):
                held[sha] = True


def scripts_of(send: Send) -> list[tuple[int, str]]:
    """The ``EVALSHA`` commands of ``send`` with a script of the broker: (index, SHA1)."""
    return [
        (index, command[1])
        for index, command in enumerate(send.commands)
        if command[0] == "EVALSHA" and isinstance(command[1], str) and command[1] in _SCRIPTS
    ]


def _missing(send: Send, replies: Sequence[Any]) -> list[int]:
    """The indexes of the ``EVALSHA`` commands of ``send`` whose reply is ``NOSCRIPT``:
    the script did not run. Never within ``MULTI`` … ``EXEC``: sent alone, the script
    would run outside the transaction, whose other commands were applied or not."""
    missing: list[int] = []
    if not any(isinstance(reply, rex.NoScriptError) for reply in replies):
        return missing
    queued = False
    for index, (packed, reply) in enumerate(zip(send.commands, replies, strict=True)):
        command = arguments(packed)
        name = _text(command[0]).upper()
        if name == "MULTI":
            queued = True
        elif name in ("EXEC", "DISCARD"):
            queued = False
        elif (
            not queued
            and name == "EVALSHA"
            and isinstance(reply, rex.NoScriptError)
            and _text(command[1]) in _SCRIPTS
        ):
            missing.append(index)
    return missing


def missing_scripts(send: Send, replies: Sequence[Any]) -> list[Command]:
    """The commands to send again, as ``EVAL`` with their text, after ``replies`` (raw,
    errors in place) to ``send``: those whose script the server did not have.

    Nothing else is ever sent again. A script sent again runs after the commands that
    followed it in ``send``; the broker's round trips do not depend on that order.
    """
    return [with_text(send.commands[index]) for index in _missing(send, replies)]


def put_back(send: Send, replies: list[Any], again: Sequence[Any]) -> list[Any]:
    """``replies`` to ``send`` with the replies ``again`` to its :func:`missing_scripts`
    in place of their ``NOSCRIPT`` ones."""
    for index, reply in zip(_missing(send, replies), again, strict=True):
        replies[index] = reply
    return replies


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
READONLY = "READONLY"
UNBLOCKED = "UNBLOCKED"
#: What a command blocked on a master that turns replica gets (Redis and Valkey alike).
_TURNED_REPLICA = ("UNBLOCKED", "instance state changed")


@dataclass(slots=True)
class ReplyError:
    """An error reply from the server, returned in place when ``allow_errors`` is set.

    ``message`` is the server's text; ``code`` is :data:`OOM` (out of memory),
    :data:`NOPERM` (the ACL refused the command, or a command of a script),
    :data:`READONLY` (the server is a replica: its master was switched),
    :data:`UNBLOCKED` (a blocking command was cut short as its master turned
    replica), or empty.
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
        if isinstance(exc, rex.ReadOnlyError):
            return cls(message, READONLY)
        if message.startswith(_TURNED_REPLICA[0]) and _TURNED_REPLICA[1] in message:
            return cls(message, UNBLOCKED)
        return cls(message)

    @property
    def out_of_memory(self) -> bool:
        """Whether the server refused for want of memory (``maxmemory`` reached)."""
        return self.code == OOM

    @property
    def switched(self) -> bool:
        """Whether the server turned replica: the reply says nothing of the command, the
        connection is to the wrong server."""
        return self.code in (READONLY, UNBLOCKED)

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
_MASTER_NOT_FOUND = (redis.sentinel.MasterNotFoundError, redis.asyncio.sentinel.MasterNotFoundError)
_NO_MASTER = "no sentinel names a master of the pool's service (is a failover under way?)"


def translate_error(exc: rex.RedisError, pool: str, connecting_tls: bool = False) -> BrokerError:
    """Turn a redis-py error into the broker's error naming the pool (``connecting_tls``:
    raised while opening a TLS connection)."""
    if isinstance(exc, rex.ResponseError):
        return ReplyError.of(exc).error(pool)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, _MASTER_NOT_FOUND):
        return PoolConnectionError(pool, f"{_NO_MASTER}: {text}")
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return PoolAuthenticationError(pool, text)
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
        hint = _tls_hint(exc, connecting_tls)
        return PoolConnectionError(pool, f"{text} ({hint})" if hint else text)
    return PoolError(pool, text)


#: What the server's TLS alerts about the client's certificate mean, by their reason.
_CLIENT_CERTIFICATE_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate: "
    "give ssl_certfile and ssl_keyfile",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client certificate has expired",
}


def _tls_hint(exc: BaseException, connecting_tls: bool) -> str | None:
    """What the TLS failure behind ``exc`` says of the client's certificate, if anything.

    A server refusing the client's certificate alerts it after the handshake, and the
    client sees the alert or, when the server closed first, only the end (or reset) of
    the connection it was opening; each is explained here.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError | ConnectionResetError):
        cause = cause.__cause__ or cause.__context__
    if connecting_tls and isinstance(cause, ssl.SSLEOFError | ConnectionResetError):
        return (
            "the server ended the TLS connection: it may require a client certificate "
            "(ssl_certfile, ssl_keyfile) or not trust the one given"
        )
    if isinstance(cause, ssl.SSLError) and "PEM lib" in str(cause):
        # What loading a protected key with the wrong passphrase raises, without a reason.
        return "the client key cannot be read: is its ssl_password right?"
    # ``reason`` is the name OpenSSL gives the error (an SSLError made in Python has none).
    reason = getattr(cause, "reason", None) if isinstance(cause, ssl.SSLError) else None
    return _CLIENT_CERTIFICATE_ALERTS.get(reason) if isinstance(reason, str) else None


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
    """Within the block, redis-py errors become the broker's errors naming ``pool``
    (``connecting_tls``: the block opens a TLS connection)."""

    __slots__ = ("connecting_tls", "pool")

    def __init__(self, pool: str, connecting_tls: bool = False) -> None:
        self.pool = pool
        self.connecting_tls = connecting_tls

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, rex.RedisError):
            raise translate_error(exc, self.pool, self.connecting_tls) from exc


def pack(commands: Sequence[AnyCommand]) -> list[bytes]:
    """``commands`` in the wire protocol, as one buffer: a round trip is one write.

    The list is the form redis-py connections' ``send_packed_command`` takes.
    """
    return [
        b"".join(
            [
                command if isinstance(command, bytes) else hiredis.pack_command(command)  # type: ignore[arg-type]
                for command in commands
            ]
        )
    ]


def settle(send: Send, replies: list[Any]) -> list[Any]:
    """The replies to ``send``, read in order with error replies in place (redis-py's
    ``ResponseError``): those become :class:`ReplyError` with ``allow_errors``; without,
    the first one raises its :meth:`ReplyError.error`, naming the command (after every
    reply was read, so the connection stays usable). A ``READONLY`` or ``UNBLOCKED``
    reply (the server is a replica now) always raises, as a :class:`PoolConnectionError`.
    """
    for index, reply in enumerate(replies):
        if isinstance(reply, rex.ResponseError):
            error = ReplyError.of(reply)
            if not send.allow_errors or error.switched:
                raise error.error(send.pool, describe(send.commands[index])) from reply
            replies[index] = error
    return replies


def describe(command: AnyCommand) -> str:
    """A command as an error message names it: its name and what it acts on."""
    words = [_text(word) for word in arguments(command)[:4]]
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
