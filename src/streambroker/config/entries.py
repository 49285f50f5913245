"""Registrations as they were made, in code or in YAML, before validation.

Each keeps where it was written (a YAML file and line), so that validation can name it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolEntry:
    name: object
    address: object
    db: object
    data_dir: object
    origin: str | None  # where the address is (YAML file:line), for address problems
    name_origin: str | None = None  # where the pool's name is, when not at ``origin``


@dataclass(frozen=True)
class StreamEntry:
    name: object
    pool: object
    groups: tuple[object, ...] | object
    origin: str | None
    group_origins: tuple[str, ...] = ()  # where each group is, when known
    max_length: object = None
    max_age: object = None
    limit_origins: Mapping[str, str] = field(default_factory=dict)  # where each limit is


@dataclass
class Registrations:
    """What a YAML document registers: pools, streams and the key prefix (with its line)."""

    pools: list[PoolEntry] = field(default_factory=list)
    streams: list[StreamEntry] = field(default_factory=list)
    key_prefix: object = ""
    key_prefix_origin: str | None = None
