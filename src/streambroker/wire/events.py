"""The event a handler receives: id, stream, meta tags and a lazily decoded body."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Generic

from typing_extensions import TypeVar

from ..errors import DecodeError
from .codecs import CODECS
from .entry import BODY_FIELD, CODEC_FIELD, RESERVED_PREFIX

__all__ = ["Event"]

T = TypeVar("T")
#: The type of an event's body, as a typed handler's ``model`` makes it.
BodyT = TypeVar("BodyT", default=Any)

_BODY = BODY_FIELD.encode()
_CODEC = CODEC_FIELD.encode()
_RESERVED = RESERVED_PREFIX.encode()
_UNSET: Any = object()
_CODECS_BY_NAME = {name.encode(): codec for name, codec in CODECS.items()}
_PLAIN = {
    name: decode
    for name, codec in _CODECS_BY_NAME.items()
    if (decode := getattr(codec, "decode_plain", None)) is not None
}


def _type_name(into: Any) -> str:
    # Unions (``int | None``) and other special forms have no __name__.
    name = getattr(into, "__name__", None)
    return name if isinstance(name, str) else repr(into)


class Event(Generic[BodyT]):
    """One event read from a stream; ``Event[Painting]`` is one whose body is a ``Painting``.

    The body is decoded on first access, so an entry that cannot be decoded (written
    by another program, or corrupt) does not stop the consumer: reading its
    ``body``, ``meta`` or ``decode()`` raises :class:`~streambroker.DecodeError`.
    """

    __slots__ = (
        "_body",
        "_fields",
        "_meta",
        "acked",
        "delivery_count",
        "error",
        "id",
        "key",
        "read_at",
        "stream",
    )

    def __init__(
        self,
        stream: str,
        event_id: str,
        fields: list[bytes],
        key: str | None = None,
        delivery_count: int = 1,
        read_at: float = 0.0,
    ) -> None:
        self.stream = stream
        self.id = event_id
        self._fields = fields
        self._meta: Mapping[str, str] | None = None
        self._body: Any = _UNSET
        #: The Redis key the event was read from: the stream, or the group's replay stream.
        self.key = key if key is not None else stream
        #: How many times the server has delivered this event (1 the first time).
        self.delivery_count = delivery_count
        #: When it was read (``time.monotonic()``).
        self.read_at = read_at
        #: True once :meth:`ack` was called in the handler.
        self.acked = False
        #: The error given to :meth:`fail`, if the handler failed this event.
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        try:
            meta: object = dict(self.meta)
        except DecodeError:
            meta = "<not UTF-8>"
        return (
            f"Event(stream={self.stream!r}, id={self.id!r}, meta={meta!r}, "
            f"delivery_count={self.delivery_count})"
        )

    def ack(self) -> None:
        """Acknowledge this event even if the handler raises afterwards (undoes :meth:`fail`).

        Acknowledgements are sent together when the handler returns or raises; events
        the handler did not ack are acknowledged when it returns normally.
        """
        self.acked = True
        self.error = None

    def fail(self, error: BaseException | str = "failed") -> None:
        """Mark this event as failed without failing the rest of the batch.

        It is not acknowledged: it is delivered again after a back-off, and after
        ``max_deliveries`` deliveries it becomes a dead letter carrying ``error``.
        """
        self.error = error if isinstance(error, BaseException) else RuntimeError(error)
        self.acked = False

    def _field(self, name: bytes) -> bytes | None:
        fields = self._fields
        for i in range(0, len(fields) - 1, 2):
            if fields[i] == name:
                return fields[i + 1]
        return None

    def _fail(self, what: str) -> DecodeError:
        return DecodeError(f"stream {self.stream}, event {self.id}: {what}")

    @property
    def meta(self) -> Mapping[str, str]:
        """The meta tags (every field not starting with ``$``), as strings."""
        if self._meta is None:
            fields = self._fields
            try:
                meta = {
                    fields[i].decode(): fields[i + 1].decode()
                    for i in range(0, len(fields) - 1, 2)
                    if not fields[i].startswith(_RESERVED)
                }
            except UnicodeDecodeError as exc:
                raise self._fail(f"a meta field is not UTF-8 text: {exc}") from None
            self._meta = MappingProxyType(meta)
        return self._meta

    def tag(self, key: str) -> str:
        """The meta tag ``key``, or ``""`` when the event has none."""
        return self.meta.get(key, "")

    @property
    def codec(self) -> str | None:
        """The name of the codec that encoded the body; None when there is no body."""
        raw = self._field(_CODEC)
        return raw.decode(errors="replace") if raw is not None else None

    @property
    def raw_body(self) -> bytes | None:
        """The encoded body as stored, or None for an event without a body."""
        return self._field(_BODY)

    @property
    def body(self) -> BodyT:
        """The decoded body (None for meta-only events); decoded into the handler's
        ``model`` when it has one."""
        if self._body is _UNSET:
            fields = self._fields
            # The fast path, for entries laid out as the broker writes them.
            decode = _PLAIN.get(fields[-1]) if len(fields) >= 4 else None
            if decode is not None and fields[-4] == _BODY and fields[-2] == _CODEC:
                try:
                    self._body = decode(fields[-3])
                except Exception:
                    self._body = self._decode(None)  # raises the error naming the event
            else:
                self._body = self._decode(None)
        body: BodyT = self._body
        return body

    def _set_body(self, body: Any) -> None:
        """Make ``body`` the event's body (decoded by the broker into a handler's model)."""
        self._body = body

    def decode(self, into: type[T]) -> T:
        """Decode the body into ``into`` (a dataclass, msgspec Struct, pydantic model, ...)."""
        result: T = self._decode(into)
        return result

    def _body_and_codec(self) -> tuple[bytes | None, bytes | None]:
        fields = self._fields
        # The broker writes them last: look there first.
        if len(fields) >= 4 and fields[-4] == _BODY and fields[-2] == _CODEC:
            return fields[-3], fields[-1]
        return self._field(_BODY), self._field(_CODEC)

    def _decode(self, into: type[Any] | None) -> Any:
        raw, codec_name = self._body_and_codec()
        if raw is None:
            if into is None:
                return None
            raise self._fail(f"the event has no body to decode into {_type_name(into)}")
        if codec_name is None:
            raise self._fail(f"the entry has a {BODY_FIELD} field but no {CODEC_FIELD}")
        codec = _CODECS_BY_NAME.get(codec_name)
        if codec is None:
            raise self._fail(f"unknown codec {codec_name.decode(errors='replace')!r}")
        try:
            if into is None:
                return codec.decode(raw)
            return codec.decode(raw, into)
        except Exception as exc:
            target = f" into {_type_name(into)}" if into is not None else ""
            raise self._fail(f"cannot decode the {codec.name} body{target}: {exc}") from exc
