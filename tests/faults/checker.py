"""The fault suite's checker: logs of what was published and handled, and their verdict.

Every event the suite publishes carries a unique token in its body (``{"t": token}``).
Producers log each publish with its outcome; consumers log each event their handler
is given, in the handler, before it returns. Logs are JSON lines appended to files
of one directory (``O_APPEND``, one ``write`` per batch of lines), so a process killed
with SIGKILL loses nothing it wrote. :func:`check` reads them all, with the dead
letters, and returns a :class:`Report`.

Records (``kind``):

- ``publish``: ``token``, ``stream``, ``outcome`` (``ok`` with the ``id``, ``failed``:
  refused, not stored; ``unknown``: the connection failed, it may be stored), ``at``
  (``time.monotonic()`` when the publish began: the clock all processes of a machine
  share) and ``error``;
- ``handle``: ``group``, ``stream``, ``id``, ``token`` (None for an entry that is not an
  event of the suite: it is known by its stream and id), ``delivery`` (the event's
  ``delivery_count``), ``outcome`` (``ack``: the handler returned with it unfailed;
  ``fail``: it called ``event.fail()``; ``raise``: the handler raised; ``kill``: the
  handler killed its own process), ``batch`` (the batch's size), ``consumer``, ``pid``;
- ``crash``: a consumer's ``consume()`` raised something unforeseen, or its process
  exited on its own (``consumer``, ``pid``, ``error``);
- ``data-loss``: the server lost its data at ``at`` (restarted without persistence):
  events published before may be lost by the server, not by the library.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

OK, FAILED, UNKNOWN = "ok", "failed", "unknown"
ACK, FAIL, RAISE, KILL = "ack", "fail", "raise", "kill"
#: How many items of each kind of problem a report shows.
SHOWN = 15


class JsonLog:
    """A file of JSON lines, appended to with one ``write`` per call: what a call
    wrote survives the process being killed right after."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, *records: Mapping[str, Any]) -> None:
        """Append ``records``, one line each."""
        if records:
            os.write(self._fd, "".join(json.dumps(r) + "\n" for r in records).encode())

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


def mark_data_loss(directory: Path) -> None:
    """Record that the server lost its data now (restarted without persistence)."""
    log = JsonLog(directory / "marks.jsonl")
    log.write({"kind": "data-loss", "at": time.monotonic()})
    log.close()


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every record of every log in ``directory`` (a line cut short is skipped)."""
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


@dataclass(frozen=True)
class Letter:
    """One dead letter as the checker sees it: ``token`` None when its body has none
    (the report then gives the token the publish log knows the entry by)."""

    stream: str
    group: str
    id: str
    token: str | None
    deliveries: int
    error: str


@dataclass
class Report:
    """What the logs and the dead letters say; :attr:`problems` lists what is wrong."""

    published: Counter[str] = field(default_factory=Counter)
    stored_unknown: int = 0
    handled: dict[str, int] = field(default_factory=dict)
    records: int = 0
    redelivered: int = 0
    lost: list[str] = field(default_factory=list)
    excused: int = 0
    unexpected: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    unjustified: list[str] = field(default_factory=list)
    crowded: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    dead: dict[str, list[Letter]] = field(default_factory=dict)
    #: The stream of each event published ``ok``, by token.
    published_to: dict[str, str] = field(default_factory=dict)

    def _kinds(self) -> tuple[tuple[str, list[Any]], ...]:
        return (
            ("lost", self.lost),
            ("unexpected", self.unexpected),
            ("unjustified duplicate", self.duplicates),
            ("unjustified dead letter", self.unjustified),
            ("last delivery not alone", self.crowded),
            ("consumer crash", self.crashes),
        )

    @property
    def problems(self) -> list[str]:
        """Every problem, one line each; empty when the run held its promises."""
        return [f"{name}: {item}" for name, items in self._kinds() for item in items]

    def dead_tokens(self, group: str) -> set[str | None]:
        """The tokens of ``group``'s dead letters."""
        return {letter.token for letter in self.dead.get(group, [])}

    def __str__(self) -> str:
        p = self.published
        lines = [
            f"published {sum(p.values())}: ok {p[OK]}, failed {p[FAILED]}, unknown {p[UNKNOWN]} "
            f"({self.stored_unknown} of them stored)",
            "handled (distinct events): "
            + (", ".join(f"{g} {n}" for g, n in sorted(self.handled.items())) or "none")
            + f"; {self.records} handlings, {self.redelivered} of them redeliveries",
            "dead letters: "
            + (", ".join(f"{g} {len(ls)}" for g, ls in sorted(self.dead.items())) or "none"),
            f"lost {len(self.lost)} ({self.excused} more lost by the server, excused), "
            f"unexpected {len(self.unexpected)}, unjustified duplicates {len(self.duplicates)}, "
            f"unjustified dead letters {len(self.unjustified)}, last deliveries not alone "
            f"{len(self.crowded)}, consumer crashes {len(self.crashes)}",
        ]
        for group, letters in sorted(self.dead.items()):
            for letter in letters[:SHOWN]:
                lines.append(
                    f"  dead letter of {group}: {letter.stream} {letter.id} token {letter.token} "
                    f"after {letter.deliveries} deliveries: {letter.error[:200]}"
                )
        for name, items in self._kinds():
            for item in items[:SHOWN]:
                lines.append(f"  {name}: {item}")
            if len(items) > SHOWN:
                lines.append(f"  ... and {len(items) - SHOWN} more {name}")
        return "\n".join(lines)


def check(
    directory: Path,
    streams: Mapping[str, Sequence[str]],
    max_deliveries: int,
    dead_letters: Iterable[Letter] = (),
    stored: Iterable[tuple[str, str | None, str]] = (),
) -> Report:
    """The verdict on the logs of ``directory``.

    ``streams`` maps each stream to the groups that read it; ``dead_letters`` are every
    group's dead letters; ``stored`` lists (stream, token, id) of what the streams hold
    now. Reported:

    - lost: an event published ``ok``, or ``unknown`` but seen (handled, dead-lettered or
      stored), that a group reading its stream never handled (``ack``) nor
      dead-lettered; unless it was published before a ``data-loss`` mark;
    - unexpected: a handling or dead letter of an event never published (nor refused:
      a ``failed`` publish that shows up is unexpected too), of another stream than it
      was published to, or by a group that does not read the stream;
    - unjustified duplicates: one (group, stream, id, delivery count) handled twice;
    - unjustified dead letters: one not recording ``max_deliveries`` deliveries, or whose
      event the group's handler was not given alone on delivery ``max_deliveries`` and
      failed on (failed, raised or died), or dead-lettered twice by one group;
    - last deliveries not alone: an event given on delivery ``max_deliveries`` or later in
      a batch of more than one;
    - consumer crashes.
    """
    verdict = _Verdict(streams, max_deliveries)
    verdict.read(read_records(directory))
    verdict.handlings()
    verdict.letters(dead_letters)
    for stream, token, event_id in stored:
        known = verdict.token_of(stream, token, event_id)
        if known is not None:
            verdict.seen.add(known)
    verdict.settlements()
    return verdict.report


class _Verdict:
    """The evidence :func:`check` gathers, kind by kind, into its report."""

    def __init__(self, streams: Mapping[str, Sequence[str]], max_deliveries: int) -> None:
        self.streams = streams
        self.max_deliveries = max_deliveries
        self.report = Report()
        self.publishes: dict[str, dict[str, Any]] = {}  # by token
        self.by_id: dict[tuple[str, str], str] = {}  # (stream, id): token
        self.handles: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.seen: set[str] = set()  # tokens known to be stored
        self.settled: set[tuple[str, str]] = set()  # (group, token): acked or dead
        self.given: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)

    def token_of(self, stream: str, token: str | None, event_id: str) -> str | None:
        """The token of an event, by its id when it carries none."""
        return token if token is not None else self.by_id.get((stream, event_id))

    def read(self, records: Iterable[dict[str, Any]]) -> None:
        report = self.report
        crashes: dict[tuple[str, str], list[object]] = defaultdict(list)
        for record in records:
            kind = record.get("kind")
            if kind == "publish":
                token = str(record["token"])
                if token in self.publishes:
                    report.unexpected.append(f"token {token} published twice")
                self.publishes[token] = record
                report.published[record["outcome"]] += 1
                if record["outcome"] == OK:
                    self.by_id[(record["stream"], record["id"])] = token
                    report.published_to[token] = record["stream"]
            elif kind == "handle":
                self.handles.append(record)
            elif kind == "crash":
                error = str(record.get("error"))[:300]
                crashes[(str(record.get("consumer")), error)].append(record.get("pid"))
            elif kind == "data-loss":
                self.losses.append(float(record["at"]))
        for (consumer, error), pids in crashes.items():
            times = f", {len(pids)} times" if len(pids) > 1 else ""
            pid = ", ".join(map(str, sorted(set(map(str, pids)))))
            report.crashes.append(f"consumer {consumer} (pid {pid}{times}): {error}")

    def handlings(self) -> None:
        report = self.report
        deliveries: dict[tuple[str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
        distinct: dict[str, set[str]] = defaultdict(set)
        for record in self.handles:
            report.records += 1
            group, stream, event_id = record["group"], record["stream"], record["id"]
            delivery = int(record["delivery"])
            where = (
                f"{group} handled {stream} {event_id} (delivery {delivery}, {record['consumer']})"
            )
            if delivery > 1:
                report.redelivered += 1
            deliveries[(group, stream, event_id, delivery)].append(record)
            if group not in self.streams.get(stream, ()):
                report.unexpected.append(f"{where}: group {group} does not read {stream}")
            token = self.token_of(stream, record.get("token"), event_id)
            published = self.publishes.get(token) if token is not None else None
            if token is None or published is None:
                report.unexpected.append(f"{where}: never published (token {record.get('token')})")
                continue
            if published["stream"] != stream:
                report.unexpected.append(f"{where}: token {token} was published to another stream")
                continue
            self.seen.add(token)
            distinct[group].add(token)
            self.given[(group, token)].append(record)
            if record["outcome"] == ACK:
                self.settled.add((group, token))
            if delivery >= self.max_deliveries and int(record["batch"]) > 1:
                report.crowded.append(f"{where}: in a batch of {record['batch']}")
        report.handled = {group: len(tokens) for group, tokens in distinct.items()}
        for (group, stream, event_id, delivery), same in deliveries.items():
            if len(same) > 1:
                who = ", ".join(f"{r['consumer']} (pid {r['pid']})" for r in same)
                report.duplicates.append(
                    f"{group} was given {stream} {event_id} on delivery {delivery} "
                    f"{len(same)} times: {who}"
                )

    def letters(self, letters: Iterable[Letter]) -> None:
        report = self.report
        limit = self.max_deliveries
        times: Counter[tuple[str, str]] = Counter()
        for letter in letters:
            token = self.token_of(letter.stream, letter.token, letter.id)
            report.dead.setdefault(letter.group, []).append(replace(letter, token=token))
            where = f"{letter.group}'s dead letter {letter.stream} {letter.id}"
            published = self.publishes.get(token) if token is not None else None
            if token is None or published is None or published["stream"] != letter.stream:
                report.unexpected.append(f"{where}: never published to {letter.stream}")
                continue
            if letter.group not in self.streams.get(letter.stream, ()):
                report.unexpected.append(f"{where}: group does not read {letter.stream}")
                continue
            where = f"{where} (token {token})"
            self.seen.add(token)
            self.settled.add((letter.group, token))
            times[(letter.group, token)] += 1
            if letter.deliveries != limit:
                report.unjustified.append(
                    f"{where}: records {letter.deliveries} deliveries, max_deliveries is {limit}"
                )
            given = self.given.get((letter.group, token), [])
            if not any(
                int(r["delivery"]) == limit and r["outcome"] != ACK and int(r["batch"]) == 1
                for r in given
            ):
                history = [(r["delivery"], r["outcome"], r["batch"]) for r in given]
                report.unjustified.append(
                    f"{where}: the handler was not given it alone on delivery {limit} and "
                    f"failed on it; (delivery, outcome, batch) given: {history}"
                )
        for (group, token), count in times.items():
            if count > 1:
                report.unjustified.append(f"{group} dead-lettered token {token} {count} times")

    def settlements(self) -> None:
        report = self.report
        for token, record in self.publishes.items():
            outcome = record["outcome"]
            if outcome == FAILED:
                if token in self.seen:
                    report.unexpected.append(
                        f"token {token}: its publish failed ({record.get('error')}) but it was "
                        "stored"
                    )
                continue
            if outcome == UNKNOWN:
                if token not in self.seen:
                    continue
                report.stored_unknown += 1
            for group in self.streams.get(record["stream"], ()):
                if (group, token) in self.settled:
                    continue
                if any(at > record["at"] for at in self.losses):
                    report.excused += 1
                    continue
                given = [(r["delivery"], r["outcome"]) for r in self.given.get((group, token), [])]
                report.lost.append(
                    f"token {token} ({outcome}, {record['stream']} {record.get('id', '?')}) never "
                    f"settled by {group}; (delivery, outcome) given: {given}"
                )
