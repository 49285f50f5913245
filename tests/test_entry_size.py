"""The receive-side limit ``max_entry_size``, on the real servers and both faces.

Entries larger than the limit, written by another program, are never read whole: a
consumer sets them aside as dead letters (the server copies them) and handles the
other events; ``read`` stops before them. The limit is 1 MiB here, the hostile
entries a few MiB: over a read's budget (a few entries of the limit), or under it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

import streambroker as sb
from streambroker.core.effects import with_text
from streambroker.core.sizes import entry_size, range_sizes_command
from streambroker.wire.keys import dead_letter_key

from .conftest import FACES, OpenBroker, Server

LIMIT = 1 << 20
#: Over the budget of a read (which has room for a few entries of the limit).
HUGE = 24 << 20
#: Over the limit but under a read's budget: read whole, then set aside.
OVER = LIMIT + (256 << 10)
ROOT = Path(__file__).resolve().parent.parent

#: The registry of these tests: one stream, one group.
YAML = "default:\n  redis: {address}:0\n  streams:\n    s: [g]\n"
DEAD = dead_letter_key(sb.StreamSpec("s", "default", ("g",)), "g")

#: A consumer in a process of its own, so that its memory can be measured: it prints
#: the ids it handled and how far its peak resident memory rose above what it held
#: before consuming. Linux's own account of the process is read (``getrusage`` reports
#: the peak of the forking test process too).
CONSUMER = """
import asyncio, json, sys
import streambroker as sb

address, face, limit, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
yaml = f"default:\\n  redis: {address}:0\\n  streams:\\n    s: [g]\\n"
config = sb.Registry.from_yaml(yaml).validate()
ids = []

def handler(events):
    ids.extend(event.id for event in events)

def memory(field):  # bytes, from the kernel's account of this process
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)

def start():  # what the process holds now; its peak counts from here on
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to what is resident now
    return memory("VmRSS")

if face == "sync":
    with config.broker(max_entry_size=limit) as broker:
        broker.stats()  # connected, before measuring
        before = start()
        broker.consumer("g").consume(handler, count=count, block=False)
else:
    async def main():
        async with config.async_broker(max_entry_size=limit) as broker:
            await broker.stats()
            began = start()
            await broker.consumer("g").consume(handler, count=count, block=False)
            return began
    before = asyncio.run(main())
print(json.dumps({"ids": ids, "growth": memory("VmHWM") - before}))
"""


def registry(server: Server) -> sb.ValidatedRegistry:
    return sb.Registry.from_yaml(YAML.format(address=server.address)).validate()


def hostile(server: Server, size: int) -> str:
    """Write an entry of ``size`` bytes to ``s``, as another program could; its id."""
    return server.client().xadd("s", {"$body": b"x" * size, "$codec": "msgpack"}).decode()


def dead_letters(server: Server) -> dict[str, bytes]:
    """The original id and error of each dead letter of ``g``, read without their fields."""
    client = server.client()
    script = """
local out = {}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  table.insert(out, f['$dead:id']); table.insert(out, f['$dead:error'])
end
return out
"""
    flat = client.eval(script, 1, DEAD)
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


def reason(size: int) -> bytes:
    return (
        f"the entry is {size} bytes, more than the max_entry_size limit of {LIMIT} bytes; "
        "it was set aside without being read"
    ).encode()


def assert_drained(server: Server) -> None:
    client = server.client()
    assert client.xpending("s", "g")["pending"] == 0
    assert client.xlen("s") == 0  # collected: the dead letters were acknowledged


@pytest.mark.parametrize("face", FACES)
def test_a_consumer_sets_a_huge_entry_aside_unread_with_bounded_memory(
    server: Server, face: str
) -> None:
    with registry(server).broker() as broker:
        first = broker.publish("s", "first")
        huge = hostile(server, HUGE)
        last = broker.publish("s", "last")

    run = subprocess.run(
        [sys.executable, "-c", CONSUMER, server.address, face, str(LIMIT), "10"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["ids"] == [first, last]  # each once
    # Reading it whole would take twice its size; the budget is a few MiB.
    assert result["growth"] < HUGE // 2, result["growth"]
    assert dead_letters(server) == {huge: reason(HUGE + len("$body$codecmsgpack"))}
    assert f"entry {huge} is" in run.stderr
    assert_drained(server)


def test_several_huge_entries_of_one_batch_become_dead_letters(
    server: Server, open_broker: OpenBroker
) -> None:
    broker = open_broker(registry(server), max_entry_size=LIMIT)
    ids = [broker.publish("s", "a")]
    huge = [hostile(server, 6 << 20)]
    ids.append(broker.publish("s", "b"))
    huge += [hostile(server, 6 << 20), hostile(server, 8 << 20)]
    ids.append(broker.publish("s", "c"))
    handled: list[str] = []

    count = broker.consumer("g").consume(
        lambda events: handled.extend(e.id for e in events), count=10, block=False
    )

    assert (count, handled) == (3, ids)
    assert sorted(dead_letters(server)) == sorted(huge)
    # Listed without the event's fields, which a replay would copy whole.
    letters = broker.dead_letters("s", "g")
    assert [(letter.event.id, letter.event.raw_body) for letter in letters] == [
        (event_id, None) for event_id in huge
    ]
    sizes = [6 << 20, 6 << 20, 8 << 20]
    assert [letter.error for letter in letters] == [
        reason(size + len("$body$codecmsgpack")).decode() for size in sizes
    ]
    ((_, copy),) = server.client().xrange(DEAD, count=1)
    assert copy[b"$body"] == b"x" * (6 << 20)
    assert_drained(server)


def test_a_batch_of_big_entries_under_the_limit_is_split_not_refused(
    server: Server, open_broker: OpenBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streambroker")
    broker = open_broker(registry(server), max_entry_size=LIMIT)
    ids = [broker.publish("s", b"x" * (900 << 10)) for _ in range(30)]
    handled: list[str] = []

    count = broker.consumer("g").consume(
        lambda events: handled.extend(e.id for e in events), count=10, block=False
    )

    assert (count, handled) == (30, ids)
    # Once: the consumer then reads as many as a budget has room for.
    overflows = [r for r in caplog.records if "took more than its budget" in r.getMessage()]
    assert len(overflows) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert dead_letters(server) == {}
    assert_drained(server)


def test_big_dead_letters_under_the_limit_are_listed_whole_in_pages(
    server: Server, open_broker: OpenBroker
) -> None:
    broker = open_broker(registry(server), max_entry_size=LIMIT)
    ids = [broker.publish("s", b"x" * (900 << 10)) for _ in range(6)]

    def fail(events: list[sb.Event]) -> None:
        for event in events:
            event.fail("no")

    broker.consumer("g", max_deliveries=1).consume(fail, block=False)

    letters = broker.dead_letters("s", "g")  # more than a read's budget holds: in pages
    assert [letter.event.id for letter in letters] == ids
    assert {letter.event.body for letter in letters} == {b"x" * (900 << 10)}
    assert [letter.event.id for letter in broker.dead_letters("s", "g", limit=5)] == ids[:5]
    assert_drained(server)


def test_an_entry_over_the_limit_read_whole_is_set_aside_too(
    server: Server, open_broker: OpenBroker
) -> None:
    broker = open_broker(registry(server), max_entry_size=LIMIT)
    first = broker.publish("s", "first")
    over = hostile(server, OVER)
    last = broker.publish("s", "last")
    handled: list[str] = []

    broker.consumer("g").consume(lambda events: handled.extend(e.id for e in events), block=False)

    assert handled == [first, last]
    assert dead_letters(server) == {over: reason(OVER + len("$body$codecmsgpack"))}
    assert_drained(server)


def test_a_reclaimed_huge_entry_becomes_a_dead_letter(
    server: Server, open_broker: OpenBroker
) -> None:
    broker = open_broker(registry(server), max_entry_size=LIMIT)
    first = broker.publish("s", "first")
    huge = hostile(server, HUGE)
    last = broker.publish("s", "last")
    # A consumer that crashed holding them (only their ids were taken): nothing is new.
    client = server.client()
    client.xgroup_create("s", "g", "0")  # as the crashed consumer did (publishing creates none)
    client.xgroup_createconsumer("s", "g", "crashed")
    client.xclaim("s", "g", "crashed", 0, [first, huge, last], justid=True, force=True)
    client.xgroup_setid("s", "g", "$")
    handled: list[str] = []

    consumer = broker.consumer("g", "live", retry_after=0.05)
    deadline = time.monotonic() + 30
    while len(handled) < 2 or client.xpending("s", "g")["pending"]:
        if time.monotonic() > deadline:
            pytest.fail(f"the events were not reclaimed: handled {handled}")
        consumer.consume(lambda events: handled.extend(e.id for e in events), block=False)

    assert handled == [first, last]
    assert dead_letters(server) == {huge: reason(HUGE + len("$body$codecmsgpack"))}
    assert_drained(server)


@pytest.mark.parametrize("size", [OVER, HUGE])
def test_read_stops_before_a_huge_entry_and_names_it(
    server: Server, open_broker: OpenBroker, size: int
) -> None:
    broker = open_broker(registry(server), max_entry_size=LIMIT)
    before = [broker.publish("s", "a"), broker.publish("s", "b")]
    huge = hostile(server, size)
    after = broker.publish("s", "c")

    assert [event.id for event in broker.read("s", count=10)] == before
    with pytest.raises(sb.EntryTooLargeError) as caught:
        broker.read("s", after=before[-1], count=10)
    assert (caught.value.stream, caught.value.id) == ("s", huge)
    assert caught.value.size == size + len("$body$codecmsgpack")
    assert str(caught.value) == (
        f"stream s: entry {huge} is {caught.value.size} bytes, more than the max_entry_size "
        f"limit of {LIMIT} bytes, so it was not read (read after {huge} to skip it)"
    )
    assert [event.id for event in broker.read("s", after=huge, count=10)] == [after]


def test_an_event_of_max_body_size_passes_a_limit_of_the_same_size(
    server: Server, open_broker: OpenBroker
) -> None:
    limit = 60_000
    broker = open_broker(registry(server), max_body_size=limit, max_entry_size=limit)
    # A msgpack bin 16 has a 3-byte header; the meta tag takes 2 bytes.
    event_id = broker.publish("s", b"x" * (limit - 5), meta={"a": "b"})
    handled: list[str] = []

    broker.consumer("g").consume(lambda events: handled.extend(e.id for e in events), block=False)

    assert handled == [event_id]
    assert [event.id for event in broker.read("s")] == []  # collected
    assert dead_letters(server) == {}


def test_max_entry_size_is_checked_and_defaults_to_8_mib() -> None:
    config = sb.Registry.from_yaml(YAML.format(address="127.0.0.1:1")).validate()
    assert config.broker()._core.max_entry_size == 8 << 20
    assert config.broker(max_body_size=16 << 20)._core.max_entry_size == 16 << 20
    assert config.async_broker(max_entry_size=2 << 20)._core.max_entry_size == 2 << 20
    for bad in (1000, True, 2.5e6, "8MiB"):
        with pytest.raises(sb.InvalidArgumentError) as caught:
            config.broker(max_entry_size=bad)
        assert str(caught.value) == (
            f"max_entry_size must be a number of bytes of at least max_body_size "
            f"({1 << 20}), got {bad!r}"
        )


def test_entry_size_counts_bytes_and_charges_fields_beyond_an_events() -> None:
    assert entry_size([b"$body", b"xyz", b"$codec", b"json"]) == 18
    assert entry_size([b"k", b"v"] * 1002) == 2004
    assert entry_size([b"k", b"v"] * 1010) == 2020 + 8 * 16


def test_the_server_measures_entries_as_the_client_does(server: Server) -> None:
    client = server.client()
    entries = [
        {"$body": b"x" * 1000, "$codec": b"msgpack"},
        {f"k{i}": "v" for i in range(5000)},  # many tiny fields: charged for beyond 1,002
        {"": b""},
    ]
    ids = [client.xadd("s", entry) for entry in entries]

    # With its text: the server holds none of the broker's scripts yet.
    sizes = client.execute_command(*with_text(range_sizes_command("s", "-", 10)))

    flat = [[word for pair in entry.items() for word in pair] for entry in entries]
    expected = [entry_size([w if isinstance(w, bytes) else w.encode() for w in f]) for f in flat]
    assert sizes == [[event_id, size] for event_id, size in zip(ids, expected, strict=True)]
    assert expected[1] == sum(len(f"k{i}") + 1 for i in range(5000)) + (5000 - 1002) * 16
