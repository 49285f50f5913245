"""Body codecs: msgpack (default) and JSON, both through msgspec. Never pickle.

A codec turns a body into bytes and back. Built-in types, dataclasses, msgspec
Structs, attrs classes and pydantic models encode; typed decoding accepts any
type msgspec understands, and pydantic models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import msgspec

from .errors import InvalidArgumentError

__all__ = ["CODECS", "Codec", "JsonCodec", "MsgpackCodec", "get_codec"]

T = TypeVar("T")


class Codec(Protocol):
    """Encodes event bodies to bytes and decodes them back."""

    name: str

    def encode(self, body: Any) -> bytes:
        """Encode ``body``; raise ``TypeError`` or ``ValueError`` when it cannot."""

    def decode(self, data: bytes, into: type[T] | None = None) -> Any:
        """Decode ``data``, into the type ``into`` when given."""


def _enc_hook(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)
    if callable(dump):  # pydantic models
        return dump(mode="json")
    raise TypeError(f"objects of type {type(obj).__name__} cannot be encoded")


def _is_pydantic(into: type[Any]) -> bool:
    return callable(getattr(into, "model_validate", None))


class _MsgspecCodec:
    name: str

    def __init__(self, encoder: Any, decoder: Any, module: Any) -> None:
        self._encode = encoder.encode
        self._decode = decoder.decode
        #: Decodes bytes into built-in types; the fastest way to a body.
        self.decode_plain: Callable[[bytes], Any] = decoder.decode
        self._module = module

    def encode(self, body: Any) -> bytes:
        data: bytes = self._encode(body)
        return data

    def decode(self, data: bytes, into: type[T] | None = None) -> Any:
        if into is None:
            return self._decode(data)
        if _is_pydantic(into):
            return into.model_validate(self._decode(data))  # type: ignore[attr-defined]
        return self._module.decode(data, type=into)


class MsgpackCodec(_MsgspecCodec):
    """MessagePack, compact and fast; the default."""

    name = "msgpack"

    def __init__(self) -> None:
        super().__init__(
            msgspec.msgpack.Encoder(enc_hook=_enc_hook), msgspec.msgpack.Decoder(), msgspec.msgpack
        )


class JsonCodec(_MsgspecCodec):
    """JSON (UTF-8), readable by anything."""

    name = "json"

    def __init__(self) -> None:
        super().__init__(
            msgspec.json.Encoder(enc_hook=_enc_hook), msgspec.json.Decoder(), msgspec.json
        )


CODECS: dict[str, Codec] = {"msgpack": MsgpackCodec(), "json": JsonCodec()}


def get_codec(name: str) -> Codec:
    """The codec registered under ``name`` (``msgpack`` or ``json``)."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(
            f"unknown codec {name!r}: choose one of {', '.join(CODECS)}"
        ) from None
