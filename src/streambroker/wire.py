"""The wire format: how an event is laid out as one stream entry.

An entry's fields are the event's meta tags, as plain UTF-8 strings, plus two
reserved fields: ``$body`` (the encoded body) and ``$codec`` (``msgpack`` or
``json``, naming the body's encoding). Field names starting with ``$`` are reserved.
A body of ``None`` is written as no ``$body`` field at all, unless the event has no
meta either (an entry needs one field): then the codec's null is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .codecs import Codec
from .errors import EncodeError, PayloadTooLargeError

__all__ = ["BODY_FIELD", "CODEC_FIELD", "RESERVED_PREFIX", "encode_fields"]

BODY_FIELD = "$body"
CODEC_FIELD = "$codec"
RESERVED_PREFIX = "$"


def encode_fields(
    stream: str,
    body: Any,
    meta: Mapping[str, str] | None,
    codec: Codec,
    max_body_size: int,
) -> list[str | bytes]:
    """The flat field/value list of one entry; raises before anything is sent."""
    fields: list[str | bytes] = []
    if meta:
        if not isinstance(meta, Mapping):
            raise EncodeError(
                f"stream {stream}: meta must be a mapping of strings, got {type(meta).__name__}"
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
                fields.append(key.encode())
                fields.append(value.encode())
            except UnicodeEncodeError as exc:
                raise EncodeError(
                    f"stream {stream}: meta {key!r} is not valid UTF-8 text: {exc}"
                ) from None
    if body is None and fields:
        return fields
    try:
        data = codec.encode(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(
            f"stream {stream}: cannot encode a body of type {type(body).__name__} "
            f"with {codec.name}: {exc}"
        ) from exc
    if len(data) > max_body_size:
        raise PayloadTooLargeError(
            f"stream {stream}: the encoded body is {len(data)} bytes, more than the "
            f"limit of {max_body_size} bytes"
        )
    fields.append(BODY_FIELD)
    fields.append(data)
    fields.append(CODEC_FIELD)
    fields.append(codec.name)
    return fields
