"""Registering pools and streams in code and validating them; no server is needed."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import streambroker as sb
from streambroker.config.registry import check_name

from .conftest import seed_code

SEED_GROUPS = {
    "read-group-a": ("stream-a",),
    "read-group-ab": ("stream-a", "stream-b"),
    "read-group-c": ("stream-c",),
}

# Characters a name may hold: anything but whitespace, control characters, lone
# surrogates and the glob characters *?[] (Python's \s is Z* plus some Cc characters).
NAME_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="*?[]"
)
VALID_NAMES = st.text(NAME_CHARS, min_size=1, max_size=128)
#: Stream names without '}' (one holding it may be refused: see test_keys.py).
STREAM_NAMES = VALID_NAMES.filter(lambda name: "}" not in name)
FORBIDDEN_CHARS = st.one_of(
    st.sampled_from("*?[] \t\n\r\x0b\x0c\x00\x1b\x7f\x85\x9f\xa0\u2028\u3000"),
    st.characters(whitelist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
)

BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("x" * 129, id="129-chars"),
    pytest.param("a b", id="space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a\n", id="newline"),
    pytest.param("\u00a0a", id="nbsp"),
    pytest.param("a\u2003b", id="em-space"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\x1bb", id="escape"),
    pytest.param("a\x7f", id="del"),
    pytest.param("a\x9b", id="c1-control"),
    pytest.param("a*", id="star"),
    pytest.param("?a", id="question-mark"),
    pytest.param("a[b", id="open-bracket"),
    pytest.param("a]b", id="close-bracket"),
    pytest.param("a\ud800", id="lone-surrogate"),
]


seed_registry = seed_code


def problems(registry: sb.Registry) -> tuple[str, ...]:
    """The problems that validating ``registry`` reports (it must fail)."""
    with pytest.raises(sb.ConfigError) as info:
        registry.validate()
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_problem(registry: sb.Registry) -> str:
    found = problems(registry)
    assert len(found) == 1, found
    return found[0]


def pool_spec(address: Any, **kwargs: Any) -> sb.PoolSpec:
    registry = sb.Registry()
    registry.register_redis(address, **kwargs)
    return registry.validate().pools["default"]


def pool_problem(address: Any, **kwargs: Any) -> str:
    registry = sb.Registry()
    registry.register_redis(address, **kwargs)
    return one_problem(registry)


# --- the seed's example ---------------------------------------------------------------


def test_seed_example_validates() -> None:
    validated = seed_registry().validate()

    assert list(validated.pools) == ["default", "second"]
    default, second = validated.pools["default"], validated.pools["second"]
    assert (default.name, default.kind, default.host, default.port, default.db) == (
        "default",
        "tcp",
        "localhost",
        6379,
        0,
    )
    assert (second.name, second.kind, second.host, second.port, second.db) == (
        "second",
        "tcp",
        "192.168.1.20",
        6379,
        3,
    )
    assert default.data_dir is None
    assert default.url is None

    assert list(validated.streams) == ["stream-a", "stream-b", "stream-c"]
    assert validated.streams["stream-a"] == sb.StreamSpec(
        "stream-a", "default", ("read-group-a", "read-group-ab")
    )
    assert validated.streams["stream-b"] == sb.StreamSpec("stream-b", "default", ("read-group-ab",))
    assert validated.streams["stream-c"] == sb.StreamSpec("stream-c", "second", ("read-group-c",))

    assert dict(validated.groups) == SEED_GROUPS


def test_validated_registries_compare_by_content() -> None:
    assert seed_registry().validate() == seed_registry().validate()

    other_db = sb.Registry()
    other_db.register_redis("localhost:6379", db=1)
    other_db.register_stream("stream-a", "default", ["read-group-a", "read-group-ab"])
    other_db.register_stream("stream-b", "default", ["read-group-ab"])
    other_db.register_redis("192.168.1.20:6379", db=3, pool="second")
    other_db.register_stream("stream-c", "second", ["read-group-c"])
    assert other_db.validate() != seed_registry().validate()

    fewer_groups = seed_registry()
    fewer_groups.register_stream("stream-d", "second", ["read-group-c"])
    assert fewer_groups.validate() != seed_registry().validate()


def test_db_in_address_equals_db_keyword() -> None:
    in_address = sb.Registry()
    in_address.register_redis("localhost:6379:0")
    in_address.register_redis("192.168.1.20:6379:3", pool="second")
    in_address.register_stream("stream-a", "default", ["read-group-a", "read-group-ab"])
    in_address.register_stream("stream-b", "default", ["read-group-ab"])
    in_address.register_stream("stream-c", "second", ["read-group-c"])
    assert in_address.validate() == seed_registry().validate()


def test_validated_registry_is_immutable() -> None:
    validated = seed_registry().validate()
    spec = validated.pools["default"]
    stream = validated.streams["stream-a"]

    with pytest.raises(dataclasses.FrozenInstanceError):
        validated.pools = {}  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        validated.groups = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        validated.pools["third"] = spec  # type: ignore[index]
    with pytest.raises(TypeError):
        del validated.pools["default"]  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        validated.streams["stream-x"] = stream  # type: ignore[index]
    with pytest.raises(TypeError):
        validated.groups["read-group-x"] = ("stream-a",)  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.db = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stream.groups = ()  # type: ignore[misc]
    assert isinstance(stream.groups, tuple)
    assert all(isinstance(streams, tuple) for streams in validated.groups.values())


def test_registering_after_validate_does_not_change_the_result() -> None:
    registry = seed_registry()
    validated = registry.validate()
    registry.register_redis("localhost:6380", pool="third")
    registry.register_stream("stream-d", "third", ["read-group-a"])

    assert set(validated.pools) == {"default", "second"}
    assert set(validated.streams) == {"stream-a", "stream-b", "stream-c"}
    assert validated.groups["read-group-a"] == ("stream-a",)
    assert registry.validate().groups["read-group-a"] == ("stream-a", "stream-d")


def test_an_empty_registry_validates_to_nothing() -> None:
    validated = sb.Registry().validate()
    assert dict(validated.pools) == {}
    assert dict(validated.streams) == {}
    assert dict(validated.groups) == {}


def test_default_pool_is_named_default() -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379")
    registry.register_stream("stream-a", groups=["g"])
    validated = registry.validate()
    assert validated.streams["stream-a"].pool == "default"
    assert validated.pools["default"].db == 0


# --- duplicate streams and pools ------------------------------------------------------


@pytest.mark.parametrize("second_pool", ["default", "second"])
def test_duplicate_stream_name_is_an_error(second_pool: str) -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379", 0)
    registry.register_stream("stream-a", "default", ["read-group-a", "read-group-ab"])
    registry.register_redis("192.168.1.20:6379", 3, "second")
    registry.register_stream("stream-a", second_pool, ["read-group-c"])

    with pytest.raises(sb.ConfigError) as info:
        registry.validate()
    assert str(info.value) == "stream with name stream-a already exists"
    assert info.value.problems == ("stream with name stream-a already exists",)


def test_duplicate_stream_is_reported_once_per_repeat() -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379")
    for _ in range(3):
        registry.register_stream("stream-a", "default", ["g"])
    assert problems(registry) == ("stream with name stream-a already exists",) * 2


def test_config_error_is_a_broker_error() -> None:
    assert issubclass(sb.ConfigError, sb.BrokerError)


def test_stream_in_unknown_pool() -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379")
    registry.register_stream("stream-a", "nowhere", ["g"])
    problem = one_problem(registry)
    assert "stream-a" in problem
    assert "redis pool nowhere is not registered" in problem


def test_stream_in_a_pool_with_a_bad_address_is_not_blamed_too() -> None:
    registry = sb.Registry()
    registry.register_redis("localhost")
    registry.register_stream("stream-a", "default", ["g"])
    assert one_problem(registry).startswith("redis pool default: cannot parse address")


def test_repeat_of_a_bad_pool_is_reported() -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:abc")
    registry.register_redis("localhost:6379")
    assert problems(registry) == (
        "redis pool default: port 'abc' is not a number",
        "redis pool default is already registered",
    )


def test_repeat_of_a_bad_stream_is_reported() -> None:
    registry = registry_with_pool()
    registry.register_stream("stream-a", "default", [])
    registry.register_stream("stream-a", "default", ["g"])
    assert problems(registry) == (
        "stream stream-a has no consumer groups",
        "stream with name stream-a already exists",
    )


def test_pool_registered_twice() -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379")
    registry.register_redis("localhost:6380")
    assert one_problem(registry) == "redis pool default is already registered"


def test_pool_registered_twice_with_the_same_address() -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379", pool="p")
    registry.register_redis("localhost:6379", pool="p")
    assert one_problem(registry) == "redis pool p is already registered"


# --- addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kwargs", "expected"),
    [
        ("localhost", {}, "cannot parse address 'localhost'"),
        ("localhost:", {}, "cannot parse address 'localhost:'"),
        (":6379", {}, "cannot parse address ':6379'"),
        ("local host:6379", {}, "cannot parse address"),
        ("localhost:abc", {}, "port 'abc' is not a number"),
        ("localhost:-1", {}, "port '-1' is not a number"),
        ("localhost:6379:x", {}, "db 'x' is not a number"),
        ("localhost:6379:", {}, "db '' is not a number"),
        ("localhost:6379:-1", {}, "db '-1' is not a number"),
        ("localhost:6379:1:2", {}, "db '1:2' is not a number"),
        ("localhost:70000", {}, "port 70000 is out of range"),
        ("localhost:65536", {}, "port 65536 is out of range"),
        ("localhost:0", {}, "port 0 is out of range"),
        ("localhost:\u0666\u0663\u0667\u0669", {}, "is not a number"),  # Arabic-Indic digits
        ("localhost:\u00b2", {}, "is not a number"),  # superscript two
        ("ftp://x", {}, "the URL scheme must be one of redis, rediss, unix"),
        ("http://localhost:6379", {}, "the URL scheme must be one of"),
        ("redis://", {}, "has no host"),
        ("redis://localhost:abc", {}, "is not valid"),
        ("redis://localhost:99999", {}, "is not valid"),
        ("redis://localhost/x", {}, "db 'x' is not a number"),
        ("redis://localhost/?db=x", {}, "db 'x' is not a number"),
        ("redis://localhost/2?db=3", {}, "db 2 in its path but db=3 in its query"),
        ("redis://localhost/2", {"db": 3}, "the URL selects db 2 but db=3 was given"),
        ("unix://", {}, "a unix:// URL needs a socket path"),
        ("unix:///tmp/redis.sock?db=z", {}, "db 'z' is not a number"),
        ("localhost:6379", {"db": -1}, "db -1 is not a database number"),
        ("localhost:6379", {"db": "3"}, "db '3' is not a database number"),
        ("localhost:6379", {"db": 1.0}, "db 1.0 is not a database number"),
        ("localhost:6379", {"db": True}, "db True is not a database number"),
        ("h:1:2", {"db": 3}, "the address selects db 2 but db=3 was given"),
        ("", {}, "address must be a non-empty string"),
        ("   ", {}, "address must be a non-empty string"),
        (None, {}, "address must be a non-empty string, got None"),
        (6379, {}, "address must be a non-empty string, got 6379"),
        ("localhost:6379", {"data_dir": "/x"}, "data_dir applies only to the embedded server"),
        ("embedded", {"data_dir": 5}, "data_dir 5 is not a path"),
        ("embedded", {"db": -2}, "db -2 is not a database number"),
    ],
)
def test_unparsable_address(address: Any, kwargs: dict[str, Any], expected: str) -> None:
    problem = pool_problem(address, **kwargs)
    assert problem.startswith("redis pool default: ")
    assert expected in problem


def test_host_port_with_db_keyword() -> None:
    spec = pool_spec("redis.example.com:6380", db=4)
    assert (spec.kind, spec.host, spec.port, spec.db) == ("tcp", "redis.example.com", 6380, 4)
    assert spec.url is None
    assert spec.data_dir is None
    assert spec.display_address == "redis.example.com:6380/4"


def test_host_port_db() -> None:
    spec = pool_spec("10.0.0.7:7000:15")
    assert (spec.kind, spec.host, spec.port, spec.db) == ("tcp", "10.0.0.7", 7000, 15)
    assert spec.display_address == "10.0.0.7:7000/15"


def test_host_port_db_agreeing_with_db_keyword() -> None:
    spec = pool_spec("h:1:2", db=2)
    assert (spec.host, spec.port, spec.db) == ("h", 1, 2)


def test_host_port_without_db_means_db_0() -> None:
    assert pool_spec("localhost:6379").db == 0


def test_ipv6_address() -> None:
    spec = pool_spec("[::1]:6379:2")
    assert (spec.kind, spec.host, spec.port, spec.db) == ("tcp", "::1", 6379, 2)
    assert spec.display_address == "[::1]:6379/2"


def test_ipv6_address_with_db_keyword() -> None:
    spec = pool_spec("[fe80::1%eth0]:6380", db=1)
    assert (spec.host, spec.port, spec.db) == ("fe80::1%eth0", 6380, 1)


def test_redis_url_with_credentials() -> None:
    url = "redis://user:secret@host:6380/2"
    spec = pool_spec(url)
    assert spec.kind == "url"
    assert spec.url == url
    assert spec.db == 2
    assert spec.host is None
    assert spec.port is None
    assert spec.data_dir is None
    assert spec.display_address == "redis://user:***@host:6380/2"


@pytest.mark.parametrize(
    ("url", "kwargs", "db"),
    [
        ("rediss://cache.example.com:6380", {}, 0),
        ("rediss://cache.example.com:6380/5", {}, 5),
        ("rediss://cache.example.com", {"db": 7}, 7),
        ("redis://localhost/3", {"db": 3}, 3),
        ("redis://localhost?db=4", {}, 4),
        ("redis://localhost/4?db=4", {}, 4),
        ("unix:///var/run/redis.sock", {}, 0),
        ("unix:///var/run/redis.sock?db=1", {}, 1),
        ("unix:///var/run/redis.sock", {"db": 9}, 9),
    ],
)
def test_url_forms(url: str, kwargs: dict[str, Any], db: int) -> None:
    spec = pool_spec(url, **kwargs)
    assert spec.kind == "url"
    assert spec.url == url
    assert spec.db == db
    assert spec.display_address == url


def test_embedded_default_data_dir_is_resolved_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = pool_spec("embedded")
    assert spec.kind == "embedded"
    assert spec.data_dir == str((tmp_path / ".streambroker").resolve())
    assert Path(spec.data_dir).is_absolute()
    assert (spec.host, spec.port, spec.url, spec.db) == (None, None, None, 0)
    assert spec.display_address == f"embedded:{spec.data_dir} db 0"
    assert repr(spec) == f"PoolSpec(name='default', address='embedded:{spec.data_dir} db 0')"
    assert not (tmp_path / ".streambroker").exists()  # validating creates nothing


def test_embedded_with_directory_in_address(tmp_path: Path) -> None:
    spec = pool_spec(f"embedded:{tmp_path / 'data'}", db=2)
    assert spec.kind == "embedded"
    assert spec.data_dir == str((tmp_path / "data").resolve())
    assert spec.db == 2


def test_embedded_relative_directory_is_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert pool_spec("embedded:sub/dir").data_dir == str((tmp_path / "sub" / "dir").resolve())


@pytest.mark.parametrize("as_path", [False, True])
def test_embedded_with_data_dir_keyword(tmp_path: Path, as_path: bool) -> None:
    directory = tmp_path / "broker-data"
    spec = pool_spec("embedded", data_dir=directory if as_path else str(directory))
    assert spec.kind == "embedded"
    assert spec.data_dir == str(directory.resolve())


def test_embedded_directory_conflicting_with_data_dir(tmp_path: Path) -> None:
    problem = pool_problem(f"embedded:{tmp_path / 'a'}", data_dir=tmp_path / "b")
    assert "data directory" in problem
    same = pool_spec(f"embedded:{tmp_path / 'a'}", data_dir=tmp_path / "a")
    assert same.data_dir == str((tmp_path / "a").resolve())


def test_embedded_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pool_spec("embedded:~/sb").data_dir == str((tmp_path / "sb").resolve())


def test_validation_contacts_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("validation must not touch the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    registry = sb.Registry()
    registry.register_redis("no-such-host.invalid:6379")
    registry.register_redis("redis://user:pw@another-missing-host.invalid:1/0", pool="url")
    registry.register_redis("unix:///nonexistent/redis.sock", pool="sock")
    registry.register_stream("stream-a", "default", ["g"])
    registry.register_stream("stream-b", "url", ["g"])
    registry.register_stream("stream-c", "sock", ["g"])
    validated = registry.validate()
    assert validated.pools["default"].host == "no-such-host.invalid"
    assert dict(validated.groups) == {"g": ("stream-a", "stream-b", "stream-c")}


# --- credentials ----------------------------------------------------------------------

SECRET = "s3cr3t"


@pytest.mark.parametrize(
    ("url", "display"),
    [
        ("redis://user:s3cr3t@host:6380/2", "redis://user:***@host:6380/2"),
        ("rediss://:s3cr3t@host", "rediss://:***@host"),
        ("rediss://default:s3cr3t@host:6379?db=1", "rediss://default:***@host:6379?db=1"),
        ("redis://user:ab@s3cr3t@host:1/0", "redis://user:***@host:1/0"),
        ("redis://user:ab%40s3cr3t@host/0", "redis://user:***@host/0"),
        ("redis://host:6379/0?password=s3cr3t", "redis://host:6379/0?password=***"),
        (
            "unix:///var/run/redis.sock?db=1&password=s3cr3t",
            "unix:///var/run/redis.sock?db=1&password=***",
        ),
        (
            "unix://user:s3cr3t@/var/run/redis.sock?db=1",
            "unix://user:***@/var/run/redis.sock?db=1",
        ),
    ],
)
def test_credentials_are_masked(url: str, display: str) -> None:
    registry = sb.Registry()
    registry.register_redis(url)
    validated = registry.validate()
    spec = validated.pools["default"]
    assert spec.url == url  # the real URL is kept for connecting
    assert spec.display_address == display
    assert SECRET not in spec.display_address
    assert SECRET not in repr(spec)
    assert SECRET not in str(spec)
    assert SECRET not in repr(validated)
    assert SECRET not in str(validated)


def test_user_name_without_password_is_shown() -> None:
    assert pool_spec("redis://alice@host/0").display_address == "redis://alice@host/0"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://user:s3cr3t@host",
        "http://user:ab@s3cr3t@host",
        "redis://user:s3cr3t@host:abc/0",
        "redis://user:s3cr3t@:6379/0",
        "rediss://user:ab@s3cr3t@host:99999",
        "redis://user:s3cr3t@host/x",
        "redis://host/1?password=s3cr3t&db=2",
    ],
)
def test_credentials_are_masked_in_errors(url: str) -> None:
    registry = sb.Registry()
    registry.register_redis(url)
    with pytest.raises(sb.ConfigError) as info:
        registry.validate()
    assert SECRET not in str(info.value)
    assert all(SECRET not in problem for problem in info.value.problems)
    assert SECRET not in repr(info.value)


# --- streams and groups ---------------------------------------------------------------


def registry_with_pool() -> sb.Registry:
    registry = sb.Registry()
    registry.register_redis("localhost:6379")
    return registry


def test_stream_without_groups() -> None:
    registry = registry_with_pool()
    registry.register_stream("stream-a", "default", [])
    assert one_problem(registry) == "stream stream-a has no consumer groups"


def test_stream_groups_default_to_none() -> None:
    registry = registry_with_pool()
    registry.register_stream("stream-a")
    assert one_problem(registry) == "stream stream-a has no consumer groups"


def test_groups_given_as_one_string() -> None:
    registry = registry_with_pool()
    registry.register_stream("stream-a", "default", "read-group-a")
    problem = one_problem(registry)
    assert problem.startswith("stream stream-a: consumer groups must be a list")


def test_groups_may_be_any_sequence() -> None:
    registry = registry_with_pool()
    registry.register_stream("stream-a", "default", ("g1", "g2"))
    assert registry.validate().streams["stream-a"].groups == ("g1", "g2")


def test_group_listed_twice() -> None:
    registry = registry_with_pool()
    registry.register_stream("stream-a", "default", ["g1", "g2", "g1"])
    assert one_problem(registry) == "stream stream-a: consumer group g1 is listed twice"


def test_group_may_read_many_streams_in_many_pools() -> None:
    registry = registry_with_pool()
    registry.register_redis("localhost:6380", pool="other")
    registry.register_stream("s1", "default", ["shared", "only-1"])
    registry.register_stream("s2", "other", ["shared"])
    registry.register_stream("s3", "default", ["shared"])
    groups = registry.validate().groups
    assert groups["shared"] == ("s1", "s2", "s3")
    assert groups["only-1"] == ("s1",)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_pool_name(name: str) -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379", pool=name)
    problem = one_problem(registry)
    assert problem.startswith("redis pool name ")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_stream_name(name: str) -> None:
    registry = registry_with_pool()
    registry.register_stream(name, "default", ["g"])
    assert one_problem(registry).startswith("stream name ")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_group_name(name: str) -> None:
    registry = registry_with_pool()
    registry.register_stream("stream-a", "default", ["good", name])
    assert one_problem(registry).startswith("stream stream-a: consumer group name ")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_pool_name_of_a_stream(name: str) -> None:
    registry = registry_with_pool()
    registry.register_stream("stream-a", name, ["g"])
    assert one_problem(registry).startswith("stream stream-a: redis pool name ")


@pytest.mark.parametrize("name", [None, 5, b"bytes", ["a"], {"a": 1}])
def test_names_must_be_strings(name: Any) -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379", pool=name)
    registry.register_stream(name, "default", ["g"])
    registry.register_stream("stream-a", name, [name])
    description = f"must be a string, got {type(name).__name__} {name!r}"
    assert problems(registry) == (
        f"redis pool name {description}",
        f"stream name {description}",
        f"stream stream-a: redis pool name {description}",
        f"stream stream-a: consumer group name {description}",
    )


def test_a_stream_in_a_badly_named_pool_is_not_blamed_too() -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379", pool="bad pool")
    registry.register_stream("stream-a", "bad pool", ["g"])
    assert one_problem(registry).startswith("redis pool name 'bad pool' holds ' '")


def test_long_name_messages_are_shortened() -> None:
    registry = registry_with_pool()
    registry.register_stream("x" * 1000, "default", ["g"])
    problem = one_problem(registry)
    assert "longer than 128 characters" in problem
    assert len(problem) < 200


@pytest.mark.parametrize(
    "name", ["a", "x" * 128, "stream-a", "orders.v2:eu", "événements", "流", "a/b", "🙂", "a{b}"]
)
def test_good_names(name: str) -> None:
    assert check_name("stream", name) is None
    registry = sb.Registry()
    registry.register_redis("localhost:6379", pool=name)
    registry.register_stream(name, name, [name])
    validated = registry.validate()
    assert validated.streams[name] == sb.StreamSpec(name, name, (name,))
    assert validated.groups[name] == (name,)


def test_check_name_explains() -> None:
    assert check_name("consumer", "") == "consumer name must not be empty"
    problem = check_name("stream", "a*b")
    assert problem is not None
    assert "'*'" in problem
    assert "glob characters" in problem


def test_all_problems_are_reported_at_once() -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:abc")
    registry.register_redis("localhost:6379", pool="second")
    registry.register_redis("localhost:6380", pool="second")
    registry.register_redis("redis://h", pool="bad pool")
    registry.register_stream("stream-a", "default", ["g"])
    registry.register_stream("stream-b", "nowhere", ["g"])
    registry.register_stream("stream-c", "second", [])
    registry.register_stream("stream-c", "second", ["g"])
    registry.register_stream("stream d", "second", ["g"])
    registry.register_stream("stream-e", "second", ["g", "g", "h*"])

    found = problems(registry)
    assert found == (
        "redis pool default: port 'abc' is not a number",
        "redis pool second is already registered",
        found[2],
        "stream stream-b: redis pool nowhere is not registered",
        "stream stream-c has no consumer groups",
        "stream with name stream-c already exists",
        found[6],
        "stream stream-e: consumer group g is listed twice",
        found[8],
    )
    assert found[2].startswith("redis pool name 'bad pool' holds ' '")
    assert found[6].startswith("stream name 'stream d' holds ' '")
    assert found[8].startswith("stream stream-e: consumer group name 'h*' holds '*'")


# --- properties -----------------------------------------------------------------------


@given(pool=VALID_NAMES, stream=STREAM_NAMES, group=VALID_NAMES)
def test_any_valid_names_round_trip(pool: str, stream: str, group: str) -> None:
    registry = sb.Registry()
    registry.register_redis("localhost:6379", pool=pool)
    registry.register_stream(stream, pool, [group])
    validated = registry.validate()
    assert list(validated.pools) == [pool]
    assert validated.pools[pool].name == pool
    assert validated.streams[stream] == sb.StreamSpec(stream, pool, (group,))
    assert dict(validated.groups) == {group: (stream,)}


@given(
    prefix=st.text(NAME_CHARS, max_size=60),
    bad=FORBIDDEN_CHARS,
    suffix=st.text(NAME_CHARS, max_size=60),
    kind=st.sampled_from(["pool", "stream", "group"]),
)
def test_any_name_with_a_forbidden_character_is_rejected(
    prefix: str, bad: str, suffix: str, kind: str
) -> None:
    name = prefix + bad + suffix
    registry = sb.Registry()
    pool = name if kind == "pool" else "default"
    registry.register_redis("localhost:6379", pool=pool)
    registry.register_stream(
        name if kind == "stream" else "s", pool, [name if kind == "group" else "g"]
    )
    found = problems(registry)
    assert found
    assert check_name(kind, name) is not None


@given(name=st.text(NAME_CHARS, min_size=129, max_size=300))
def test_any_name_longer_than_128_characters_is_rejected(name: str) -> None:
    assert check_name("stream", name) == (
        f"stream name {name[:20]!r}... is longer than 128 characters"
    )


@given(address=st.text(max_size=80), db=st.one_of(st.none(), st.integers(-3, 20)))
def test_any_address_either_validates_or_raises_config_error(address: str, db: int | None) -> None:
    registry = sb.Registry()
    registry.register_redis(address, db=db)
    error: sb.ConfigError | None = None
    try:
        spec = registry.validate().pools["default"]
    except sb.ConfigError as exc:
        error = exc
    if error is not None:
        assert len(error.problems) == 1
        assert error.problems[0].startswith("redis pool default: ")
    else:
        assert spec.kind in ("tcp", "url", "embedded")
        assert spec.db >= 0
        if spec.kind == "tcp":
            assert spec.port is not None
            assert 1 <= spec.port <= 65535


@given(
    host=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
    port=st.integers(1, 65535),
    db=st.integers(0, 10_000),
)
def test_host_port_db_round_trips(host: str, port: int, db: int) -> None:
    spec = pool_spec(f"{host}:{port}:{db}")
    assert (spec.host, spec.port, spec.db) == (host, port, db)
    assert spec == pool_spec(f"{host}:{port}", db=db)
    assert spec.display_address == f"{host}:{port}/{db}"


def test_credentials_without_a_url_are_refused_without_echoing_them() -> None:
    registry = sb.Registry()
    registry.register_redis("user:s3cr3t@host:6379")
    with pytest.raises(sb.ConfigError, match="must be a URL") as caught:
        registry.validate()
    assert "s3cr3t" not in str(caught.value)
