"""Retention limits: past ``max_length`` or ``max_age`` the oldest events go, whoever
still needs them, with exact counts of what each group lost; without limits, nothing
changes (see also test_gc.py, whose tests run without limits)."""

from __future__ import annotations

import logging
import math
import re
import uuid

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import streambroker as sb
from streambroker.core.gc import COLLECT_SCRIPT, WINDOW_LIMIT
from streambroker.core.publishing import COLLECT_EVERY_EVENTS
from streambroker.wire.keys import dead_letter_key

from .conftest import OpenBroker, Server
from .test_gc import fail_after_acking, ignore

pytestmark = pytest.mark.anywhere

GROUPS = ("ga", "gb")
LOST = re.compile(r"group (\S+) lost (\d+) unread and (\d+) pending")


def registry(server: Server, db: int = 0, **limits: float) -> sb.ValidatedRegistry:
    """Stream ``s`` read by ga and gb, with ``limits``."""
    reg = sb.Registry()
    reg.register_redis(server.pool_address(db))
    reg.register_stream("s", "default", list(GROUPS), **limits)  # type: ignore[arg-type]
    return reg.validate()


def create_groups(client: redis.Redis, *groups: str) -> None:
    """Create ``groups`` (ga and gb by default) on ``s`` at id 0, as their first
    consumers would (publishing creates none)."""
    for group in groups or GROUPS:
        client.xgroup_create("s", group, "0", mkstream=True)


def ids_in(client: redis.Redis, key: str = "s") -> list[str]:
    return [entry_id.decode() for entry_id, _ in client.xrange(key)]


def pending_ids(client: redis.Redis, group: str, key: str = "s") -> list[str]:
    rows = client.xpending_range(key, group, "-", "+", 10**6)
    return [row["message_id"].decode() for row in rows]


def losses(caplog: pytest.LogCaptureFixture) -> list[dict[str, tuple[int, int]]]:
    """What each retention warning logged by ``streambroker`` says the groups lost."""
    return [
        {g: (int(u), int(p)) for g, u, p in LOST.findall(record.getMessage())}
        for record in caplog.records
        if record.name == "streambroker" and "retention limits" in record.getMessage()
    ]


# --- registering limits ----------------------------------------------------------------


def test_limits_are_registered_in_code_and_yaml() -> None:
    reg = sb.Registry()
    reg.register_redis("localhost:6379")
    reg.register_stream("plain", "default", ["g"])
    reg.register_stream("capped", "default", ["g", "h"], max_length=1000, max_age=3600)
    in_code = reg.validate()
    in_yaml = sb.Registry.from_yaml(
        "default:\n"
        "  redis: localhost:6379\n"
        "  streams:\n"
        "    plain: [g]\n"
        "    capped:\n"
        "      groups: [g, h]\n"
        "      max_length: 1000\n"
        "      max_age: 3600.0\n"
    ).validate()
    assert in_code == in_yaml
    assert in_yaml.streams["plain"] == sb.StreamSpec("plain", "default", ("g",))
    assert not in_yaml.streams["plain"].limited
    capped = in_yaml.streams["capped"]
    assert (capped.max_length, capped.max_age, capped.limited) == (1000, 3600.0, True)
    only_age = sb.Registry.from_yaml(
        "p:\n  redis: localhost:6379\n  streams:\n    s: {groups: [g], max_age: 0.5}\n"
    ).validate()
    assert (only_age.streams["s"].max_length, only_age.streams["s"].max_age) == (None, 0.5)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_length": 0}, "max_length must be at least 1 event, got 0"),
        ({"max_length": -5}, "max_length must be at least 1 event, got -5"),
        ({"max_length": 1.5}, "max_length must be a number of events (an integer >= 1), got 1.5"),
        ({"max_length": True}, "max_length must be a number of events (an integer >= 1), got True"),
        ({"max_length": "10"}, "max_length must be a number of events (an integer >= 1), got '10'"),
        ({"max_age": 0}, "max_age must be at least 0.001 s (a millisecond) and finite, got 0"),
        ({"max_age": 0.0001}, "max_age must be at least 0.001 s (a millisecond) and finite"),
        ({"max_age": math.inf}, "max_age must be at least 0.001 s (a millisecond) and finite"),
        ({"max_age": math.nan}, "max_age must be at least 0.001 s (a millisecond) and finite"),
        ({"max_age": "1h"}, "max_age must be a number of seconds, got '1h'"),
        ({"max_age": False}, "max_age must be a number of seconds, got False"),
    ],
)
def test_bad_limits_in_code_name_the_stream(limits: dict[str, object], message: str) -> None:
    reg = sb.Registry()
    reg.register_redis("localhost:6379")
    reg.register_stream("orders", "default", ["g"], **limits)  # type: ignore[arg-type]
    with pytest.raises(sb.ConfigError) as info:
        reg.validate()
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"stream orders: {message}")


def test_bad_limits_in_yaml_name_their_line() -> None:
    text = (
        "default:\n"  # 1
        "  redis: localhost:6379\n"
        "  streams:\n"
        "    a:\n"
        "      groups: [g]\n"  # 5
        "      max_length: '10'\n"
        "      max_age: -1\n"
        "    b:\n"
        "      groups: [g]\n"
        "      max_length: [1]\n"  # 10
        "      max_age: {hours: 1}\n"
        "    c: {max_length: 3}\n"
        "    d: [g]\n"
    )
    problems = sb.Registry.from_yaml(text)
    with pytest.raises(sb.ConfigError) as info:
        problems.validate()
    assert info.value.problems == (
        "<yaml>:6: stream a: max_length must be a number of events (an integer >= 1), got '10'",
        "<yaml>:7: stream a: max_age must be at least 0.001 s (a millisecond) and finite, got -1",
        "<yaml>:10: stream b: max_length must be a number of events (an integer >= 1), got a list",
        "<yaml>:11: stream b: max_age must be a number of seconds, got a mapping",
        "<yaml>:12: stream c has no consumer groups",
    )


def test_unknown_and_repeated_keys_of_a_stream_mapping_name_their_line() -> None:
    text = (
        "default:\n"
        "  redis: localhost:6379\n"
        "  streams:\n"
        "    a:\n"
        "      groups: [g]\n"
        "      maxlen: 10\n"
        "    b: {groups: [g], max_age: 1, max_age: 2}\n"
        "    c: {groups: g}\n"
        "    d: {read-group-a: 1}\n"
    )
    with pytest.raises(sb.ConfigError) as info:
        sb.Registry.from_yaml(text)
    expected = "(a stream maps to a list of consumer group names, or to a mapping with groups, "
    assert info.value.problems == (
        f"<yaml>:6: stream a: unknown key 'maxlen' {expected}max_length, max_age)",
        "<yaml>:7: stream b: duplicate 'max_age'",
        "<yaml>:8: stream c: expected a list of consumer group names",
        f"<yaml>:9: stream d: unknown key 'read-group-a' {expected}max_length, max_age)",
    )


# --- what a collection removes, and what each group lost ----------------------------------


def test_past_max_length_each_group_loses_what_it_had_not_acknowledged(
    open_broker: OpenBroker, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """ga never read anything (stopped); gb dead-lettered one event, acknowledged two,
    holds four pending and has one unread among the eight oldest, which go."""
    client = server.client()
    create_groups(client)  # by their consumers, which stopped
    publisher = open_broker(registry(server))  # publishes without limits: never collects
    ids = [publisher.publish("s", n) for n in range(10)]
    with pytest.raises(RuntimeError):
        publisher.consumer("gb", collect=False, max_deliveries=1).consume(
            fail_after_acking(0), count=1, block=False
        )
    with pytest.raises(RuntimeError):
        publisher.consumer("gb", collect=False).consume(fail_after_acking(2), count=6, block=False)
    assert pending_ids(client, "gb") == ids[3:7]
    dead_key = dead_letter_key(registry(server).streams["s"], "gb")
    dead_before = client.xrange(dead_key)
    assert len(dead_before) == 1

    limited = open_broker(registry(server, max_length=2))
    with caplog.at_level(logging.WARNING, logger="streambroker"):
        assert limited.collect_garbage("s") == {"s": 8}
    assert ids_in(client) == ids[8:]
    assert losses(caplog) == [{"ga": (8, 0), "gb": (1, 4)}]
    (record,) = [r for r in caplog.records if "retention limits" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "stream s is past its retention limits (max_length 2)" in record.getMessage()
    assert pending_ids(client, "gb") == []  # no ids of removed entries left pending
    assert client.xrange(dead_key) == dead_before  # dead letters untouched

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streambroker"):
        assert limited.collect_garbage("s") == {"s": 0}
    assert losses(caplog) == []  # nothing removed: no warning

    # Both groups go on with what is left, and no consumer finds pending ids gone.
    for group in GROUPS:
        handled: list[sb.Event] = []
        limited.consumer(group).consume(handled.extend, block=False)
        assert [event.id for event in handled] == ids[8:]
    assert not any("no longer in the stream" in r.getMessage() for r in caplog.records)


def test_max_age_removes_events_older_than_it_by_the_servers_clock(
    open_broker: OpenBroker, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    client = server.client()
    broker = open_broker(registry(server, max_age=60))
    create_groups(client)
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    ages = [3600, 600, 61, 59, 5]  # seconds before now, by the server's clock
    ids = [client.xadd("s", {"n": str(age)}, id=f"{now_ms - age * 1000}-0") for age in ages]
    client.xreadgroup("gb", "c", {"s": ">"}, count=1)  # gb holds the oldest pending
    with caplog.at_level(logging.WARNING, logger="streambroker"):
        assert broker.collect_garbage("s") == {"s": 3}
    assert [i.encode() for i in ids_in(client)] == ids[3:]
    assert losses(caplog) == [{"ga": (3, 0), "gb": (2, 1)}]
    assert "(max_age 60 s)" in caplog.records[-1].getMessage()


def test_a_registered_group_missing_on_the_server_loses_every_event_removed(
    open_broker: OpenBroker, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the limits it would hold everything back; with them, the oldest go and it
    is counted as having read none of them."""
    client = server.client()
    publisher = open_broker(registry(server))
    ids = [publisher.publish("s", n) for n in range(6)]
    create_groups(client, "gb")  # as its consumer did, before it stopped
    publisher.consumer("ga").consume(ignore, block=False)
    limited = open_broker(registry(server, max_length=4))
    limited.collect_garbage()  # gb still there: it loses 2 unread
    assert client.xgroup_destroy("s", "gb") == 1
    ids += [publisher.publish("s", n) for n in range(6, 8)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streambroker"):
        assert limited.collect_garbage("s") == {"s": 2}
    assert ids_in(client) == ids[4:]
    assert losses(caplog) == [{"gb": (2, 0)}]  # ga had acknowledged them


def test_a_large_excess_goes_in_one_collect_garbage(
    open_broker: OpenBroker, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A collection removes at most WINDOW_LIMIT events past the limits per script call;
    collect_garbage repeats until the stream is within them."""
    client = server.client()
    broker = open_broker(registry(server, max_length=100))
    create_groups(client)
    total = 2 * WINDOW_LIMIT + 300
    pipe = client.pipeline(transaction=False)
    for n in range(total):
        pipe.xadd("s", {"n": str(n)})
    newest = pipe.execute()[-100:]
    with caplog.at_level(logging.WARNING, logger="streambroker"):
        assert broker.collect_garbage("s") == {"s": total - 100}
    assert [i.encode() for i in ids_in(client)] == newest
    counted = losses(caplog)
    assert len(counted) == 3
    assert sum(lost["ga"][0] for lost in counted) == total - 100


def test_consumers_apply_the_limits_as_they_collect(
    open_broker: OpenBroker, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """ga collects as it acknowledges: the stream goes down to its 10 newest events,
    past what ga had read too (gb has stopped); ga is told exactly how many it lost
    unread, and goes on with what is left."""
    client = server.client()
    create_groups(client, "gb")  # by its consumer, which stopped
    publisher = open_broker(registry(server))
    ids = [publisher.publish("s", n) for n in range(30)]
    limited = open_broker(registry(server, max_length=10))
    handled: list[str] = []
    with caplog.at_level(logging.WARNING, logger="streambroker"):
        limited.consumer("ga").consume(
            lambda events: handled.extend(e.id for e in events), count=7, block=False
        )
    assert ids_in(client) == ids[20:]
    (lost,) = losses(caplog)
    unread, pending = lost.pop("ga", (0, 0))
    assert lost == {"gb": (20, 0)}
    assert unread > 0
    assert pending <= 20 - unread
    assert handled == ids[: 20 - unread] + ids[20:]


def test_publishers_alone_keep_a_limited_stream_bounded(
    open_broker: OpenBroker, server: Server
) -> None:
    """No consumer runs: publishers collect every COLLECT_EVERY_EVENTS events (and at
    their first one), so the stream never holds more than that many past the limit, and
    a batch is collected in its own round trip."""
    client = server.client()
    broker = open_broker(registry(server, max_length=50))
    highest = 0
    for n in range(3 * COLLECT_EVERY_EVENTS):
        broker.publish("s", n)
        highest = max(highest, client.xlen("s"))
    assert highest <= 50 + COLLECT_EVERY_EVENTS - 1
    with broker.batch() as batch:
        for n in range(COLLECT_EVERY_EVENTS + 20):
            batch.publish("s", n)
    assert ids_in(client) == batch.ids[-50:]


@pytest.mark.one_server
def test_a_publisher_refused_the_collect_script_still_publishes(
    open_broker: OpenBroker, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """The events went out: a collection the ACL refuses is a warning, not an error."""
    admin = server.client()
    name, password = f"sb-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rules = ("reset", "on", "~*", "&*", "+@all", f">{password}", "-evalsha", "-eval")
    admin.execute_command("ACL", "SETUSER", name, *rules)
    admin.script_load(COLLECT_SCRIPT.text)  # held by the server: it goes out as EVALSHA
    try:
        reg = sb.Registry()
        reg.register_redis(f"redis://{name}:{password}@{server.address}/0")
        reg.register_stream("s", "default", list(GROUPS), max_length=2)
        broker = open_broker(reg.validate())
        with caplog.at_level(logging.WARNING, logger="streambroker"):
            ids = [broker.publish("s", n) for n in range(3)]
        assert ids_in(admin) == ids
        warned = [r.getMessage() for r in caplog.records if "could not apply" in r.getMessage()]
        assert warned  # at its first event at least
        for message in warned:
            assert message.startswith(
                "stream s: its publisher could not apply its retention limits: redis pool "
                "'default': cannot collect stream 's': "
            )
            assert "'evalsha'" in message
    finally:
        admin.execute_command("ACL", "DELUSER", name)
        admin.close()


def test_an_unlimited_stream_is_published_as_before(
    open_broker: OpenBroker, server: Server
) -> None:
    """Its publishers send nothing but the events; a limited stream's send scripts."""
    client = server.client()
    broker = open_broker(registry(server))
    client.config_resetstat()
    for n in range(2 * COLLECT_EVERY_EVENTS):
        broker.publish("s", n)
    with broker.batch() as batch:
        for n in range(2 * COLLECT_EVERY_EVENTS):
            batch.publish("s", n)
    stats = client.info("commandstats")
    assert stats["cmdstat_xadd"]["calls"] == 4 * COLLECT_EVERY_EVENTS
    scripted = ("cmdstat_eval", "cmdstat_script", "cmdstat_xtrim")  # EVALSHA, SCRIPT EXISTS
    assert not [name for name in stats if name.startswith(scripted)]
    assert client.xlen("s") == 4 * COLLECT_EVERY_EVENTS

    limited = open_broker(registry(server, max_length=10**6))
    client.config_resetstat()
    for n in range(2 * COLLECT_EVERY_EVENTS):
        limited.publish("s", n)
    stats = client.info("commandstats")
    # The server lacked the collect script (SCRIPT EXISTS, asked once, said so): its
    # first run went out as EVAL.
    assert stats["cmdstat_script|exists"]["calls"] == 1
    assert stats["cmdstat_eval"]["calls"] == 1
    assert stats["cmdstat_evalsha"]["calls"] >= 1


def test_stats_show_the_limits(open_broker: OpenBroker, server: Server) -> None:
    broker = open_broker(registry(server, max_length=7, max_age=90))
    stats = broker.stream_stats("s")
    assert (stats.max_length, stats.max_age) == (7, 90.0)
    assert (open_broker(registry(server)).stream_stats("s").max_length) is None


# --- the invariants, over random interleavings ------------------------------------------

MAX_LENGTH = 6


def test_with_max_length_only_the_oldest_go_and_the_counts_are_exact(
    open_broker: OpenBroker, server: Server
) -> None:
    """Random publishes (from a publisher without limits), reads, acks and collections
    with max_length: after each collection the stream holds the newest ``MAX_LENGTH`` of
    what it held minus what every group acknowledged, the warning counts exactly what
    each group had unread or pending among the removed events, and no removed id stays
    pending."""
    publishing = registry(server, db=6)
    limited = registry(server, db=6, max_length=MAX_LENGTH)
    cuts: list[int] = []  # the events removed past the limit, per collection that did

    class Interleavings(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.client = server.client(6)
            self.client.flushdb()
            self.publisher = open_broker(publishing)
            self.broker = open_broker(limited)
            self.acked: dict[str, set[str]] = {g: set() for g in GROUPS}
            self.published: list[str] = []
            self.records: list[logging.LogRecord] = []
            self.handler = logging.Handler()
            self.handler.emit = self.records.append  # type: ignore[method-assign]
            logging.getLogger("streambroker").addHandler(self.handler)

        def teardown(self) -> None:
            logging.getLogger("streambroker").removeHandler(self.handler)
            self.publisher.close()
            self.broker.close()
            self.client.close()

        @initialize()
        def create_groups(self) -> None:
            for group in GROUPS:  # as their consumers would
                self.client.xgroup_create("s", group, "0", mkstream=True)

        @rule(n=st.integers(1, 5))
        def publish(self, n: int) -> None:
            with self.publisher.batch() as batch:
                for i in range(n):
                    batch.publish("s", i)
            self.published.extend(batch.ids)

        @rule(group=st.sampled_from(GROUPS), count=st.integers(1, 4))
        def read(self, group: str, count: int) -> None:
            self.client.xreadgroup(group, "c", {"s": ">"}, count=count)

        @rule(data=st.data(), group=st.sampled_from(GROUPS))
        def ack_some(self, data: st.DataObject, group: str) -> None:
            pending = pending_ids(self.client, group)
            if pending:
                chosen = data.draw(st.lists(st.sampled_from(pending), max_size=3, unique=True))
                if chosen:
                    self.client.xack("s", group, *chosen)
                    self.acked[group].update(chosen)

        @precondition(lambda self: self.published)
        @rule()
        def collect(self) -> None:
            before = ids_in(self.client)
            last = {
                row["name"].decode(): row["last-delivered-id"].decode()
                for row in self.client.xinfo_groups("s")
            }
            pending = {g: set(pending_ids(self.client, g)) for g in GROUPS}
            kept = [i for i in before if not all(i in self.acked[g] for g in GROUPS)]
            expected = kept[-MAX_LENGTH:]
            cut = kept[: len(kept) - len(expected)]
            del self.records[:]
            removed = self.broker.collect_garbage("s")["s"]
            assert ids_in(self.client) == expected
            assert removed == len(before) - len(expected)
            lost = {
                g: (
                    sum(_after(i, last[g]) for i in cut),
                    len(pending[g] & set(cut)),
                )
                for g in GROUPS
            }
            lost = {g: counts for g, counts in lost.items() if any(counts)}
            warned = [
                {g: (int(u), int(p)) for g, u, p in LOST.findall(r.getMessage())}
                for r in self.records
                if "retention limits" in r.getMessage()
            ]
            assert warned == ([lost] if cut else [])
            if cut:
                cuts.append(len(cut))
            for group in GROUPS:
                assert not set(pending_ids(self.client, group)) & set(cut)

        @invariant()
        def only_the_oldest_unacknowledged_events_are_gone(self) -> None:
            present = ids_in(self.client)
            oldest = _key(present[0]) if present else None
            for event_id in set(self.published) - set(present):
                if not all(event_id in self.acked[g] for g in GROUPS):
                    assert oldest is None or _key(event_id) < oldest, event_id

    run_state_machine_as_test(
        Interleavings,
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
    assert cuts, "no collection went past the limit: the test proved nothing"


def _key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def _after(event_id: str, last_delivered: str) -> bool:
    return _key(event_id) > _key(last_delivered)
