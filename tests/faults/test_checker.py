"""The checker on hand-made logs: each kind of problem is reported, and a clean run has none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .checker import (
    ACK,
    FAIL,
    FAILED,
    KILL,
    OK,
    UNKNOWN,
    JsonLog,
    Letter,
    Report,
    check,
    mark_data_loss,
)

STREAMS = {"stream-a": ("read-group-a", "read-group-ab"), "stream-b": ("read-group-ab",)}


class Logs:
    """Writes records as the producer and consumers of the suite would."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.published = JsonLog(directory / "published-p.jsonl")
        self.handled = JsonLog(directory / "handled-c-1.jsonl")
        self.at = 0.0

    def publish(self, token: str, stream: str = "stream-a", outcome: str = OK) -> str:
        self.at += 1.0
        event_id = f"{int(self.at)}-0"
        self.published.write(
            {
                "kind": "publish",
                "token": token,
                "stream": stream,
                "outcome": outcome,
                "id": event_id if outcome == OK else None,
                "at": self.at,
                "error": None,
            }
        )
        return event_id

    def handle(
        self,
        group: str,
        event_id: str,
        token: str | None,
        stream: str = "stream-a",
        delivery: int = 1,
        outcome: str = ACK,
        batch: int = 1,
        consumer: str = "c",
    ) -> None:
        self.handled.write(
            {
                "kind": "handle",
                "group": group,
                "stream": stream,
                "id": event_id,
                "token": token,
                "delivery": delivery,
                "outcome": outcome,
                "batch": batch,
                "consumer": consumer,
                "pid": 1,
            }
        )

    def both(self, event_id: str, token: str) -> None:
        """stream-a's event handled by both of its groups."""
        self.handle("read-group-a", event_id, token)
        self.handle("read-group-ab", event_id, token)

    def check(self, **options: Any) -> Report:
        return check(self.directory, STREAMS, 3, **options)


@pytest.fixture
def logs(tmp_path: Path) -> Logs:
    return Logs(tmp_path)


def test_a_clean_run_has_no_problems(logs: Logs) -> None:
    logs.both(logs.publish("t1"), "t1")
    b = logs.publish("t2", "stream-b")
    logs.handle("read-group-ab", b, "t2", "stream-b", outcome=FAIL)
    logs.handle("read-group-ab", b, "t2", "stream-b", delivery=2)
    logs.publish("t3", outcome=FAILED)
    logs.publish("t4", outcome=UNKNOWN)  # never stored: nobody saw it
    report = logs.check()
    assert report.problems == []
    assert report.handled == {"read-group-a": 1, "read-group-ab": 2}
    assert report.redelivered == 1
    assert report.published == {OK: 2, FAILED: 1, UNKNOWN: 1}
    assert "lost 0" in str(report)


def test_an_event_one_group_never_settled_is_lost(logs: Logs) -> None:
    event_id = logs.publish("t1")
    logs.handle("read-group-a", event_id, "t1")
    logs.handle("read-group-ab", event_id, "t1", outcome=FAIL)  # failed, never again
    report = logs.check()
    assert len(report.lost) == 1
    assert report.lost[0].startswith("token t1 (ok, stream-a 1-0) never settled by read-group-ab")
    assert "[(1, 'fail')]" in report.lost[0]
    assert report.problems == [f"lost: {report.lost[0]}"]


def test_an_unknown_publish_that_was_stored_must_be_handled_by_every_group(logs: Logs) -> None:
    logs.publish("t1", outcome=UNKNOWN)
    logs.publish("t2", outcome=UNKNOWN)
    logs.handle("read-group-a", "5-0", "t1")  # seen by one group: stored
    report = logs.check(stored=[("stream-a", "t2", "6-0")])  # still in the stream
    assert report.stored_unknown == 2
    assert sorted(line.split()[1] for line in report.lost) == ["t1", "t2", "t2"]


def test_a_failed_publish_that_shows_up_is_unexpected(logs: Logs) -> None:
    logs.publish("t1", outcome=FAILED)
    logs.both("5-0", "t1")
    report = logs.check()
    assert report.unexpected == ["token t1: its publish failed (None) but it was stored"]


def test_a_same_delivery_twice_is_an_unjustified_duplicate(logs: Logs) -> None:
    event_id = logs.publish("t1")
    logs.both(event_id, "t1")
    logs.handle("read-group-a", event_id, "t1", consumer="other")  # delivery 1 again
    logs.handle("read-group-ab", event_id, "t1", delivery=2)  # a redelivery: fine
    report = logs.check()
    assert report.duplicates == [
        "read-group-a was given stream-a 1-0 on delivery 1 2 times: c (pid 1), other (pid 1)"
    ]
    assert report.lost == []


def test_events_never_published_or_of_foreign_groups_are_unexpected(logs: Logs) -> None:
    event_id = logs.publish("t1")
    logs.both(event_id, "t1")
    logs.handle("read-group-a", "9-0", "nobody-published-me")
    logs.handle("read-group-a", "9-1", None)  # not a suite event, not written by the test
    b = logs.publish("t2", "stream-b")
    logs.handle("read-group-ab", b, "t2", "stream-b")
    logs.handle("read-group-a", b, "t2", "stream-b")  # read-group-a does not read stream-b
    logs.handle("read-group-ab", "7-0", "t1", "stream-b")  # t1 went to stream-a
    report = logs.check()
    assert len(report.unexpected) == 4
    assert "never published (token nobody-published-me)" in report.unexpected[0]
    assert "never published (token None)" in report.unexpected[1]
    assert "group read-group-a does not read stream-b" in report.unexpected[2]
    assert "token t1 was published to another stream" in report.unexpected[3]
    assert report.lost == []


def test_entries_without_a_token_are_known_by_their_id(logs: Logs) -> None:
    event_id = logs.publish("raw-1")
    for delivery in (1, 2, 3):
        logs.handle("read-group-a", event_id, None, delivery=delivery, outcome=FAIL)
        logs.handle("read-group-ab", event_id, None, delivery=delivery, outcome=FAIL)
    letters = [
        Letter("stream-a", group, event_id, None, 3, "DecodeError: corrupt")
        for group in ("read-group-a", "read-group-ab")
    ]
    report = logs.check(dead_letters=letters)
    assert report.problems == []
    assert report.dead_tokens("read-group-a") == {"raw-1"}


def test_dead_letters_must_be_failed_alone_on_the_last_delivery(logs: Logs) -> None:
    good = logs.publish("good")
    poison = logs.publish("poison")
    killer = logs.publish("killer", "stream-b")
    mate = logs.publish("mate", "stream-b")
    for delivery in (1, 2, 3):
        logs.handle("read-group-a", poison, "poison", delivery=delivery, outcome=FAIL)
        logs.handle("read-group-ab", poison, "poison", delivery=delivery, outcome=FAIL)
    logs.both(good, "good")
    # The process died on delivery 3 with a batch-mate: the mate is not justified.
    for delivery in (1, 2, 3):
        for token, event_id in (("killer", killer), ("mate", mate)):
            logs.handle(
                "read-group-ab", event_id, token, "stream-b", delivery, outcome=KILL, batch=2
            )
    letters = [
        Letter("stream-a", "read-group-a", poison, "poison", 3, "PoisonError: poison"),
        Letter("stream-a", "read-group-ab", poison, "poison", 3, "PoisonError: poison"),
        Letter("stream-a", "read-group-ab", poison, "poison", 3, "PoisonError: poison"),
        Letter("stream-a", "read-group-a", good, "good", 3, "?"),  # acked: not justified
        Letter("stream-b", "read-group-ab", killer, "killer", 4, "stopped"),
        Letter("stream-b", "read-group-ab", mate, "mate", 3, "stopped"),
    ]
    report = logs.check(dead_letters=letters)
    assert len(report.unjustified) == 5, report.unjustified
    good_line, killer_count, killer_alone, mate_alone, twice = report.unjustified
    assert "'s dead letter stream-a 1-0 (token good): the handler was not given it" in good_line
    assert "[(1, 'ack', 1)]" in good_line
    assert "records 4 deliveries, max_deliveries is 3" in killer_count
    assert "(token killer): the handler was not given it alone" in killer_alone
    assert "(token mate): the handler was not given it alone" in mate_alone
    assert twice == "read-group-ab dead-lettered token poison 2 times"
    assert len(report.crowded) == 2  # killer and mate, delivery 3 in a batch of 2
    assert "in a batch of 2" in report.crowded[0]
    assert report.lost == []
    assert report.dead_tokens("read-group-ab") == {"poison", "killer", "mate"}


def test_a_data_loss_mark_excuses_what_was_published_before_it(logs: Logs) -> None:
    logs.publish("before")
    mark_data_loss(logs.directory)
    logs.at = 1e12  # after the mark, whatever the clock said
    after = logs.publish("after")
    logs.both(after, "after")
    report = logs.check()
    assert report.problems == []
    assert report.excused == 2  # "before", for each of stream-a's groups
    (logs.directory / "marks.jsonl").unlink()
    assert len(check(logs.directory, STREAMS, 3).lost) == 2


def test_crashes_are_problems_and_a_cut_line_is_skipped(logs: Logs) -> None:
    crash = {"kind": "crash", "consumer": "c", "pid": 7, "error": "ServerReplyError: boom"}
    JsonLog(logs.directory / "crashed-c-7.jsonl").write(crash, crash)
    JsonLog(logs.directory / "crashed-c-8.jsonl").write({**crash, "pid": 8})
    with (logs.directory / "handled-c-2.jsonl").open("a") as cut:
        cut.write('{"kind": "handle", "group": "read-gr')  # killed in the middle of a line
    report = logs.check()
    assert report.problems == [
        "consumer crash: consumer c (pid 7, 8, 3 times): ServerReplyError: boom"
    ]
