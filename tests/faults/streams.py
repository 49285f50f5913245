"""The suite's streams and groups, as in the seed: stream-a read by read-group-a and
read-group-ab, stream-b by read-group-ab (a group reading two streams)."""

from __future__ import annotations

import streambroker as sb

#: The groups that read each stream.
STREAMS = {"stream-a": ("read-group-a", "read-group-ab"), "stream-b": ("read-group-ab",)}
GROUPS = ("read-group-a", "read-group-ab")


def registry(address: str) -> sb.ValidatedRegistry:
    """The suite's registry, in pool default (db 0 of ``address``, host:port)."""
    registry = sb.Registry()
    registry.register_redis(address, db=0)
    for stream, groups in STREAMS.items():
        registry.register_stream(stream, "default", list(groups))
    return registry.validate()
