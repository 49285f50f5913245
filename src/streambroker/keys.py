"""Names of the broker's own keys beside each stream.

Every key that belongs to a stream shares the stream's hash slot (a Redis Cluster
hash tag), so a server-side script may touch the stream and its dead letters
together. For a stream ``orders`` and a group ``billing``:

- ``{orders}:sb:dead:billing`` — the group's dead letters (a stream);
- ``{orders}:sb:replay:billing`` — dead letters put back for that group only (a
  stream read by the group's consumers together with ``orders``);
- ``sb:lease:billing:<consumer>`` — the lease that keeps a consumer name to one process.
"""

from __future__ import annotations

__all__ = ["dead_letter_key", "lease_key", "replay_key", "slot_prefix"]


def slot_prefix(stream: str) -> str:
    """A key prefix that hashes to the same cluster slot as ``stream``."""
    start = stream.find("{")
    if start != -1:
        end = stream.find("}", start + 1)
        if end > start + 1:  # the stream has a hash tag of its own: keep it
            return stream
    return "{" + stream + "}"


def dead_letter_key(stream: str, group: str) -> str:
    """The stream of ``group``'s dead letters from ``stream``."""
    return f"{slot_prefix(stream)}:sb:dead:{group}"


def replay_key(stream: str, group: str) -> str:
    """The stream of ``stream``'s events replayed to ``group`` only."""
    return f"{slot_prefix(stream)}:sb:replay:{group}"


def lease_key(group: str, consumer: str) -> str:
    """The lease of the consumer name ``consumer`` in ``group``."""
    return f"sb:lease:{group}:{consumer}"
