"""Loading the YAML configuration format with file and line in every error.

The document is walked as PyYAML nodes (not as constructed Python objects) so that
each registration keeps its line, and so that duplicate keys are reported instead
of silently overwriting each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..errors import ConfigError
from .entries import PoolEntry, Registrations, StreamEntry

_POOL_KEYS = ("redis", "db", "streams")
#: The keys of a stream given as a mapping (rather than as its list of groups).
_STREAM_KEYS = ("groups", "max_length", "max_age")
#: The one top-level key that is not a pool's name.
_KEY_PREFIX = "key_prefix"
_STR_TAG = "tag:yaml.org,2002:str"


def _read_source(source: str | os.PathLike[str]) -> tuple[str, str]:
    """Return (text, name for messages) for YAML text or a path to a YAML file."""
    if not (isinstance(source, os.PathLike) or _looks_like_path(source)):
        return str(source), "<yaml>"
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None


def _looks_like_path(source: str) -> bool:
    if "\n" in source:
        return False
    if source.endswith((".yaml", ".yml")):
        return True
    try:
        return Path(source).is_file()
    except (OSError, ValueError):  # e.g. one line of YAML longer than a file name may be
        return False


def _line(name: str, node: yaml.Node) -> str:
    return f"{name}:{node.start_mark.line + 1}"


def _scalar(node: yaml.Node) -> str | None:
    """The text of a non-null scalar node, else None."""
    if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:null":
        return str(node.value)
    return None


def load_yaml(source: str | os.PathLike[str]) -> Registrations:
    """What the YAML ``source`` (text or path) registers."""
    registry = Registrations()

    text, name = _read_source(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        context = ""
        if exc.problem and exc.context and exc.context_mark and exc.context_mark is not mark:
            context = f" ({exc.context} on line {exc.context_mark.line + 1})"
        raise ConfigError(f"{name}{line}: invalid YAML: {exc.problem or exc}{context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from None
    if root is None or _is_null(root):
        raise ConfigError(f"{name}: the config is empty; expected a mapping of pool names")
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(
            f"{_line(name, root)}: expected a mapping of redis pool names at the top level"
        )

    problems: list[str] = []
    seen_pools: set[str] = set()
    prefix_seen = False
    for key_node, pool_node in root.value:
        where = _line(name, key_node)
        pool = _scalar(key_node)
        if pool is None:
            problems.append(f"{where}: a redis pool name must be a plain string")
            continue
        if pool == _KEY_PREFIX:
            if prefix_seen:
                problems.append(f"{where}: {_KEY_PREFIX} is given twice")
            elif not (isinstance(pool_node, yaml.ScalarNode) and pool_node.tag == _STR_TAG):
                problems.append(
                    f"{_line(name, pool_node)}: {_KEY_PREFIX} must be a string such as "
                    f'"app:" (quote it), got {_shown(pool_node)} (no redis pool may be '
                    f"named {_KEY_PREFIX})"
                )
            else:
                registry.key_prefix = pool_node.value
                registry.key_prefix_origin = _line(name, pool_node)
            prefix_seen = True
            continue
        if pool in seen_pools:
            problems.append(f"{where}: redis pool {pool} is already registered")
            continue
        seen_pools.add(pool)
        if not isinstance(pool_node, yaml.MappingNode):
            problems.append(
                f"{where}: redis pool {pool} must be a mapping with 'redis' and 'streams'"
            )
            continue
        fields = {}
        for field_key, field_value in pool_node.value:
            key = _scalar(field_key)
            if key == _KEY_PREFIX:
                problems.append(
                    f"{_line(name, field_key)}: redis pool {pool}: {_KEY_PREFIX} belongs "
                    "at the top level, beside the pools (it applies to all of them)"
                )
            elif key not in _POOL_KEYS:
                problems.append(
                    f"{_line(name, field_key)}: redis pool {pool}: unknown key {key!r} "
                    f"(expected {', '.join(_POOL_KEYS)})"
                )
            elif key in fields:
                problems.append(f"{_line(name, field_key)}: redis pool {pool}: duplicate {key!r}")
            else:
                fields[key] = field_value
        if "redis" not in fields:
            problems.append(f"{where}: redis pool {pool} has no 'redis' address")
        else:
            address = _scalar(fields["redis"])
            if address is None:
                problems.append(
                    f"{_line(name, fields['redis'])}: redis pool {pool}: "
                    "'redis' must be an address such as localhost:6379:0"
                )
            else:
                db = _db(fields.get("db"))
                if isinstance(db, yaml.Node):
                    problems.append(
                        f"{_line(name, db)}: redis pool {pool}: 'db' must be a database "
                        "number (an integer >= 0)"
                    )
                else:
                    registry.pools.append(
                        PoolEntry(pool, address, db, None, _line(name, fields["redis"]), where)
                    )
        streams_node = fields.get("streams")
        if streams_node is None or _is_null(streams_node):
            continue
        if not isinstance(streams_node, yaml.MappingNode):
            problems.append(
                f"{_line(name, streams_node)}: redis pool {pool}: 'streams' must map "
                "stream names to lists of consumer groups"
            )
            continue
        for stream_key, groups_node in streams_node.value:
            stream = _scalar(stream_key)
            stream_where = _line(name, stream_key)
            if stream is None:
                problems.append(f"{stream_where}: a stream name must be a plain string")
                continue
            limits: dict[str, yaml.Node] = {}
            if isinstance(groups_node, yaml.MappingNode):
                stream_fields = _stream_fields(name, stream, groups_node, problems)
                if stream_fields is None:
                    continue
                groups_node = stream_fields.pop("groups", None)
                limits = stream_fields
            groups = () if groups_node is None else _groups(groups_node)
            if isinstance(groups, yaml.Node):
                problems.append(
                    f"{_line(name, groups)}: stream {stream}: expected a list of "
                    "consumer group names"
                )
                continue
            items = groups_node.value if isinstance(groups_node, yaml.SequenceNode) else []
            group_origins = tuple(_line(name, item) for item in items)
            registry.streams.append(
                StreamEntry(
                    stream,
                    pool,
                    groups,
                    stream_where,
                    group_origins,
                    max_length=_value(limits["max_length"]) if "max_length" in limits else None,
                    max_age=_value(limits["max_age"]) if "max_age" in limits else None,
                    limit_origins={key: _line(name, node) for key, node in limits.items()},
                )
            )
    if problems:
        raise ConfigError(problems)
    return registry


def _stream_fields(
    name: str, stream: str, node: yaml.MappingNode, problems: list[str]
) -> dict[str, yaml.Node] | None:
    """The fields of a stream given as a mapping, by key; None (with the problems added)
    when a key is unknown or repeated."""
    fields: dict[str, yaml.Node] = {}
    ok = True
    for key_node, value in node.value:
        key = _scalar(key_node)
        where = _line(name, key_node)
        if key not in _STREAM_KEYS:
            problems.append(
                f"{where}: stream {stream}: unknown key {key!r} (a stream maps to a list of "
                f"consumer group names, or to a mapping with {', '.join(_STREAM_KEYS)})"
            )
            ok = False
        elif key in fields:
            problems.append(f"{where}: stream {stream}: duplicate {key!r}")
            ok = False
        else:
            fields[key] = value
    return fields if ok else None


class _Values(yaml.constructor.SafeConstructor):
    """Builds the Python value of a scalar node as ``yaml.safe_load`` would."""


def _value(node: yaml.Node) -> object:
    """The value of a retention limit's node: a number, text, ... (checked by validate)."""
    if not isinstance(node, yaml.ScalarNode):
        return _Shown(_shown(node))
    return _Values().construct_object(node)


class _Shown(str):
    """A value that is not a scalar, shown by what it is ("a list") in messages."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _shown(node: yaml.Node) -> str:
    """A short description of a node that is not a string, for messages."""
    if isinstance(node, yaml.ScalarNode):
        return "nothing" if _is_null(node) else f"the {node.tag.rpartition(':')[2]} {node.value}"
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _db(node: yaml.Node | None) -> int | yaml.Node | None:
    """The ``db:`` of a pool (None when absent), or the offending node."""
    if node is None:
        return None
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int":
        try:
            value = int(node.value)
        except ValueError:  # YAML's octal or hexadecimal forms
            return node
        if value >= 0:
            return value
    return node


def _groups(node: yaml.Node) -> tuple[object, ...] | yaml.Node:
    """The group names of a stream, or the offending node when it is not a list of them."""
    if _is_null(node):
        return ()
    if not isinstance(node, yaml.SequenceNode):
        return node
    groups: list[object] = []
    item: yaml.Node
    for item in node.value:
        text = _scalar(item)
        if text is None:
            return item
        groups.append(text)
    return tuple(groups)
