"""The wire format: how an event is laid out as one stream entry.

An entry's fields are the event's meta tags, as plain UTF-8 strings, plus two
reserved fields: ``$body`` (the encoded body) and ``$codec`` (``msgpack`` or
``json``, naming the body's encoding). Field names starting with ``$`` are reserved.
A body of ``None`` is written as no ``$body`` field at all, unless the event has no
meta either (an entry needs one field): then the codec's null is written.

Limits, checked before anything is sent: at most :data:`MAX_META_TAGS` meta tags, and
an entry of at most the broker's ``max_body_size`` bytes, counting the encoded body
and every meta tag's name and value (UTF-8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import hiredis

from ..errors import EncodeError, PayloadTooLargeError
from .codecs import Codec

__all__ = [
    "BODY_FIELD",
    "CODEC_FIELD",
    "MAX_META_TAGS",
    "RESERVED_PREFIX",
    "XaddPacker",
    "encode_fields",
    "xadd_packer",
]

BODY_FIELD = "$body"
CODEC_FIELD = "$codec"
RESERVED_PREFIX = "$"
#: The most meta tags one event may carry.
MAX_META_TAGS = 1000


def _too_large(stream: str, what: str, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"stream {stream}: {what}, more than the max_body_size limit of {limit} bytes"
    )


def encode_fields(
    stream: str,
    body: Any,
    meta: Mapping[str, str] | None,
    codec: Codec,
    max_body_size: int,
) -> list[str | bytes]:
    """The flat field/value list of one entry; raises before anything is sent."""
    fields: list[str | bytes] = []
    meta_size = 0
    if meta:
        if not isinstance(meta, Mapping):
            raise EncodeError(
                f"stream {stream}: meta must be a mapping of strings, got {type(meta).__name__}"
            )
        if len(meta) > MAX_META_TAGS:
            raise PayloadTooLargeError(
                f"stream {stream}: the event has {len(meta)} meta tags, more than the limit "
                f"of {MAX_META_TAGS}"
            )
        for key, value in meta.items():
            if not isinstance(key, str) or not key or key.startswith(RESERVED_PREFIX):
                raise EncodeError(
                    f"stream {stream}: meta key {key!r} is not allowed: keys are non-empty "
                    f"strings not starting with {RESERVED_PREFIX!r}"
                )
            if not isinstance(value, str):
                raise EncodeError(
                    f"stream {stream}: meta {key!r} must be a string, "
                    f"got {type(value).__name__} {value!r}"
                )
            try:
                # Encoded here, so that text the server cannot take (lone surrogates)
                # fails before anything is sent, as an EncodeError.
                name, text = key.encode(), value.encode()
            except UnicodeEncodeError as exc:
                raise EncodeError(
                    f"stream {stream}: meta {key!r} is not valid UTF-8 text: {exc}"
                ) from None
            fields.append(name)
            fields.append(text)
            meta_size += len(name) + len(text)
        if meta_size > max_body_size:
            what = f"the meta tags alone are {meta_size} bytes"
            raise _too_large(stream, what, max_body_size)
    if body is None and fields:
        return fields
    data = _encode_body(stream, body, codec, meta_size, max_body_size)
    fields.append(BODY_FIELD)
    fields.append(data)
    fields.append(CODEC_FIELD)
    fields.append(codec.name)
    return fields


def _encode_body(stream: str, body: Any, codec: Codec, meta_size: int, max_body_size: int) -> bytes:
    """The encoded ``body``, checked against the limit with ``meta_size`` bytes of meta."""
    try:
        data = codec.encode(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(
            f"stream {stream}: cannot encode a body of type {type(body).__name__} "
            f"with {codec.name}: {exc}"
        ) from exc
    if len(data) + meta_size > max_body_size:
        what = f"the event is {len(data) + meta_size} bytes (body {len(data)} + meta {meta_size})"
        raise _too_large(stream, what, max_body_size)
    return data


#: The length lines of the bulk strings of usual bodies, made once.
_LENGTHS = [b"$%d\r\n" % size for size in range(1024)]

#: Packs the ``XADD`` of one event (its body and meta tags) to one stream.
XaddPacker = Callable[[Any, Mapping[str, str] | None], bytes]


def xadd_packer(key: str, stream: str, codec: Codec, max_body_size: int) -> XaddPacker:
    """What packs the ``XADD`` of an entry to ``key`` in the wire protocol (as
    ``hiredis.pack_command`` would); it raises before anything is sent, as
    :func:`encode_fields`.

    The usual event (a body, no meta tags) costs one encoding and one join: the parts
    around its body are packed here, once per stream.
    """
    # hiredis packs each part, so the whole is what it would make of the command.
    packed_head: bytes = hiredis.pack_command(("XADD", key, "*", BODY_FIELD))  # type: ignore[arg-type]
    packed_tail: bytes = hiredis.pack_command((CODEC_FIELD, codec.name))  # type: ignore[arg-type]
    head = b"*7" + packed_head[2:]
    tail = b"\r\n" + packed_tail[packed_tail.index(b"\n") + 1 :]
    encode = codec.encode
    lengths = _LENGTHS
    known = len(lengths)

    def pack(body: Any, meta: Mapping[str, str] | None) -> bytes:
        if meta or body is None:
            fields = encode_fields(stream, body, meta, codec, max_body_size)
            packed: bytes = hiredis.pack_command(("XADD", key, "*", *fields))  # type: ignore[arg-type]
            return packed
        data: bytes | None
        try:
            data = encode(body)
        except (TypeError, ValueError, OverflowError):
            data = None
        if data is None or len(data) > max_body_size:
            data = _encode_body(stream, body, codec, 0, max_body_size)  # raises, naming the stream
        size = len(data)
        return b"".join((head, lengths[size] if size < known else b"$%d\r\n" % size, data, tail))

    return pack
