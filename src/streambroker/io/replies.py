"""The broker's side of redis-py's replies and errors, for both I/O layers.

Replies of a round trip come back raw, error replies in place; here they are settled
into the core's :class:`~streambroker.core.effects.ReplyError` values or the broker's
errors naming the pool, and the scripts a server lacks are sent with their text.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio.sentinel
import redis.exceptions as rex
import redis.sentinel

from ..core.effects import (
    CLUSTER,
    NOPERM,
    OOM,
    READONLY,
    UNBLOCKED,
    AnyCommand,
    Command,
    ReplyError,
    Send,
    arguments,
    describe,
    is_script,
    scripts,
    with_text,
    word_text,
)
from ..errors import (
    BrokerError,
    PoolAuthenticationError,
    PoolConnectionError,
    PoolError,
)


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
        # Per pool (per node of a cluster pool, named "<pool> <host:port>"): SHA1 -> held.
        self._held: dict[str, dict[str, bool]] = {}
        self._unasked: set[str] = set()  # pools whose user may not run SCRIPT EXISTS

    def probe(self, pool: str, shas: Sequence[tuple[int, str]]) -> Command | None:
        """The ``SCRIPT EXISTS`` to send before a round trip of ``shas``, or None."""
        if pool in self._unasked:
            return None
        held = self._held.get(pool)
        if held is None:
            return ("SCRIPT", "EXISTS", *[script.sha for script in scripts()])
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

    def commands(
        self, send: Send, shas: Sequence[tuple[int, str]], pool: str | None = None
    ) -> Sequence[AnyCommand]:
        """The commands of ``send``, with the scripts the server lacks as ``EVAL``
        (``pool``: the name the server is known by here, default the send's pool)."""
        held = self._held.get(send.pool if pool is None else pool)
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
        (index, word_text(command[1]))
        for index, command in enumerate(send.commands)
        if command[0] == "EVALSHA" and is_script(command[1])
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
        name = word_text(command[0]).upper()
        if name == "MULTI":
            queued = True
        elif name in ("EXEC", "DISCARD"):
            queued = False
        elif (
            not queued
            and name == "EVALSHA"
            and isinstance(reply, rex.NoScriptError)
            and is_script(command[1])
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


#: A command of a script refused by the ACL makes a plain ``ERR`` reply, not ``NOPERM``:
#: "ACL failure in script: …" (Valkey), "The user executing the script can't …" (Redis 7.0).
_SCRIPT_ACL_FAILURES = ("ACL failure in script", "The user executing the script can't")
#: What a cluster refuses without running the command (``MovedError`` is an ``AskError``).
_REFUSED = (rex.AskError, rex.TryAgainError, rex.ClusterDownError)
#: What a command blocked on a master that turns replica gets (Redis and Valkey alike).
_TURNED_REPLICA = ("UNBLOCKED", "instance state changed")


def reply_error(exc: rex.ResponseError) -> ReplyError:
    """The error reply redis-py's parser made ``exc`` of."""
    message = str(exc)
    if isinstance(exc, rex.OutOfMemoryError):
        return ReplyError(message, OOM)
    if isinstance(exc, rex.NoPermissionError) or message.startswith(_SCRIPT_ACL_FAILURES):
        return ReplyError(message, NOPERM)
    if isinstance(exc, rex.ReadOnlyError):
        return ReplyError(message, READONLY)
    if isinstance(exc, _REFUSED):
        code = getattr(exc, "status_code", None) or type(exc).__name__
        return ReplyError(f"{code} {message}", CLUSTER)
    if message.startswith(_TURNED_REPLICA[0]) and _TURNED_REPLICA[1] in message:
        return ReplyError(message, UNBLOCKED)
    return ReplyError(message)


_MASTER_NOT_FOUND = (redis.sentinel.MasterNotFoundError, redis.asyncio.sentinel.MasterNotFoundError)
_NO_MASTER = "no sentinel names a master of the pool's service (is a failover under way?)"


def translate_error(exc: rex.RedisError, pool: str, connecting_tls: bool = False) -> BrokerError:
    """Turn a redis-py error into the broker's error naming the pool (``connecting_tls``:
    raised while opening a TLS connection)."""
    if isinstance(exc, rex.ResponseError):
        return reply_error(exc).error(pool)
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
            error = reply_error(reply)
            if not send.allow_errors or error.switched:
                raise error.error(send.pool, describe(send.commands[index])) from reply
            replies[index] = error
    return replies
