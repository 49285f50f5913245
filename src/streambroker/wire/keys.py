"""Names of the broker's keys: each stream's key and its own keys beside it.

A registry's ``key_prefix`` ``P`` (empty by default) starts every key. For a stream
``orders`` and a group ``billing``, with no prefix:

- ``orders`` — the stream (``P`` + its name);
- ``{orders}:sb:dead:6:orders:billing`` — the group's dead letters (a stream);
- ``{orders}:sb:replay:6:orders:billing`` — dead letters put back for that group only
  (a stream read by the group's consumers together with ``orders``);
- ``{sb:lease:7:billing}:<consumer>`` — the lease that keeps a consumer name to one
  process.

The dead letters and replays of a stream carry the stream key's hash tag (a Redis
Cluster hash tag: its own when it has one, else the whole key), so they share its
hash slot and a server-side script may touch them together; the leases of a group
share a slot of their own. Each name is written after its length (in characters),
so no two (stream, group) or (group, consumer) pairs share a key whatever the names
hold, and :func:`decode_key` reads any of these keys back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..config.registry import StreamSpec

__all__ = [
    "DerivedKey",
    "dead_letter_key",
    "decode_key",
    "hash_tag",
    "lease_key",
    "replay_key",
    "slot_tag",
]

_LEASE = "sb:lease:"


def hash_tag(key: str) -> str | None:
    """The hash tag of ``key`` (what Redis Cluster hashes), or None when it has none.

    As in Redis: the text between the first ``{`` and the first ``}`` after it, when
    that text is not empty.
    """
    start = key.find("{")
    if start == -1:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


def slot_tag(key: str) -> str | None:
    """What to put between ``{`` and ``}`` so a key hashes to the slot of ``key``.

    None when no key can: ``key`` has no hash tag but holds ``}``, so it is hashed
    whole and a tag cannot hold it.
    """
    tag = hash_tag(key)
    if tag is not None:
        return tag
    return None if "}" in key else key


def _side_key(stream: StreamSpec, kind: str, group: str) -> str:
    tag = slot_tag(stream.key)
    if tag is None:  # validate() refuses such streams
        raise ValueError(f"stream {stream.name!r} cannot have keys in its hash slot")
    return f"{stream.key_prefix}{{{tag}}}:sb:{kind}:{len(stream.name)}:{stream.name}:{group}"


def dead_letter_key(stream: StreamSpec, group: str) -> str:
    """The stream of ``group``'s dead letters from ``stream``."""
    return _side_key(stream, "dead", group)


def replay_key(stream: StreamSpec, group: str) -> str:
    """The stream of ``stream``'s events replayed to ``group`` only."""
    return _side_key(stream, "replay", group)


def lease_key(prefix: str, group: str, consumer: str) -> str:
    """The lease of the consumer name ``consumer`` in ``group``."""
    return f"{prefix}{{{_LEASE}{len(group)}:{group}}}:{consumer}"


@dataclass(frozen=True)
class DerivedKey:
    """What one of the broker's own keys is for: ``kind`` and the names it holds.

    ``stream`` and ``group`` for dead letters and replays; ``group`` and
    ``consumer`` for a lease (``stream`` is empty then).
    """

    kind: Literal["dead", "replay", "lease"]
    stream: str
    group: str
    consumer: str = ""

    def describe(self) -> str:
        """The key's purpose in words, for messages."""
        if self.kind == "lease":
            return f"the lease key of consumer {self.consumer!r} in group {self.group!r}"
        what = "dead-letter" if self.kind == "dead" else "replay"
        return f"the {what} key of stream {self.stream!r}, group {self.group!r}"


def _counted(text: str) -> tuple[str, str] | None:
    """Split ``<n>:<n characters>`` off the front of ``text``: (the name, the rest)."""
    digits, colon, rest = text.partition(":")
    if not colon or not (digits.isascii() and digits.isdigit()) or digits != str(int(digits)):
        return None
    length = int(digits)
    if length > len(rest):
        return None
    return rest[:length], rest[length:]


def decode_key(prefix: str, key: str) -> DerivedKey | None:
    """What ``key`` is when it is a dead-letter, replay or lease key of a registry with
    ``prefix``; None when it is none of them (a stream key, or another program's)."""
    if not key.startswith(prefix + "{"):
        return None
    rest = key[len(prefix) + 1 :]
    if rest.startswith(_LEASE):
        counted = _counted(rest[len(_LEASE) :])
        if counted is None:
            return None
        group, tail = counted
        if not tail.startswith("}:") or len(tail) == 2:
            return None
        return DerivedKey("lease", "", group, tail[2:])
    tag, brace, rest = rest.partition("}")
    for kind in ("dead", "replay"):
        if brace and rest.startswith(f":sb:{kind}:"):
            counted = _counted(rest[len(kind) + 5 :])
            if counted is None:
                return None
            stream, tail = counted
            if tail[:1] != ":" or len(tail) == 1 or slot_tag(prefix + stream) != tag:
                return None
            return DerivedKey("dead" if kind == "dead" else "replay", stream, tail[1:])
    return None
