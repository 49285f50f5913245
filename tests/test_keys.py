"""The broker's keys: one per (stream, group) or (group, consumer), in the right slot,
under the registry's key prefix, and streams whose key would be one of them refused."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import yaml
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

import streambroker as sb
from streambroker.config.registry import check_key_prefix
from streambroker.wire.keys import (
    DerivedKey,
    dead_letter_key,
    decode_key,
    hash_tag,
    lease_key,
    replay_key,
)

from .conftest import Server, wait_for

FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.2, "retry_delay": 0.01}
NAME_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="*?[]"
)
#: Any valid name, braces and colons included (they are what could confuse the keys).
NAMES = st.text(st.one_of(NAME_CHARS, st.sampled_from("{}:")), min_size=1, max_size=40)
PREFIXES = st.one_of(
    st.just(""),
    st.sampled_from(["app:", "a", "sb:"]),
    NAMES.filter(lambda p: not {"{", "}"} & set(p)),
)


def stream_problems(name: str, prefix: str = "") -> tuple[str, ...]:
    """The problems validate() reports for a registry holding only stream ``name``."""
    registry = sb.Registry(key_prefix=prefix)
    registry.register_redis("localhost:6379")
    registry.register_stream(name, groups=["g"])
    try:
        registry.validate()
    except sb.ConfigError as exc:
        return exc.problems
    return ()


def accepted(name: str, prefix: str) -> sb.StreamSpec | None:
    """The stream ``name`` as validated under ``prefix``, or None when it is refused."""
    registry = sb.Registry(key_prefix=prefix)
    registry.register_redis("localhost:6379")
    registry.register_stream(name, groups=["g"])
    try:
        return registry.validate().streams[name]
    except sb.ConfigError:
        return None


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


# --- the layout ---------------------------------------------------------------------


def test_the_keys_of_a_stream_and_a_group() -> None:
    orders = sb.StreamSpec("orders", "default", ("billing",))
    assert orders.key == "orders"
    assert dead_letter_key(orders, "billing") == "{orders}:sb:dead:6:orders:billing"
    assert replay_key(orders, "billing") == "{orders}:sb:replay:6:orders:billing"
    assert lease_key("", "billing", "w1") == "{sb:lease:7:billing}:w1"
    prefixed = sb.StreamSpec("orders", "default", ("billing",), "app:")
    assert prefixed.key == "app:orders"
    assert dead_letter_key(prefixed, "billing") == "app:{app:orders}:sb:dead:6:orders:billing"
    assert lease_key("app:", "billing", "w1") == "app:{sb:lease:7:billing}:w1"
    tagged = sb.StreamSpec("{orders}.eu", "default", ("billing",), "app:")
    assert replay_key(tagged, "billing") == "app:{orders}:sb:replay:11:{orders}.eu:billing"


def test_streams_orders_and_braced_orders_have_keys_of_their_own() -> None:
    plain = sb.StreamSpec("orders", "default", ("billing",))
    braced = sb.StreamSpec("{orders}", "default", ("billing",))
    assert dead_letter_key(plain, "billing") != dead_letter_key(braced, "billing")
    assert replay_key(plain, "billing") != replay_key(braced, "billing")
    assert stream_problems("orders") == stream_problems("{orders}") == ()


def test_lease_keys_tell_colons_in_group_and_consumer_apart() -> None:
    assert lease_key("", "a:b", "c") != lease_key("", "a", "b:c")
    assert decode_key("", lease_key("", "a:b", "c")) == DerivedKey("lease", "", "a:b", "c")
    assert decode_key("", lease_key("", "a", "b:c")) == DerivedKey("lease", "", "a", "b:c")


@pytest.mark.parametrize("name", ["a}b", "{}x", "}", "x{}y}", "{}{a}"])
def test_a_stream_holding_a_closing_brace_without_a_hash_tag_is_refused(name: str) -> None:
    (problem,) = stream_problems(name)
    assert problem == (
        f"stream {name}: the name holds '}}' without a hash tag ({{...}} with text inside "
        f"before it): Redis Cluster hashes the whole key {name!r}, so the stream's dead "
        "letters and replays cannot share its hash slot; remove the '}' or give the name "
        "a hash tag"
    )


def test_a_stream_named_like_a_dead_letter_key_is_refused_naming_both() -> None:
    (problem,) = stream_problems("{orders}:sb:dead:6:orders:billing")
    assert problem == (
        "stream {orders}:sb:dead:6:orders:billing: its key "
        "'{orders}:sb:dead:6:orders:billing' is the dead-letter key of stream 'orders', "
        "group 'billing': choose another name"
    )
    (problem,) = stream_problems("{app:orders}:sb:replay:6:orders:g", prefix="app:")
    assert "is the replay key of stream 'orders', group 'g'" in problem
    (problem,) = stream_problems("{sb:lease:1:g}:w")
    assert "is the lease key of consumer 'w' in group 'g'" in problem
    # Not a key the broker derives: such a stream is fine.
    assert stream_problems("{orders}:sb:dead:billing") == ()


def test_a_stream_whose_hash_tag_is_a_lease_slot_is_refused() -> None:
    (problem,) = stream_problems("x{sb:lease:1:g}")
    assert problem == (
        "stream x{sb:lease:1:g}: its hash tag {sb:lease:1:g} starts with 'sb:lease:', which "
        "is kept for the keys of consumer leases: its dead letters and replays could take "
        "a lease's key"
    )


# --- properties -----------------------------------------------------------------------


@given(prefix=PREFIXES, name=NAMES, group=NAMES, consumer=NAMES)
def test_every_key_decodes_to_what_it_was_made_of(
    prefix: str, name: str, group: str, consumer: str
) -> None:
    """Decoding inverts encoding, so no two (kind, stream, group) or (group, consumer)
    share a key; and no accepted stream's key decodes, so none is a derived key."""
    assert decode_key(prefix, lease_key(prefix, group, consumer)) == DerivedKey(
        "lease", "", group, consumer
    )
    spec = accepted(name, prefix)
    if spec is None:
        return
    assert decode_key(prefix, spec.key) is None
    assert decode_key(prefix, dead_letter_key(spec, group)) == DerivedKey("dead", name, group)
    assert decode_key(prefix, replay_key(spec, group)) == DerivedKey("replay", name, group)


@given(prefix=PREFIXES, name=NAMES, group=NAMES, consumer=NAMES)
def test_every_key_starts_with_the_prefix_and_side_keys_share_the_stream_slot(
    prefix: str, name: str, group: str, consumer: str
) -> None:
    lease = lease_key(prefix, group, consumer)
    assert lease.startswith(prefix)
    assert slot(lease) == slot(lease_key(prefix, group, "another"))
    spec = accepted(name, prefix)
    if spec is None:
        return
    for key in (dead_letter_key(spec, group), replay_key(spec, group)):
        assert key.startswith(prefix)
        assert slot(key) == slot(spec.key)


@given(
    prefix=PREFIXES,
    first=NAMES,
    second=NAMES,
    group=NAMES,
    kind=st.sampled_from(["dead", "replay"]),
)
def test_no_two_accepted_streams_share_a_key(
    prefix: str, first: str, second: str, group: str, kind: str
) -> None:
    one, other = accepted(first, prefix), accepted(second, prefix)
    if one is None or other is None or first == second:
        return
    keys = {one.key, other.key}
    for spec in (one, other):
        keys |= {dead_letter_key(spec, group), replay_key(spec, group)}
    assert len(keys) == 6
    # A stream named after one of the other's keys is always refused.
    derived = (dead_letter_key if kind == "dead" else replay_key)(one, group)
    assert accepted(derived[len(prefix) :], prefix) is None


@given(name=NAMES)
def test_a_stream_is_refused_exactly_when_its_side_keys_cannot_share_its_slot(
    name: str,
) -> None:
    tag = hash_tag(name)
    slot_problem = tag is None and "}" in name
    problems = stream_problems(name)
    assert bool(problems) == (
        slot_problem or (tag or "").startswith("sb:lease:") or bool(decode_key("", name))
    )


# --- the key prefix -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("app{", "key prefix 'app{' holds a brace"),
        ("}app", "key prefix '}app' holds a brace"),
        ("my app:", "key prefix 'my app:' holds ' '"),
        ("app*", "key prefix 'app*' holds '*'"),
        (3, "key prefix must be a string, got int 3"),
    ],
)
def test_a_bad_key_prefix_is_refused(prefix: object, problem: str) -> None:
    registry = sb.Registry(key_prefix=prefix)  # type: ignore[arg-type]
    registry.register_redis("localhost:6379")
    registry.register_stream("orders", groups=["g"])
    with pytest.raises(sb.ConfigError) as info:
        registry.validate()
    (found,) = info.value.problems
    assert found.startswith(problem), found
    assert check_key_prefix(prefix) == found


YAML = """\
key_prefix: "app:"
default:
    redis: localhost:6379
    streams:
        orders: [billing]
"""


def test_the_key_prefix_in_yaml() -> None:
    validated = sb.Registry.from_yaml(YAML).validate()
    assert validated.key_prefix == "app:"
    assert validated.streams["orders"].key == "app:orders"
    in_code = sb.Registry(key_prefix="app:")
    in_code.register_redis("localhost:6379")
    in_code.register_stream("orders", groups=["billing"])
    assert validated == in_code.validate()
    assert validated != sb.Registry.from_yaml(YAML.partition("\n")[2]).validate()
    assert sb.Registry.from_yaml(YAML.replace('"app:"', "app-")).validate().key_prefix == "app-"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            YAML.replace('key_prefix: "app:"', "key_prefix: [app]"),
            '<yaml>:1: key_prefix must be a string such as "app:" (quote it), got a list',
        ),
        (
            YAML.replace('key_prefix: "app:"', "key_prefix: 12"),
            '<yaml>:1: key_prefix must be a string such as "app:" (quote it), got the int 12',
        ),
        (
            YAML.replace('key_prefix: "app:"', "key_prefix:"),
            '<yaml>:1: key_prefix must be a string such as "app:" (quote it), got nothing',
        ),
        (
            YAML.replace("    streams:", '    key_prefix: "app:"\n    streams:'),
            "<yaml>:4: redis pool default: key_prefix belongs at the top level, beside the "
            "pools (it applies to all of them)",
        ),
        (YAML + 'key_prefix: "b:"\n', "<yaml>:6: key_prefix is given twice"),
    ],
)
def test_a_misplaced_or_non_string_key_prefix_in_yaml_names_its_line(
    text: str, problem: str
) -> None:
    with pytest.raises(sb.ConfigError) as info:
        sb.Registry.from_yaml(text)
    assert problem in info.value.problems[0], info.value.problems


def test_a_bad_key_prefix_in_yaml_names_its_line() -> None:
    registry = sb.Registry.from_yaml(YAML.replace('"app:"', '"app{"'))
    with pytest.raises(sb.ConfigError) as info:
        registry.validate()
    (problem,) = info.value.problems
    assert problem.startswith("<yaml>:1: key prefix 'app{' holds a brace"), problem


def test_yaml_round_trip_of_the_prefix() -> None:
    text = yaml.safe_dump({"key_prefix": "x:", "p": {"redis": "localhost:1", "streams": None}})
    assert sb.Registry.from_yaml(text).validate().key_prefix == "x:"


# --- on a server ----------------------------------------------------------------------


def registry(server: Server, streams: list[str], prefix: str = "") -> sb.ValidatedRegistry:
    config = sb.Registry(key_prefix=prefix)
    config.register_redis(f"{server.address}:0")
    for name in streams:
        config.register_stream(name, groups=["billing"])
    return config.validate()


def drain(broker: sb.Broker, seen: list[tuple[str, object]], poison: str = "bad") -> None:
    """Consume group billing until nothing is left; events whose body starts with
    ``poison`` fail (they go straight to the dead letters)."""

    def handle(events: list[sb.Event]) -> None:
        for event in events:
            seen.append((event.stream, event.body))
            if str(event.body).startswith(poison):
                event.fail(ValueError(event.body))

    consumer = broker.consumer("billing", "w", max_deliveries=1, **FAST)
    for _ in range(30):
        if consumer.consume(handle, count=10, block=False) == 0:
            return
    pytest.fail(f"group billing still has events: {seen}")


def dead_bodies(broker: sb.Broker, stream: str) -> list[object]:
    return [letter.event.body for letter in broker.dead_letters(stream, "billing")]


def test_orders_and_braced_orders_side_by_side(server: Server) -> None:
    with registry(server, ["orders", "{orders}"]).broker() as broker:
        broker.publish("orders", "bad-plain")
        broker.publish("{orders}", "bad-braced")
        broker.publish("{orders}", "good")
        seen: list[tuple[str, object]] = []
        drain(broker, seen)
        assert sorted(seen) == [
            ("orders", "bad-plain"),
            ("{orders}", "bad-braced"),
            ("{orders}", "good"),
        ]
        assert dead_bodies(broker, "orders") == ["bad-plain"]
        assert dead_bodies(broker, "{orders}") == ["bad-braced"]

        assert broker.replay_dead_letters("{orders}", "billing") == 1
        replayed: list[tuple[str, object]] = []
        drain(broker, replayed, poison="none")
        assert replayed == [("{orders}", "bad-braced")]
        assert dead_bodies(broker, "orders") == ["bad-plain"]
        assert dead_bodies(broker, "{orders}") == []
        stats = {s.stream: s for s in broker.stats()}
        assert stats["orders"].groups[0].dead_letters == 1
        assert stats["{orders}"].groups[0].dead_letters == 0


@contextmanager
def running(consumer: sb.Consumer, lease: str, client: redis.Redis) -> Iterator[None]:
    """Run ``consumer`` in a thread, holding its name, until the block ends."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            consumer.consume(lambda events: None, handle_signals=False)
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: failures or client.exists(lease), what="the consumer's lease")
        assert not failures, failures
        yield
    finally:
        consumer.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert not failures, failures


def test_leases_of_colons_in_group_and_consumer_are_independent(server: Server) -> None:
    config = sb.Registry()
    config.register_redis(f"{server.address}:0")
    config.register_stream("orders", groups=["a:b", "a"])
    client = server.client()
    with config.validate().broker() as broker:
        first = broker.consumer("a:b", "c", **FAST)
        with running(first, lease_key("", "a:b", "c"), client):
            # Before, both names took the key sb:lease:a:b:c: this one was refused as busy.
            assert (
                broker.consumer("a", "b:c", **FAST).consume(lambda events: None, block=False) == 0
            )
            assert client.exists(lease_key("", "a:b", "c"))


def test_two_prefixes_on_one_server_do_not_see_each_other(server: Server) -> None:
    client = server.client()
    client.set("other-program", "1")  # a key of neither
    one = registry(server, ["orders", "{orders}"], prefix="app1:").broker()
    two = registry(server, ["orders", "{orders}"], prefix="app2:").broker()
    with one, two:
        two.publish("orders", "bad-two")
        two.publish("{orders}", "good-two")
        seen_one: list[tuple[str, object]] = []
        seen_two: list[tuple[str, object]] = []
        holder = one.consumer("billing", "w", **FAST)
        with running(holder, lease_key("app1:", "billing", "w"), client):
            drain(two, seen_two)  # the same group and consumer name, at the same time
        one.publish("orders", "bad-one")
        one.publish("orders", "good-one")
        drain(one, seen_one)
        assert sorted(seen_one) == [("orders", "bad-one"), ("orders", "good-one")]
        assert sorted(seen_two) == [("orders", "bad-two"), ("{orders}", "good-two")]
        assert dead_bodies(one, "orders") == ["bad-one"]
        assert dead_bodies(two, "orders") == ["bad-two"]

        assert one.replay_dead_letters("orders", "billing") == 1
        assert dead_bodies(two, "orders") == ["bad-two"]
        replayed: list[tuple[str, object]] = []
        drain(one, replayed, poison="none")
        assert replayed == [("orders", "bad-one")]

        two.publish("orders", "waiting")  # not read yet: no collection may remove it
        one.collect_garbage()
        assert [s.length for s in one.stats()] == [0, 0]
        one_orders = one.registry.streams["orders"]
        assert client.xlen(replay_key(one_orders, "billing")) == 0
        two.collect_garbage()
        (orders_two,) = two.stats("orders")
        assert orders_two.length == 1
        assert (orders_two.groups[0].lag, orders_two.groups[0].dead_letters) == (1, 1)
        assert not client.exists("orders")  # nothing without a prefix

        keys = {key.decode() for key in client.scan_iter(count=1000)}
        assert keys - {"other-program"}
        assert all(k.startswith(("app1:", "app2:")) for k in keys - {"other-program"}), keys
        assert "app2:{app2:orders}:sb:dead:6:orders:billing" in keys
