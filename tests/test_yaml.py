"""Loading registries from YAML: the format, and file and line in every error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import streambroker as sb

from .conftest import SEED_YAML, seed_code

NAME_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="*?[]"
)
VALID_NAMES = st.text(NAME_CHARS, min_size=1, max_size=128)
#: Stream names without '}' (one holding it may be refused: see test_keys.py).
STREAM_NAMES = VALID_NAMES.filter(lambda name: "}" not in name)


def seed_in_code() -> sb.ValidatedRegistry:
    return seed_code().validate()


def load_error(source: str | Path) -> tuple[str, ...]:
    """The problems that loading ``source`` reports (loading must fail)."""
    with pytest.raises(sb.ConfigError) as info:
        sb.Registry.from_yaml(source)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def validate_error(source: str | Path) -> tuple[str, ...]:
    """The problems that validating the loaded ``source`` reports (it must fail)."""
    registry = sb.Registry.from_yaml(source)
    with pytest.raises(sb.ConfigError) as info:
        registry.validate()
    return info.value.problems


# --- the seed's example ---------------------------------------------------------------


def test_seed_yaml_equals_seed_code() -> None:
    validated = sb.Registry.from_yaml(SEED_YAML).validate()
    assert validated == seed_in_code()
    assert list(validated.pools) == ["default", "second"]
    assert validated.pools["default"] == sb.PoolSpec(
        "default", "tcp", db=0, host="localhost", port=6379
    )
    assert validated.pools["second"] == sb.PoolSpec(
        "second", "tcp", db=3, host="192.168.1.20", port=6379
    )
    assert dict(validated.streams) == {
        "stream-a": sb.StreamSpec("stream-a", "default", ("read-group-a", "read-group-ab")),
        "stream-b": sb.StreamSpec("stream-b", "default", ("read-group-ab",)),
        "stream-c": sb.StreamSpec("stream-c", "second", ("read-group-c",)),
    }
    assert dict(validated.groups) == {
        "read-group-a": ("stream-a",),
        "read-group-ab": ("stream-a", "stream-b"),
        "read-group-c": ("stream-c",),
    }


def test_from_yaml_returns_an_unvalidated_registry() -> None:
    registry = sb.Registry.from_yaml(SEED_YAML)
    assert isinstance(registry, sb.Registry)
    registry.register_stream("stream-d", "second", ["read-group-c"])
    assert registry.validate().groups["read-group-c"] == ("stream-c", "stream-d")


@pytest.mark.parametrize("filename", ["config.yaml", "config.yml", "registry.conf"])
@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_seed_yaml_from_file(tmp_path: Path, filename: str, as_path: bool) -> None:
    path = tmp_path / filename
    path.write_text(SEED_YAML, encoding="utf-8")
    source: str | Path = path if as_path else str(path)
    assert sb.Registry.from_yaml(source).validate() == seed_in_code()


def test_relative_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "streams.yaml").write_text(SEED_YAML, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert sb.Registry.from_yaml("streams.yaml").validate() == seed_in_code()


def test_flow_style_on_one_line() -> None:
    text = (
        "{default: {redis: 'localhost:6379:0', streams: {stream-a: [read-group-a, "
        "read-group-ab], stream-b: [read-group-ab]}}, second: {redis: "
        "'192.168.1.20:6379:3', streams: {stream-c: [read-group-c]}}}"
    )
    assert sb.Registry.from_yaml(text).validate() == seed_in_code()


def test_long_yaml_text_on_one_line_is_not_taken_for_a_file_name() -> None:
    streams = ", ".join(f"stream-{i}: [group-{i}]" for i in range(60))
    text = "{default: {redis: 'localhost:6379', streams: {" + streams + "}}}"
    assert len(text) > 1000
    validated = sb.Registry.from_yaml(text).validate()
    assert len(validated.streams) == 60
    assert validated.groups["group-59"] == ("stream-59",)


def test_pool_without_streams_is_fine() -> None:
    validated = sb.Registry.from_yaml("default:\n  redis: localhost:6379\n").validate()
    assert list(validated.pools) == ["default"]
    assert dict(validated.streams) == {}


def test_pool_with_empty_streams_is_fine() -> None:
    validated = sb.Registry.from_yaml("default:\n  redis: localhost:6379\n  streams:\n").validate()
    assert list(validated.pools) == ["default"]
    assert dict(validated.streams) == {}


def test_empty_mapping_is_an_empty_registry() -> None:
    validated = sb.Registry.from_yaml("{}").validate()
    assert dict(validated.pools) == {}


def test_address_forms_in_yaml(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    text = f"""\
tcp:
  redis: cache.example.com:6380:4
v6:
  redis: "[::1]:6379:2"
url:
  redis: redis://user:secret@host:6380/2
sock:
  redis: unix:///var/run/redis.sock?db=1
emb:
  redis: embedded:{data_dir}
"""
    pools = sb.Registry.from_yaml(text).validate().pools
    assert (pools["tcp"].host, pools["tcp"].port, pools["tcp"].db) == ("cache.example.com", 6380, 4)
    assert (pools["v6"].host, pools["v6"].port, pools["v6"].db) == ("::1", 6379, 2)
    assert (pools["url"].kind, pools["url"].db) == ("url", 2)
    assert pools["url"].url == "redis://user:secret@host:6380/2"
    assert "secret" not in repr(pools)
    assert (pools["sock"].kind, pools["sock"].db) == ("url", 1)
    assert pools["emb"].kind == "embedded"
    assert pools["emb"].data_dir == str(data_dir.resolve())


def test_names_are_taken_literally_not_as_yaml_values() -> None:
    text = """\
yes:
  redis: localhost:6379
  streams:
    on: [no, off]
    123: [1.5, "null"]
    'true': [~x]
"""
    validated = sb.Registry.from_yaml(text).validate()
    assert list(validated.pools) == ["yes"]
    assert validated.streams["on"] == sb.StreamSpec("on", "yes", ("no", "off"))
    assert validated.streams["123"] == sb.StreamSpec("123", "yes", ("1.5", "null"))
    assert validated.streams["true"].groups == ("~x",)


def test_anchors_and_aliases() -> None:
    text = """\
default:
  redis: localhost:6379
  streams:
    stream-a: &groups [read-group-a, read-group-ab]
    stream-b: *groups
"""
    validated = sb.Registry.from_yaml(text).validate()
    assert validated.groups["read-group-ab"] == ("stream-a", "stream-b")


# --- syntax and shape errors, with file and line --------------------------------------


def test_syntax_error_names_the_line() -> None:
    text = "default:\n  redis: localhost:6379\n   bad: indent\n"
    (problem,) = load_error(text)
    assert problem.startswith("<yaml>:3: invalid YAML: ")


def test_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("default:\n  redis: localhost:6379\n  streams:\n    s: [g\n", encoding="utf-8")
    (problem,) = load_error(path)
    assert problem.startswith(f"{path}:5: invalid YAML: ")
    assert "line 4" in problem  # where the unclosed list starts


def test_tab_indentation_names_the_line() -> None:
    (problem,) = load_error("default:\n\tredis: localhost:6379\n")
    assert problem.startswith("<yaml>:2: invalid YAML: ")


def test_two_documents_are_an_error() -> None:
    (problem,) = load_error("default:\n  redis: h:1\n---\nsecond:\n  redis: h:2\n")
    assert problem.startswith("<yaml>:3: invalid YAML: ")


@pytest.mark.parametrize("text", ["- default\n- second\n", "just some text", "'quoted'\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert load_error(text) == (
        "<yaml>:1: expected a mapping of redis pool names at the top level",
    )


def test_top_level_list_on_a_later_line() -> None:
    (problem,) = load_error("# comment\n\n- default\n")
    assert problem.startswith("<yaml>:3: expected a mapping")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_document(text: str) -> None:
    (problem,) = load_error(text)
    assert problem.startswith("<yaml>: the config is empty")


def test_empty_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_error(path) == (f"{path}: the config is empty; expected a mapping of pool names",)


def test_pool_value_not_a_mapping() -> None:
    text = "default:\n  redis: localhost:6379\nsecond: localhost:6380\n"
    (problem,) = load_error(text)
    assert problem.startswith("<yaml>:3: redis pool second must be a mapping")


def test_missing_redis_address() -> None:
    text = "default:\n  redis: localhost:6379\nsecond:\n  streams:\n    s: [g]\n"
    assert load_error(text) == ("<yaml>:3: redis pool second has no 'redis' address",)


@pytest.mark.parametrize("value", ["", "[localhost:6379]", "{host: localhost}", "~"])
def test_redis_address_not_a_string(value: str) -> None:
    (problem,) = load_error(f"default:\n  streams:\n  redis: {value}\n")
    assert problem.startswith("<yaml>:3: redis pool default: 'redis' must be an address")


def test_unknown_pool_key() -> None:
    text = "default:\n  redis: localhost:6379\n  stream:\n    s: [g]\n"
    (problem,) = load_error(text)
    assert problem.startswith("<yaml>:3: redis pool default: unknown key 'stream'")


def test_duplicate_redis_key() -> None:
    text = "default:\n  redis: localhost:6379\n  redis: localhost:6380\n"
    assert load_error(text) == ("<yaml>:3: redis pool default: duplicate 'redis'",)


def test_duplicate_streams_key() -> None:
    text = "default:\n  redis: h:1\n  streams:\n    a: [g]\n  streams:\n    b: [g]\n"
    assert load_error(text) == ("<yaml>:5: redis pool default: duplicate 'streams'",)


@pytest.mark.parametrize("value", ["[stream-a, stream-b]", "stream-a", "7"])
def test_streams_not_a_mapping(value: str) -> None:
    text = f"default:\n  redis: localhost:6379\n  streams: {value}\n"
    (problem,) = load_error(text)
    assert problem.startswith("<yaml>:3: redis pool default: 'streams' must map stream names")


def test_streams_as_a_block_list() -> None:
    text = "default:\n  redis: localhost:6379\n  streams:\n    - stream-a\n"
    (problem,) = load_error(text)
    assert problem.startswith("<yaml>:4: redis pool default: 'streams' must map")


@pytest.mark.parametrize("value", ["read-group-a", "5"])
def test_groups_not_a_list(value: str) -> None:
    text = f"default:\n  redis: localhost:6379\n  streams:\n    stream-a: {value}\n"
    assert load_error(text) == (
        "<yaml>:4: stream stream-a: expected a list of consumer group names",
    )


def test_group_that_is_a_mapping_names_its_own_line() -> None:
    text = """\
default:
  redis: localhost:6379
  streams:
    stream-a:
      - read-group-a
      - read-group-b
      - read-group-c: 1
"""
    assert load_error(text) == (
        "<yaml>:7: stream stream-a: expected a list of consumer group names",
    )


@pytest.mark.parametrize("item", ["[a, b]", "~", "{a: b}"])
def test_group_that_is_not_a_name(item: str) -> None:
    text = f"default:\n  redis: h:1\n  streams:\n    s:\n      - g\n      - {item}\n"
    assert load_error(text) == ("<yaml>:6: stream s: expected a list of consumer group names",)


def test_duplicate_pool_key() -> None:
    text = """\
default:
  redis: localhost:6379
second:
  redis: localhost:6380
default:
  redis: localhost:6381
"""
    assert load_error(text) == ("<yaml>:5: redis pool default is already registered",)


def test_pool_name_that_is_not_a_string() -> None:
    (problem,) = load_error("~:\n  redis: localhost:6379\n")
    assert problem == "<yaml>:1: a redis pool name must be a plain string"
    (problem,) = load_error("default:\n  redis: h:1\n  streams:\n    [a]: [g]\n")
    assert problem == "<yaml>:4: a stream name must be a plain string"


def test_duplicate_stream_key_in_one_pool() -> None:
    text = """\
default:
  redis: localhost:6379
  streams:
    stream-a: [read-group-a]
    stream-b: [read-group-ab]
    stream-a: [read-group-ab]
"""
    assert validate_error(text) == ("<yaml>:6: stream with name stream-a already exists",)


def test_duplicate_stream_across_pools_names_the_line(tmp_path: Path) -> None:
    text = SEED_YAML.replace("stream-c:", "stream-a:")
    assert validate_error(text) == ("<yaml>:12: stream with name stream-a already exists",)
    path = tmp_path / "dup.yaml"
    path.write_text(text, encoding="utf-8")
    assert validate_error(path) == (f"{path}:12: stream with name stream-a already exists",)
    assert validate_error(str(path)) == (f"{path}:12: stream with name stream-a already exists",)


def test_several_shape_problems_are_reported_at_once() -> None:
    text = """\
default:
  redis: localhost:6379
  colour: blue
  streams:
    stream-a: read-group-a
second: nowhere
third:
  streams: {}
"""
    assert load_error(text) == (
        "<yaml>:3: redis pool default: unknown key 'colour' (expected redis, db, streams)",
        "<yaml>:5: stream stream-a: expected a list of consumer group names",
        "<yaml>:6: redis pool second must be a mapping with 'redis' and 'streams'",
        "<yaml>:7: redis pool third has no 'redis' address",
    )


def test_validation_problems_carry_lines() -> None:
    text = """\
default:
  redis: localhost:abc
  streams:
    stream-a: []
    stream b: [g]
    stream-c: [g, g]
    stream-d: [g, "h*"]
    stream-e:
bad pool:
  redis: localhost:6379
"""
    found = validate_error(text)
    assert found[0] == "<yaml>:2: redis pool default: port 'abc' is not a number"
    assert found[1].startswith("<yaml>:9: redis pool name 'bad pool' holds ' '")
    assert found[2] == "<yaml>:4: stream stream-a has no consumer groups"
    assert found[3].startswith("<yaml>:5: stream name 'stream b' holds ' '")
    assert found[4] == "<yaml>:6: stream stream-c: consumer group g is listed twice"
    assert found[5].startswith("<yaml>:7: stream stream-d: consumer group name 'h*' holds '*'")
    assert found[6] == "<yaml>:8: stream stream-e has no consumer groups"
    assert len(found) == 7


def test_group_problems_name_the_group_line() -> None:
    text = """\
default:
  redis: localhost:6379
  streams:
    stream-a:
      - read-group-a
      - read group b
      - read-group-a
"""
    found = validate_error(text)
    assert len(found) == 2
    assert found[0].startswith("<yaml>:6: stream stream-a: consumer group name 'read group b'")
    assert found[1] == "<yaml>:7: stream stream-a: consumer group read-group-a is listed twice"


def test_streams_of_a_badly_named_pool_are_not_blamed_too() -> None:
    text = "bad*pool:\n  redis: localhost:6379\n  streams:\n    stream-a: [g]\n"
    (problem,) = validate_error(text)
    assert problem.startswith("<yaml>:1: redis pool name 'bad*pool' holds '*'")


def test_null_groups_have_no_group_lines() -> None:
    text = "default:\n  redis: localhost:6379\n  streams:\n    stream-a: ~\n    stream-b: null\n"
    assert validate_error(text) == (
        "<yaml>:4: stream stream-a has no consumer groups",
        "<yaml>:5: stream stream-b has no consumer groups",
    )


def test_credentials_not_in_yaml_errors() -> None:
    text = "default:\n  redis: ftp://user:s3cr3t@host:6379\n"
    (problem,) = validate_error(text)
    assert problem.startswith("<yaml>:2: redis pool default: cannot parse address")
    assert "s3cr3t" not in problem


# --- files ----------------------------------------------------------------------------


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_missing_file_names_the_path(tmp_path: Path, as_path: bool) -> None:
    path = tmp_path / "missing" / "streams.yaml"
    (problem,) = load_error(path if as_path else str(path))
    assert problem == f"{path}: config file not found"


def test_missing_file_without_yaml_suffix(tmp_path: Path) -> None:
    path = tmp_path / "streams.conf"
    (problem,) = load_error(path)
    assert problem == f"{path}: config file not found"


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    (problem,) = load_error(tmp_path)
    assert problem.startswith(f"{tmp_path}: cannot read config file")


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("default:\n  redis: h\xe9te:6379\n".encode("latin-1"))
    (problem,) = load_error(path)
    assert problem.startswith(f"{path}: cannot read config file")


def test_shape_error_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "streams.yml"
    path.write_text("default:\n  redis: localhost:6379\n  extra: 1\n", encoding="utf-8")
    (problem,) = load_error(str(path))
    assert problem.startswith(f"{path}:3: redis pool default: unknown key 'extra'")


# --- properties -----------------------------------------------------------------------


@given(
    pool=VALID_NAMES.filter(lambda name: name != "key_prefix"),
    streams=st.lists(STREAM_NAMES, min_size=1, max_size=3, unique=True),
)
def test_any_valid_names_round_trip_through_yaml(pool: str, streams: list[str]) -> None:
    groups = {stream: [f"g-{i}", stream] for i, stream in enumerate(streams)}
    document = {pool: {"redis": "localhost:6379:1", "streams": groups}}
    text = yaml.safe_dump(document, default_flow_style=False, sort_keys=False, width=10_000)
    validated = sb.Registry.from_yaml(text).validate()

    in_code = sb.Registry()
    in_code.register_redis("localhost:6379", db=1, pool=pool)
    for stream, names in groups.items():
        in_code.register_stream(stream, pool, names)
    assert validated == in_code.validate()
    assert list(validated.pools) == [pool]
    assert list(validated.streams) == streams
    for stream in streams:
        assert validated.streams[stream].groups == (f"g-{streams.index(stream)}", stream)


@given(
    prefix=st.text(NAME_CHARS, max_size=20),
    bad=st.sampled_from("*?[] \t\x00\x07\x1b\x7f\x85\x9b\xa0\u2028\u3000"),
    suffix=st.text(NAME_CHARS, max_size=20),
    where=st.sampled_from(["pool", "stream", "group"]),
)
def test_any_forbidden_character_in_yaml_is_rejected_with_its_line(
    prefix: str, bad: str, suffix: str, where: str
) -> None:
    name = prefix + bad + suffix
    pool = name if where == "pool" else "default"
    stream = name if where == "stream" else "stream-a"
    group = name if where == "group" else "group-a"
    document = {pool: {"redis": "localhost:6379", "streams": {stream: [group]}}}
    text = yaml.safe_dump(document, default_flow_style=False, sort_keys=False, width=10_000)
    # Lines: 1 pool key, 2 redis, 3 streams, 4 stream key, 5 the group.
    assert len(text.splitlines()) == 5, text
    with pytest.raises(sb.ConfigError) as info:
        sb.Registry.from_yaml(text).validate()
    (problem,) = info.value.problems
    expected_line = {"pool": 1, "stream": 4, "group": 5}[where]
    assert problem.startswith(f"<yaml>:{expected_line}: "), (problem, text)


@given(text=st.text(max_size=200))
def test_any_text_loads_or_raises_config_error(text: str) -> None:
    source = "# fuzz\n" + text  # always YAML text, never taken for a file name
    error: sb.ConfigError | None = None
    try:
        sb.Registry.from_yaml(source).validate()
    except sb.ConfigError as exc:
        error = exc
    if error is not None:
        assert error.problems
        assert all(problem.startswith("<yaml>") for problem in error.problems)


# --- db: beside redis: ------------------------------------------------------------------


def test_db_beside_the_address(tmp_path: Path) -> None:
    text = (
        f"default:\n  redis: embedded:{tmp_path}\n  db: 2\n"
        "second:\n  redis: localhost:6379\n  db: 5\n"
        "third:\n  redis: redis://localhost:6379\n  db: 0\n"
    )
    pools = sb.Registry.from_yaml(text).validate().pools
    assert (pools["default"].kind, pools["default"].db) == ("embedded", 2)
    assert pools["default"].display_address == f"embedded:{tmp_path.resolve()} db 2"
    assert pools["second"].db == 5
    assert pools["third"].db == 0


@pytest.mark.parametrize("value", ["-1", "two", "1.5", "[1]", "~", "0x10"])
def test_db_that_is_not_a_database_number(value: str) -> None:
    (problem,) = load_error(f"default:\n  redis: localhost:6379\n  db: {value}\n")
    assert problem == (
        "<yaml>:3: redis pool default: 'db' must be a database number (an integer >= 0)"
    )


def test_db_disagreeing_with_the_address_names_the_line() -> None:
    (problem,) = validate_error("default:\n  redis: localhost:6379:1\n  db: 2\n")
    assert problem.startswith("<yaml>:2: redis pool default:")
    assert "db 1" in problem
    assert "db=2" in problem


def test_embedded_address_with_a_db_suffix_is_refused(tmp_path: Path) -> None:
    (problem,) = validate_error(f"default:\n  redis: embedded:{tmp_path}:3\n")
    assert "does not select a database" in problem
    assert "db:" in problem
    assert not (tmp_path.parent / f"{tmp_path.name}:3").exists()
