"""The wire format and the body codecs, on real servers.

Events are published with a broker and read back with a consumer, and the raw
stream entries are inspected (or written, as another program would) with a plain
redis-py client.
"""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streambroker as sb

from .conftest import OpenBroker, Server


@dataclass
class Order:
    id: int
    item: str
    prices: list[float]


class Point(msgspec.Struct):
    x: int
    y: int


class User(pydantic.BaseModel):
    name: str
    tags: list[str]


def consume(broker: sb.Broker, group: str = "read-group-a", count: int = 100) -> list[sb.Event]:
    """Every event the group has now (non-blocking), in order."""
    events: list[sb.Event] = []
    broker.consumer(group).consume(events.extend, count=count, block=False)
    return events


def raw_entries(server: Server, stream: str = "stream-a") -> list[tuple[bytes, dict[bytes, bytes]]]:
    client = server.client()
    try:
        return list(client.xrange(stream))
    finally:
        client.close()


def xlen(server: Server, stream: str = "stream-a") -> int:
    client = server.client()
    try:
        return int(client.xlen(stream))
    finally:
        client.close()


def pending(server: Server, stream: str = "stream-a", group: str = "read-group-a") -> int:
    client = server.client()
    try:
        return int(client.xpending(stream, group)["pending"])
    finally:
        client.close()


# --- round trips --------------------------------------------------------------------

BUILTIN_BODIES: list[Any] = [
    "hello, wörld",
    {"n": 1, "nested": {"list": [1, 2.5, "x"], "none": None}},
    [1, "two", 3.0, None, True],
    42,
    -7,
    3.25,
    b"\x00\xffraw bytes",
    "",
    True,
]


def test_builtin_bodies_round_trip(broker: sb.Broker) -> None:
    ids = [
        broker.publish("stream-a", body, meta={"i": str(i)})
        for i, body in enumerate(BUILTIN_BODIES)
    ]

    events = consume(broker)

    assert [event.id for event in events] == ids
    assert [event.body for event in events] == BUILTIN_BODIES
    for i, event in enumerate(events):
        assert event.stream == "stream-a"
        assert event.meta == {"i": str(i)}
        assert event.tag("i") == str(i)
        assert event.tag("missing") == ""
        assert event.codec == "msgpack"


def test_none_body_with_and_without_meta(broker: sb.Broker, server: Server) -> None:
    with_meta = broker.publish("stream-a", None, meta={"kind": "ping"})
    without_meta = broker.publish("stream-a")

    events = consume(broker)

    assert [event.id for event in events] == [with_meta, without_meta]
    first, second = events
    assert first.body is None
    assert first.meta == {"kind": "ping"}
    assert first.raw_body is None
    assert first.codec is None
    assert second.body is None
    assert second.meta == {}
    assert second.tag("kind") == ""
    # On the wire: meta only (no $ fields) versus the codec's null.
    fields = dict(raw_entries(server))
    assert fields[with_meta.encode()] == {b"kind": b"ping"}
    assert fields[without_meta.encode()] == {b"$body": b"\xc0", b"$codec": b"msgpack"}


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_typed_bodies_decode_into_their_types(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, codec: str
) -> None:
    order = Order(7, "book", [1.5, 2.25])
    point = Point(x=3, y=-4)
    user = User(name="ada", tags=["admin", "ops"])
    with open_broker(config, codec=codec) as broker:
        broker.publish("stream-a", order, meta={"type": "order"})
        broker.publish("stream-a", point, meta={"type": "point"})
        broker.publish("stream-a", user, meta={"type": "user"})

        events = consume(broker)

    assert [event.tag("type") for event in events] == ["order", "point", "user"]
    assert all(event.codec == codec for event in events)
    order_event, point_event, user_event = events
    # Untyped, every one reads as a plain mapping.
    assert order_event.body == {"id": 7, "item": "book", "prices": [1.5, 2.25]}
    assert point_event.body == {"x": 3, "y": -4}
    assert user_event.body == {"name": "ada", "tags": ["admin", "ops"]}
    decoded_order = order_event.decode(Order)
    decoded_point = point_event.decode(Point)
    decoded_user = user_event.decode(User)
    assert isinstance(decoded_order, Order)
    assert decoded_order == order
    assert isinstance(decoded_point, Point)
    assert decoded_point == point
    assert isinstance(decoded_user, User)
    assert decoded_user == user
    # A typed body decodes into a compatible type too.
    assert order_event.decode(dict[str, Any]) == order_event.body


def test_raw_entry_holds_meta_body_and_codec(broker: sb.Broker, server: Server) -> None:
    body = {"price": 9.5, "items": ["a", "b"]}
    event_id = broker.publish("stream-a", body, meta={"source": "shop", "region": "eu"})

    ((raw_id, fields),) = raw_entries(server)

    assert raw_id.decode() == event_id
    assert set(fields) == {b"source", b"region", b"$body", b"$codec"}
    assert fields[b"source"] == b"shop"
    assert fields[b"region"] == b"eu"
    assert fields[b"$codec"] == b"msgpack"
    assert msgspec.msgpack.decode(fields[b"$body"]) == body


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_entries_of_every_body_size_are_plain_whether_published_alone_or_in_a_batch(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, server: Server, codec: str
) -> None:
    """The packed ``XADD`` of a body of any size (around the sizes whose length line is
    made once, and past them) is what any client reads back, with or without meta."""
    sizes = [0, 1, 1000, 1017, 1018, 1019, 1020, 1021, 1022, 5000]
    bodies: list[Any] = ["é" * (size // 2) + "x" * (size % 2) for size in sizes]
    with open_broker(config, codec=codec) as broker:
        alone = [broker.publish("stream-a", body) for body in bodies]
        with broker.batch() as batch:
            for body in bodies:
                batch.publish("stream-a", body)
            batch.publish("stream-a", "tagged", meta={"k": "v"})
        entries = raw_entries(server)
        events = consume(broker)
    assert [i.decode() for i, _ in entries] == alone + batch.ids
    encode = msgspec.json.encode if codec == "json" else msgspec.msgpack.encode
    expected = [{b"$body": encode(body), b"$codec": codec.encode()} for body in bodies * 2]
    expected.append({b"k": b"v", b"$body": encode("tagged"), b"$codec": codec.encode()})
    assert [fields for _, fields in entries] == expected
    assert [event.body for event in events] == [*bodies, *bodies, "tagged"]


def test_a_batch_refuses_an_unregistered_or_unhashable_stream(broker: sb.Broker) -> None:
    batch = broker.batch()
    for stream in ("no-such-stream", ["not", "a", "name"]):
        with pytest.raises(sb.UnknownStreamError):
            batch.publish(stream, 1)  # type: ignore[arg-type]
    assert len(batch) == 0


def test_json_codec_writes_json(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, server: Server
) -> None:
    body = {"price": 9.5, "items": ["a", "b"], "ok": True, "none": None}
    with open_broker(config, codec="json") as broker:
        event_id = broker.publish("stream-a", body, meta={"source": "shop"})
        (event,) = consume(broker)

    ((raw_id, fields),) = raw_entries(server)
    assert raw_id.decode() == event_id
    assert fields[b"$codec"] == b"json"
    assert fields[b"source"] == b"shop"
    assert json.loads(fields[b"$body"]) == body
    assert event.codec == "json"
    assert event.body == body


def test_one_consumer_decodes_mixed_codecs(
    open_broker: OpenBroker, config: sb.ValidatedRegistry
) -> None:
    with open_broker(config, codec="json") as json_broker, open_broker(config) as msgpack_broker:
        keys = [
            ("stream-a", msgpack_broker.publish("stream-a", {"n": 1})),
            ("stream-a", json_broker.publish("stream-a", {"n": 2})),
            ("stream-b", msgpack_broker.publish("stream-b", [3])),
            ("stream-b", json_broker.publish("stream-b", "four")),
        ]
        events = consume(msgpack_broker, "read-group-ab")

    # Ids are per stream: two streams may hold the same id.
    by_key = {(event.stream, event.id): event for event in events}
    assert sorted(by_key) == sorted(keys)
    assert len(events) == 4
    assert [by_key[key].body for key in keys] == [{"n": 1}, {"n": 2}, [3], "four"]
    assert [by_key[key].codec for key in keys] == ["msgpack", "json", "msgpack", "json"]


# --- errors when publishing -----------------------------------------------------------


def test_error_classes_are_broker_errors() -> None:
    for error in (
        sb.EncodeError,
        sb.DecodeError,
        sb.PayloadTooLargeError,
        sb.InvalidArgumentError,
        sb.UnknownStreamError,
    ):
        assert issubclass(error, sb.BrokerError)


@pytest.mark.parametrize(
    ("codec", "body"),
    [
        ("msgpack", object()),
        ("json", object()),
        ("msgpack", {"nested": [1, object()]}),
        ("json", {(1, 2): "tuple keys are not JSON"}),
        ("msgpack", 2**64),
        ("msgpack", "lone surrogate \udc80"),
        ("json", float("nan")),
        ("json", {"prices": [1.0, float("inf")]}),
        ("json", Order(1, "x", [float("-inf")])),
    ],
    ids=[
        "msgpack-object",
        "json-object",
        "msgpack-nested",
        "json-tuple-key",
        "big-int",
        "surrogate",
        "json-nan",
        "json-inf-nested",
        "json-inf-dataclass",
    ],
)
def test_unencodable_body_raises_and_writes_nothing(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, server: Server, codec: str, body: Any
) -> None:
    with open_broker(config, codec=codec) as broker:
        broker.publish("stream-a", "before")
        with pytest.raises(sb.EncodeError, match="stream-a") as caught:
            broker.publish("stream-a", body)
        assert isinstance(caught.value, sb.BrokerError)
        assert xlen(server) == 1
        # A batch refuses the event when it is queued; the block then sends nothing.

        def publish_batch() -> None:
            with broker.batch() as batch:
                batch.publish("stream-a", "queued")
                batch.publish("stream-a", body)

        with pytest.raises(sb.EncodeError, match="stream-a"):
            publish_batch()
        assert xlen(server) == 1
        assert [event.body for event in consume(broker)] == ["before"]


def test_body_over_max_body_size_raises_and_writes_nothing(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, server: Server
) -> None:
    with open_broker(config, max_body_size=100) as broker:
        # msgpack bin 8: two header bytes, then the data.
        fits = broker.publish("stream-a", b"x" * 98)
        with pytest.raises(sb.PayloadTooLargeError, match="stream-a") as caught:
            broker.publish("stream-a", b"x" * 99)
        assert isinstance(caught.value, sb.BrokerError)
        with pytest.raises(sb.PayloadTooLargeError):
            broker.publish("stream-a", {"text": "y" * 500})
        # The limit is on the whole entry: meta names and values count with the body.
        with pytest.raises(sb.PayloadTooLargeError, match="meta tags alone are 503 bytes"):
            broker.publish("stream-a", 1, meta={"big": "z" * 500})
        with_meta = broker.publish("stream-a", b"x" * 48, meta={"big": "z" * 47})
        assert xlen(server) == 2
        events = consume(broker)
    assert [event.id for event in events] == [fits, with_meta]
    assert events[0].body == b"x" * 98


@pytest.mark.parametrize(
    "meta",
    [
        {"count": 1},
        {"flag": None},
        {"raw": b"bytes"},
        {"$body": "reserved"},
        {"$anything": "reserved"},
        {"": "empty key"},
        {1: "not a str key"},
        {"bad": "lone surrogate \udc80"},
        {"lone surrogate \udc80": "bad key"},
        [("key", "value")],
    ],
)
def test_bad_meta_raises_encode_error(broker: sb.Broker, server: Server, meta: Any) -> None:
    broker.publish("stream-a", "before")
    with pytest.raises(sb.EncodeError, match="stream-a"):
        broker.publish("stream-a", "body", meta=meta)
    with pytest.raises(sb.EncodeError, match="stream-a"):
        broker.publish("stream-a", None, meta=meta)
    assert xlen(server) == 1


@pytest.mark.parametrize("codec", ["pickle", "MSGPACK", "", None])
def test_unknown_codec_is_refused(config: sb.ValidatedRegistry, codec: Any) -> None:
    with pytest.raises(sb.InvalidArgumentError, match="unknown codec"):
        config.broker(codec=codec)


def test_unregistered_stream_is_refused(broker: sb.Broker, server: Server) -> None:
    with pytest.raises(sb.UnknownStreamError, match="no-such-stream") as caught:
        broker.publish("no-such-stream", {"n": 1})
    assert caught.value.stream == "no-such-stream"
    assert isinstance(caught.value, sb.BrokerError)
    client = server.client()
    try:
        assert client.exists("no-such-stream") == 0
    finally:
        client.close()


# --- entries written by other programs --------------------------------------------------


def test_foreign_entries_do_not_stop_the_consumer(broker: sb.Broker, server: Server) -> None:
    good = broker.publish("stream-a", {"n": 1})
    client = server.client()
    try:
        garbage = client.xadd("stream-a", {"$body": b"\xc1\xc1\xc1", "$codec": "msgpack"})
        unknown_codec = client.xadd("stream-a", {"$body": b"<x/>", "$codec": "xml"})
        no_codec = client.xadd("stream-a", {"$body": b"\xa3abc"})
        bad_meta = client.xadd(
            "stream-a", {b"k\xff": b"v", "$body": b"\xa2ok", "$codec": "msgpack"}
        )
        bad_meta_value = client.xadd("stream-a", {"k": b"\xfe\xff"})
        plain = client.xadd("stream-a", {"from": "other-program", "n": "3"})
    finally:
        client.close()
    last = broker.publish("stream-a", "last")
    raw_ids = [garbage, unknown_codec, no_codec, bad_meta, bad_meta_value, plain]
    foreign = [raw.decode() for raw in raw_ids]

    seen: list[sb.Event] = []
    body_errors: dict[str, sb.DecodeError] = {}
    meta_errors: dict[str, sb.DecodeError] = {}

    def handler(events: list[sb.Event]) -> None:
        for event in events:
            seen.append(event)
            try:
                _ = event.body
            except sb.DecodeError as exc:
                body_errors[event.id] = exc
            try:
                _ = event.meta
            except sb.DecodeError as exc:
                meta_errors[event.id] = exc

    handled = broker.consumer("read-group-a").consume(handler, count=3, block=False)

    assert handled == 8
    assert [event.id for event in seen] == [good, *foreign, last]
    assert set(body_errors) == set(foreign[:3])
    assert set(meta_errors) == set(foreign[3:5])
    for event_id, exc in (body_errors | meta_errors).items():
        assert "stream-a" in str(exc)
        assert event_id in str(exc)
        assert isinstance(exc, sb.BrokerError)
    assert "xml" in str(body_errors[foreign[1]])
    assert "$codec" in str(body_errors[foreign[2]])
    by_id = {event.id: event for event in seen}
    assert by_id[good].body == {"n": 1}
    assert by_id[last].body == "last"
    # The body of the entry with non-UTF-8 meta is still readable; its tags are not.
    assert by_id[foreign[3]].body == "ok"
    with pytest.raises(sb.DecodeError):
        by_id[foreign[3]].tag("k")
    # An entry without $ fields is a meta-only event.
    assert by_id[foreign[5]].body is None
    assert by_id[foreign[5]].meta == {"from": "other-program", "n": "3"}
    # Everything was acknowledged: nothing is delivered again.
    assert pending(server) == 0
    assert consume(broker) == []


def test_decode_into_a_wrong_type_raises_decode_error(broker: sb.Broker) -> None:
    text_id = broker.publish("stream-a", "just text")
    broker.publish("stream-a", {"id": "not an int", "item": "x", "prices": []})
    broker.publish("stream-a", {"name": "ada"})
    broker.publish("stream-a", None, meta={"only": "meta"})

    text, bad_order, partial_user, meta_only = consume(broker)

    for into in (int, Order, Point, User, list[int], int | None):
        with pytest.raises(sb.DecodeError, match=f"stream-a, event {text_id}"):
            text.decode(into)
    with pytest.raises(sb.DecodeError, match="Order"):
        bad_order.decode(Order)
    with pytest.raises(sb.DecodeError, match="User"):
        partial_user.decode(User)
    with pytest.raises(sb.DecodeError, match="no body"):
        meta_only.decode(Order)
    # The untyped body is still there.
    assert text.body == "just text"
    assert partial_user.body == {"name": "ada"}


# --- properties ---------------------------------------------------------------------

MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=20,
)

META = st.dictionaries(
    st.text(min_size=1).filter(lambda key: not key.startswith("$")), st.text(), max_size=5
)

FIXTURE_SETTINGS = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50, deadline=None
)


@FIXTURE_SETTINGS
@given(body=MSGPACK_VALUES)
def test_any_msgpack_value_round_trips(broker: sb.Broker, body: Any) -> None:
    event_id = broker.publish("stream-a", body)

    (event,) = consume(broker, count=10)

    assert event.id == event_id
    assert event.body == body


@FIXTURE_SETTINGS
@given(meta=META, body=st.none() | st.integers(min_value=-(2**63), max_value=2**63))
def test_any_meta_round_trips(broker: sb.Broker, meta: dict[str, str], body: int | None) -> None:
    event_id = broker.publish("stream-b", body, meta=meta)

    (event,) = consume(broker, "read-group-ab", count=10)

    assert event.id == event_id
    assert event.meta == meta
    assert event.body == body


# --- what each codec changes, and what typed decoding restores ------------------------


@dataclass
class Everything:
    raw: bytes
    when: datetime.datetime
    naive: datetime.datetime
    day: datetime.date
    uid: uuid.UUID
    amount: decimal.Decimal
    pair: tuple[int, int]
    unique: set[int]
    by_number: dict[int, str]


class EverythingStruct(msgspec.Struct):
    raw: bytes
    when: datetime.datetime
    naive: datetime.datetime
    day: datetime.date
    uid: uuid.UUID
    amount: decimal.Decimal
    pair: tuple[int, int]
    unique: set[int]
    by_number: dict[int, str]


class EverythingModel(pydantic.BaseModel):
    raw: bytes
    when: datetime.datetime
    naive: datetime.datetime
    day: datetime.date
    uid: uuid.UUID
    amount: decimal.Decimal
    pair: tuple[int, int]
    unique: set[int]
    by_number: dict[int, str]


EVERYTHING = {
    "raw": b"\x00\xff",
    "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    "naive": datetime.datetime(2026, 1, 2, 3, 4, 5),
    "day": datetime.date(2026, 1, 2),
    "uid": uuid.UUID(int=1),
    "amount": decimal.Decimal("1.10"),
    "pair": (1, 2),
    "unique": {1, 2},
    "by_number": {1: "one"},
}

#: What decoding without a type gives, per codec (the README's table says the same).
UNTYPED = {
    "msgpack": {
        "raw": b"\x00\xff",
        "when": EVERYTHING["when"],
        "naive": "2026-01-02T03:04:05",
        "day": "2026-01-02",
        "uid": "00000000-0000-0000-0000-000000000001",
        "amount": "1.10",
        "pair": [1, 2],
        "unique": [1, 2],
        "by_number": {1: "one"},
    },
    "json": {
        "raw": "AP8=",
        "when": "2026-01-02T03:04:05Z",
        "naive": "2026-01-02T03:04:05",
        "day": "2026-01-02",
        "uid": "00000000-0000-0000-0000-000000000001",
        "amount": "1.10",
        "pair": [1, 2],
        "unique": [1, 2],
        "by_number": {"1": "one"},
    },
}


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_typed_decoding_restores_what_the_type_says(
    open_broker: OpenBroker, config: sb.ValidatedRegistry, codec: str
) -> None:
    kinds: list[type[Any]] = [Everything, EverythingStruct, EverythingModel]
    with open_broker(config, codec=codec) as broker:
        for kind in kinds:
            fields = dict(EVERYTHING)
            if kind is EverythingModel and codec == "json":
                fields["raw"] = b"text"  # pydantic's JSON form holds bytes as UTF-8 text
            broker.publish("stream-a", kind(**fields))
        events = consume(broker)
    assert len(events) == len(kinds)
    for kind, event in zip(kinds, events, strict=True):
        decoded = event.decode(kind)
        assert isinstance(decoded, kind)
        expected = dict(EVERYTHING)
        if kind is EverythingModel and codec == "json":
            expected["raw"] = b"text"
        assert {name: getattr(decoded, name) for name in EVERYTHING} == expected
    assert events[0].body == UNTYPED[codec]


def test_a_pydantic_model_with_binary_bytes_is_refused_by_json_only(
    open_broker: OpenBroker, config: sb.ValidatedRegistry
) -> None:
    with open_broker(config, codec="json") as broker, pytest.raises(sb.EncodeError, match="utf-8"):
        broker.publish("stream-a", EverythingModel(**EVERYTHING))
