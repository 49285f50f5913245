"""Entries the broker did not write (raw redis-py) among the events of a steady producer:
consumers never crash on them, and a handler that fails them gets them dead-lettered."""

from __future__ import annotations

import time

import msgspec
import pytest

from ..conftest import Server
from .checker import OK, JsonLog
from .conftest import BUDGET, MakeScenario, scaled
from .streams import GROUPS, STREAMS

pytestmark = pytest.mark.timeout(BUDGET + 60)

TEXT = msgspec.msgpack.encode("not a token")
#: Each kind of foreign entry: its fields, and how the handler's error begins.
MALFORMED: dict[str, tuple[dict[str | bytes, str | bytes], str]] = {
    "no-body": ({"origin": "another program"}, "ValueError: not an event of the suite"),
    "body-without-codec": (
        {"$body": TEXT},
        "DecodeError: stream {stream}, event {id}: the entry has a $body field but no $codec",
    ),
    "unknown-codec": (
        {"$body": b"\x28\xb5\x2f\xfd", "$codec": "zstd"},
        "DecodeError: stream {stream}, event {id}: unknown codec 'zstd'",
    ),
    "corrupt-msgpack": (
        {"$body": b"\xc1\xc1\xc1", "$codec": "msgpack"},
        "DecodeError: stream {stream}, event {id}: cannot decode the msgpack body",
    ),
    "corrupt-json": (
        {"$body": b"{not json", "$codec": "json"},
        "DecodeError: stream {stream}, event {id}: cannot decode the json body",
    ),
    "non-utf8-meta": (
        {"tag": b"\xff\xfe", "$body": TEXT, "$codec": "msgpack"},
        "DecodeError: stream {stream}, event {id}: a meta field is not UTF-8 text",
    ),
    "non-utf8-field-name": (
        {b"\xff\xfe": "value", "$body": TEXT, "$codec": "msgpack"},
        "DecodeError: stream {stream}, event {id}: a meta field is not UTF-8 text",
    ),
    "thousands-of-fields": (
        {f"field-{i}": "value" for i in range(5000)},
        "ValueError: not an event of the suite",
    ),
}


@pytest.mark.redis8
def test_malformed_entries_become_dead_letters_and_never_crash_a_consumer(
    server: Server, make_scenario: MakeScenario
) -> None:
    scenario = make_scenario(server, max_deliveries=3)
    for group in GROUPS:
        for i in (1, 2):
            scenario.spawn(group, f"{group}-{i}")
    producer = scenario.produce(rate=200)
    raw = server.client()
    log = JsonLog(scenario.logs / "published-raw.jsonl")
    written: dict[str, tuple[str, str, str]] = {}  # token: (stream, id, error)
    pause = scaled(1.5) / (len(STREAMS) * len(MALFORMED))
    for stream in STREAMS:
        for kind, (fields, error) in MALFORMED.items():
            scenario.run_for(pause)
            at = time.monotonic()
            event_id = raw.xadd(stream, fields).decode()  # type: ignore[arg-type,union-attr]
            token = f"raw-{stream}-{kind}"
            log.write(
                {
                    "kind": "publish",
                    "token": token,
                    "stream": stream,
                    "outcome": OK,
                    "id": event_id,
                    "at": at,
                    "error": None,
                }
            )
            written[token] = (stream, event_id, error.format(stream=stream, id=event_id))
    log.close()
    raw.close()
    scenario.run_for(0.5)
    report = scenario.finish()
    assert producer.counts[OK] > 0
    for group in GROUPS:
        expected = {t for t, (stream, _, _) in written.items() if group in STREAMS[stream]}
        assert report.dead_tokens(group) == expected
        for letter in report.dead[group]:
            assert letter.token is not None
            assert letter.deliveries == 3
            assert letter.error.startswith(written[letter.token][2]), letter.error
