"""The exception hierarchy: every error the broker raises is a :class:`BrokerError`."""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "ConsumerBusyError",
    "DecodeError",
    "EmbeddedServerError",
    "EncodeError",
    "EntryTooLargeError",
    "InvalidArgumentError",
    "LeaseLostError",
    "OutOfMemoryError",
    "PayloadError",
    "PayloadTooLargeError",
    "PoolAuthenticationError",
    "PoolConnectionError",
    "PoolError",
    "PoolPermissionError",
    "ReplicationError",
    "ServerReplyError",
    "UnknownGroupError",
    "UnknownStreamError",
]


class BrokerError(Exception):
    """Base class of every error raised by streambroker."""


class ConfigError(BrokerError):
    """The registry or its YAML source is invalid.

    ``problems`` lists every problem found; the message joins them, one per line.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        super().__init__("\n".join(self.problems))


class UnknownStreamError(BrokerError, LookupError):
    """A stream name that is not registered."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        super().__init__(f"stream {stream!r} is not registered")


class UnknownGroupError(BrokerError, LookupError):
    """A consumer group name that is not registered for any stream."""

    def __init__(self, group: str) -> None:
        self.group = group
        super().__init__(f"consumer group {group!r} is not registered for any stream")


class ConsumerBusyError(BrokerError):
    """Another live process consumes under the same group and consumer name."""

    def __init__(self, group: str, consumer: str, message: str | None = None) -> None:
        self.group = group
        self.consumer = consumer
        super().__init__(
            message
            or f"consumer {consumer!r} of group {group!r} is already running in another process"
        )


class LeaseLostError(ConsumerBusyError):
    """The consumer's lease expired and another process took its name over.

    Raised by a consumer that was paused (or cut off) longer than its lease: its
    events may be in other hands, so it stops instead of acknowledging them.
    """


class InvalidArgumentError(BrokerError, ValueError):
    """An argument out of its allowed range or of the wrong type."""


class PayloadError(BrokerError):
    """An event body or meta that cannot be written or read."""


class EncodeError(PayloadError, TypeError):
    """The body or meta of an event cannot be encoded; nothing was sent."""


class PayloadTooLargeError(PayloadError, ValueError):
    """The event has more than 1,000 meta tags, or its entry (the encoded body plus every
    meta name and value) is larger than the broker's ``max_body_size``; nothing was sent."""


class DecodeError(PayloadError, ValueError):
    """A stream entry that cannot be decoded (foreign, corrupt, or of another type)."""


class EntryTooLargeError(PayloadError, ValueError):
    """A stream entry larger than the broker's ``max_entry_size``, which ``read()``
    stops at without reading it; ``stream`` and ``id`` name it, ``size`` is its size
    as the limit counts it. Reading on after ``id`` skips it."""

    def __init__(self, stream: str, entry_id: str, size: int, limit: int) -> None:
        self.stream = stream
        self.id = entry_id
        self.size = size
        super().__init__(
            f"stream {stream}: entry {entry_id} is {size} bytes, more than the "
            f"max_entry_size limit of {limit} bytes, so it was not read (read after "
            f"{entry_id} to skip it)"
        )


class PoolError(BrokerError):
    """A failure talking to one Redis pool; ``pool`` names it."""

    def __init__(self, pool: str, message: str) -> None:
        self.pool = pool
        super().__init__(f"redis pool {pool!r}: {message}")


class PoolConnectionError(PoolError, ConnectionError):
    """The pool's server could not be reached, or the connection broke or timed out."""


class PoolAuthenticationError(PoolError, PermissionError):
    """The pool's server refused the credentials or the permission for a command.

    Never retried: consumers and ``streambroker worker`` stop at once.
    """


class PoolPermissionError(PoolAuthenticationError):
    """The pool's user may not run a command (``NOPERM``, from the ACL), or a command a
    script runs; ``command`` names it as the message does (``XADD stream-a``,
    ``script on stream-a``)."""

    def __init__(self, pool: str, message: str, command: str = "") -> None:
        self.command = command
        super().__init__(pool, f"{command}: {message}" if command else message)


class ReplicationError(PoolError):
    """Fewer replicas than asked (``wait_replicas``) acknowledged events in time.

    The events were written to the pool's master (``ids`` lists them), but a failover
    before they reach a replica may lose them. Publishing them again may store them twice.
    ``acknowledged`` replicas acknowledged them, of the ``wanted`` asked for.
    """

    def __init__(
        self, pool: str, ids: list[str], acknowledged: int, wanted: int, timeout: float
    ) -> None:
        self.ids = ids
        self.acknowledged = acknowledged
        self.wanted = wanted
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        what = f"event {shown} was" if len(ids) == 1 else f"{len(ids)} events ({shown}) were"
        super().__init__(
            pool,
            f"{what} written to the master, but {acknowledged} of the {wanted} replicas "
            f"asked for acknowledged within {timeout:g} s: a failover may lose them",
        )


class ServerReplyError(PoolError):
    """The server answered a command with an error reply."""


class OutOfMemoryError(ServerReplyError):
    """The pool's server is out of memory (``OOM``): its ``maxmemory`` is reached and
    nothing may be evicted, so it refuses commands that need memory, such as publishing.

    Reading, acknowledging and collecting still work: the server frees up as consumers
    acknowledge events and collection removes them, or when ``maxmemory`` is raised.
    ``command`` names what was refused (``XADD stream-a``).
    """

    def __init__(self, pool: str, command: str = "") -> None:
        self.command = command
        message = (
            "the server is out of memory (used memory reached maxmemory and nothing may be "
            "evicted), so it refuses new data until consumers acknowledge events (collection "
            "then removes them) or maxmemory is raised"
        )
        super().__init__(pool, f"{command}: {message}" if command else message)


class EmbeddedServerError(BrokerError):
    """The embedded server could not be started, reached or stopped."""
