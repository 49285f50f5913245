"""Body codecs: msgpack (default) and JSON, both through msgspec. Never pickle.

A codec turns a body into bytes and back. Built-in types, dataclasses, msgspec
Structs, attrs classes and pydantic models encode; typed decoding accepts any
type msgspec understands, and pydantic models, and restores what the type says
(tuples, sets, bytes, datetimes, UUIDs, decimals, int keys). Decoding without a type
gives what the format holds: see the README's table of what each codec changes.
JSON has no NaN or infinity, so the JSON codec refuses them rather than send null.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import msgspec

from ..errors import InvalidArgumentError

__all__ = ["CODECS", "Codec", "JsonCodec", "MsgpackCodec", "get_codec"]

T = TypeVar("T")


class Codec(Protocol):
    """Encodes event bodies to bytes and decodes them back."""

    name: str

    def encode(self, body: Any) -> bytes:
        """Encode ``body``; raise ``TypeError`` or ``ValueError`` when it cannot."""

    def decode(self, data: bytes, into: type[T] | None = None) -> Any:
        """Decode ``data``, into the type ``into`` when given."""


def _hook(mode: str) -> Callable[[Any], Any]:
    """msgspec's hook for what it cannot encode itself: pydantic models, dumped in
    ``mode`` (``python`` keeps bytes and datetimes for msgpack; ``json`` is pydantic's
    own JSON form)."""

    def enc_hook(obj: Any) -> Any:
        dump = getattr(obj, "model_dump", None)
        if callable(dump):
            return dump(mode=mode)
        raise TypeError(f"objects of type {type(obj).__name__} cannot be encoded")

    return enc_hook


def _non_finite(value: Any) -> bool:
    """Whether ``value`` holds a NaN or an infinite float anywhere."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(key) or _non_finite(item) for key, item in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_non_finite(item) for item in value)
    fields = (
        getattr(value, "__struct_fields__", None)
        or getattr(value, "__dataclass_fields__", None)
        or [attribute.name for attribute in getattr(value, "__attrs_attrs__", ())]
    )
    if fields:
        return any(_non_finite(getattr(value, name)) for name in fields)
    dump = getattr(value, "model_dump", None)
    return callable(dump) and _non_finite(dump())


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
            msgspec.msgpack.Encoder(enc_hook=_hook("python")),
            msgspec.msgpack.Decoder(),
            msgspec.msgpack,
        )
        self.encode = self._encode  # type: ignore[method-assign] # msgspec's own: one call less


class JsonCodec(_MsgspecCodec):
    """JSON (UTF-8), readable by anything."""

    name = "json"

    def __init__(self) -> None:
        super().__init__(
            msgspec.json.Encoder(enc_hook=_hook("json")), msgspec.json.Decoder(), msgspec.json
        )

    def encode(self, body: Any) -> bytes:
        data = super().encode(body)
        # msgspec writes NaN and infinities as null; only a body with a null can hold one.
        if b"null" in data and _non_finite(body):
            raise ValueError("JSON has no NaN or infinity (use msgpack, or None)")
        return data


CODECS: dict[str, Codec] = {"msgpack": MsgpackCodec(), "json": JsonCodec()}


def get_codec(name: str) -> Codec:
    """The codec registered under ``name`` (``msgpack`` or ``json``)."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(
            f"unknown codec {name!r}: choose one of {', '.join(CODECS)}"
        ) from None
