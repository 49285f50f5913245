"""The command-line tool's operator commands and its finish, against real servers: tail
from a point in time, publish from a pipe that stays open, group reset and delete, one
dead letter, purge, and help, versions, usage errors and counts as they should read."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer

import streambroker as sb
from streambroker.apps.cli import app, event_time

from .conftest import Server, wait_for
from .test_cli import CLI, cli_env, client, invoke, output, project, run, started, stop_cleanly

pytestmark = pytest.mark.anywhere

__all__ = ["client", "project"]


def lines_of(text: str) -> list[str]:
    return text.splitlines()


def ask(*args: str, input: str) -> tuple[int, str, str]:
    """Run the tool as a process in the working directory, answering its question."""
    result = run([*CLI, *args], Path.cwd(), input=input)
    return result.returncode, result.stdout, result.stderr


# -- help, version, usage errors ------------------------------------------------------


def command_paths(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():
        paths += command_paths(sub, (*path, name))
    return paths


def test_every_command_has_short_help_without_bool_metavars() -> None:
    paths = command_paths(typer.main.get_command(app))
    assert {("group", "reset"), ("group", "delete"), ("purge",), ("server", "stop")} <= set(paths)
    for path in paths:
        code, short, err = invoke(*path, "-h")
        assert (code, err) == (0, ""), (path, err)
        assert short.startswith("Usage: "), short
        assert f" {' '.join(path)} ".replace("  ", " ") in short.splitlines()[0], short
        assert invoke(*path, "--help")[1] == short
        assert "<bool>" not in short, short
        assert "╭" not in short, short
    assert "--json  " in invoke("tail", "-h")[1]


def test_version() -> None:
    code, out, err = invoke("--version")
    assert (code, out, err) == (0, f"streambroker {version('streambroker')}\n", "")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["demo", "--events", "0"], "'--events'"),
        (["tail", "stream-a", "--nope"], "--nope"),
        (["tail"], "Missing argument 'stream' (see streambroker tail -h)"),
        (["no-such-command"], "'no-such-command'"),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], named: str) -> None:
    result = subprocess.run(
        [*CLI, *args], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (2, "")
    (line,) = result.stderr.splitlines()
    assert line.startswith("streambroker: error: "), line
    assert named in line, line
    assert "Traceback" not in result.stderr


def test_counts_read_in_the_right_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "streambroker.yaml").write_text(
        "default:\n  redis: 127.0.0.1:6379:0\n  streams:\n    s: [g]\n"
    )
    code, out, err = invoke("validate")
    assert (code, err) == (0, ""), err
    assert out.splitlines()[0] == "streambroker.yaml: valid: 1 pool, 1 stream, 1 consumer group"


# -- tail -----------------------------------------------------------------------------


def test_tail_from_the_start_an_id_or_an_age_with_the_time_of_each(
    project: Path, server: Server, client: sb.Broker
) -> None:
    redis_client = server.client()
    redis_client.xadd("stream-a", {"$body": '"old"', "$codec": "json"}, id="1000-0")
    ids = [client.publish("stream-a", n) for n in range(3)]

    code, out, err = invoke("tail", "stream-a", "--from", "0", "--count", "4")

    assert code == 0, err
    assert lines_of(out)[0] == 'stream-a 1000-0 1970-01-01T00:00:01.000Z "old"'
    assert lines_of(out)[1:] == [f"stream-a {i} {event_time(i)} {n}" for n, i in enumerate(ids)]
    assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event_time(ids[0]))
    for start, count, expected in [
        (ids[1], 2, ids[1:]),  # the event of the id is the first
        ("1000", 1, ["1000-0"]),
        ("1h", 3, ids),  # the old one is older than that
        ("2.5d", 3, ids),
    ]:
        code, out, err = invoke("tail", "stream-a", "--from", start, "--count", str(count))
        assert code == 0, err
        assert [line.split()[1] for line in lines_of(out)] == expected, start

    code, out, err = invoke("tail", "stream-a", "--from", "yesterday")
    assert (code, out) == (2, "")
    assert "'yesterday' is not 0, an event id or an age such as 30s, 5m, 2h" in err
    code, out, err = invoke("tail", "stream-a", "--from", "0", "-g", "read-group-a")
    assert code == 2
    assert "--from and -n read without --group" in err


def test_tail_prints_the_last_events_then_follows(project: Path, client: sb.Broker) -> None:
    ids = [client.publish("stream-a", n) for n in range(5)]
    with started([*CLI, "tail", "stream-a", "-n", "2", "--json"], project) as process:
        wait_for(lambda: output(project)[0].count("\n") >= 2, 30, "the last two events")
        ids.append(client.publish("stream-a", "new"))
        wait_for(lambda: output(project)[0].count("\n") >= 3, 30, "the new event")
        stop_cleanly(process, signal.SIGINT)
    records = [json.loads(line) for line in lines_of(output(project)[0])]
    assert [(r["id"], r["body"]) for r in records] == [(ids[3], 3), (ids[4], 4), (ids[5], "new")]
    assert records[0]["time"] == event_time(ids[3])


def test_tail_with_group_leaves_what_it_cannot_decode_pending(
    project: Path, server: Server, client: sb.Broker
) -> None:
    bad = server.client().xadd("stream-a", {"$body": b"\xff", "$codec": "json"}).decode()
    good = client.publish("stream-a", "good")

    code, out, err = invoke("tail", "stream-a", "-g", "read-group-a", "--name", "t", "--count", "2")

    assert code == 0, err
    assert [line.split()[1] for line in lines_of(out)] == [bad, good]
    assert "<cannot decode: " in lines_of(out)[0]
    assert (
        f"event {bad} of stream-a cannot be decoded: not acknowledged, it stays pending in "
        "group read-group-a"
    ) in lines_of(err)
    group = client.group_stats("stream-a", "read-group-a")
    assert (group.pending, group.lowest_pending_id) == (1, bad)
    assert [(c.name, c.pending) for c in group.consumers] == [("t", 1)]


# -- publish --------------------------------------------------------------------------


def test_publish_sends_lines_of_a_pipe_while_it_stays_open(
    project: Path, client: sb.Broker
) -> None:
    with open(project / "out.txt", "w") as out, open(project / "err.txt", "w") as err:
        process = subprocess.Popen(
            [*CLI, "publish", "stream-a"],
            cwd=project,
            env=cli_env(),
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            text=True,
        )
    assert process.stdin is not None
    try:
        process.stdin.write("one\ntwo\n")
        process.stdin.flush()
        wait_for(lambda: output(project)[0].count("\n") == 2, 30, "the first two ids")
        assert [e.body for e in client.read("stream-a")] == ["one", "two"]
        process.stdin.write("three\n")
        process.stdin.flush()
        wait_for(lambda: output(project)[0].count("\n") == 3, 30, "the third id")
        process.stdin.close()
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    printed, errors = output(project)
    assert errors == ""
    assert printed.split() == [e.id for e in client.read("stream-a")]
    assert [e.body for e in client.read("stream-a")] == ["one", "two", "three"]


# -- group reset and delete -----------------------------------------------------------


def _crash(events: list[sb.Event]) -> None:
    raise RuntimeError("crash")


def test_group_reset_refuses_while_events_are_pending_unless_forced(
    project: Path, client: sb.Broker
) -> None:
    ids = [client.publish("stream-a", n) for n in range(3)]
    with pytest.raises(RuntimeError):
        client.consumer("read-group-a", "c1").consume(_crash, block=False)

    code, out, err = invoke("group", "reset", "stream-a", "read-group-a", "--to", "0")

    assert (code, out) == (1, "")
    assert err == (
        "streambroker: error: consumer group 'read-group-a' of stream 'stream-a': 1 consumer "
        "(c1) holds 3 pending events: stop them and let them settle, or reset anyway with "
        "--force (the pending events stay pending)\n"
    )
    code, out, err = invoke("group", "reset", "stream-a", "read-group-a", "--to", "0", "--force")
    assert (code, err) == (0, ""), err
    assert out == "group read-group-a of stream-a now reads every event of the stream\n"
    group = client.group_stats("stream-a", "read-group-a")
    assert (group.lag, group.pending) == (3, 3)

    client.consumer("read-group-a", "c1").consume(lambda events: None, block=False)
    code, out, err = invoke("group", "reset", "stream-a", "read-group-a", "--to", ids[0])
    assert out == f"group read-group-a of stream-a now reads the events after {ids[0]}\n", err
    assert client.group_stats("stream-a", "read-group-a").lag == 2
    code, out, err = invoke("group", "reset", "stream-a", "read-group-a", "--to", "$")
    assert out == "group read-group-a of stream-a now reads only the events published from now\n"
    assert client.group_stats("stream-a", "read-group-a").lag == 0
    code, out, err = invoke("group", "reset", "stream-c", "read-group-a", "--to", "0")
    assert (code, err) == (
        1,
        "streambroker: error: consumer group 'read-group-a' does not read stream 'stream-c'\n",
    )


def test_group_delete_asks_first_and_keeps_registered_groups(
    project: Path, server: Server, client: sb.Broker
) -> None:
    redis_client = server.client()
    client.publish("stream-a", "x")
    for group in ("read-group-a", "read-group-ab"):  # as their first consumers would
        redis_client.xgroup_create("stream-a", group, "0")
    redis_client.xgroup_create("stream-a", "old-group", "0")

    def groups() -> list[bytes]:
        return sorted(g["name"] for g in redis_client.xinfo_groups("stream-a"))

    code, out, err = ask("group", "delete", "stream-a", "old-group", input="n\n")
    assert (code, out) == (1, "")
    assert err.startswith(
        "Delete consumer group old-group of stream stream-a, with its pending events and dead "
        "letters? [y/N] "
    ), err
    assert err.endswith("streambroker: nothing changed\n"), err
    assert b"old-group" in groups()

    code, out, err = ask("group", "delete", "stream-a", "old-group", input="y\n")
    assert code == 0, err
    assert out == "deleted consumer group old-group of stream-a\n"
    assert groups() == [b"read-group-a", b"read-group-ab"]

    code, out, err = invoke("group", "delete", "stream-a", "old-group", "--yes")
    assert (code, err) == (1, "streambroker: error: stream 'stream-a' has no consumer group "
                               "'old-group'\n")  # fmt: skip
    code, out, err = invoke("group", "delete", "stream-a", "read-group-a", "-y")
    assert code == 1
    assert err.startswith(
        "streambroker: error: consumer group 'read-group-a' is registered for stream 'stream-a'"
    ), err
    assert groups() == [b"read-group-a", b"read-group-ab"]


# -- dead letters, purge, claim -------------------------------------------------------


def test_dead_letters_replay_or_delete_one(project: Path, client: sb.Broker) -> None:
    ids = [client.publish("stream-a", n) for n in range(3)]

    def reject(events: list[sb.Event]) -> None:
        for event in events:
            event.fail("rejected")

    client.consumer("read-group-a", max_deliveries=1).consume(reject, block=False)
    letters = json.loads(invoke("dead-letters", "stream-a", "read-group-a", "--json")[1])

    # By the event id the table shows, or by the dead letter's own id.
    code, out, err = invoke("dead-letters", "stream-a", "read-group-a", "--replay", ids[1])
    assert (code, err) == (0, ""), err
    assert out == f"replayed dead letter {ids[1]} of stream-a in group read-group-a\n"
    code, out, err = invoke(
        "dead-letters", "stream-a", "read-group-a", "--delete", letters[0]["id"]
    )
    assert (code, err) == (0, ""), err
    assert out == f"deleted dead letter {letters[0]['id']} of stream-a in group read-group-a\n"

    left = json.loads(invoke("dead-letters", "stream-a", "read-group-a", "--json")[1])
    assert [letter["event_id"] for letter in left] == [ids[2]]
    again: list[object] = []
    client.consumer("read-group-a").consume(
        lambda events: again.extend(e.body for e in events), block=False
    )
    assert again == [1]
    code, out, err = invoke("dead-letters", "stream-a", "read-group-a", "--delete", ids[1])
    assert (code, err) == (
        1,
        f"streambroker: error: stream 'stream-a', group 'read-group-a': no dead letter "
        f"'{ids[1]}' (replayed or deleted already?)\n",
    )
    code, out, err = invoke("dead-letters", "stream-a", "read-group-a", "--replay", "all")
    assert out == "replayed 1 dead letter of stream-a to group read-group-a\n"
    code, _, err = invoke(
        "dead-letters", "stream-a", "read-group-a", "--replay", "1", "--delete", "1"
    )
    assert code == 2
    assert "give --replay or --delete, not both" in err


def test_purge_asks_first_then_deletes_every_event(project: Path, client: sb.Broker) -> None:
    for n in range(3):
        client.publish("stream-a", n)

    code, out, err = ask("purge", "stream-a", input="n\n")
    assert (code, out) == (1, "")
    assert err.startswith("Delete every event of stream stream-a (3 events)? [y/N] "), err
    assert client.stream_stats("stream-a").length == 3

    code, out, err = ask("purge", "stream-a", input="y\n")
    assert (code, out) == (0, "deleted 3 events of stream-a\n"), err
    assert client.stream_stats("stream-a").length == 0
    assert client.stream_stats("stream-a").groups[0].group == "read-group-a"
    client.publish("stream-a", "one")
    assert invoke("purge", "stream-a", "--yes")[1] == "deleted 1 event of stream-a\n"


def test_claim_names_a_missing_or_same_source_and_counts_right(
    project: Path, client: sb.Broker
) -> None:
    client.publish("stream-a", 1)
    with pytest.raises(RuntimeError):
        client.consumer("read-group-a", "c1").consume(_crash, block=False)

    code, out, err = invoke("claim", "read-group-a", "c1", "c1")
    assert (code, out) == (2, "")
    assert "consumer 'c1' cannot claim from itself: name two consumers" in err
    code, out, err = invoke("claim", "read-group-a", "ghost", "c2")
    assert (code, out, err) == (
        1,
        "",
        "streambroker: error: consumer group 'read-group-a' has no consumer 'ghost' (its "
        "consumers: c1)\n",
    )
    code, out, err = invoke("claim", "read-group-a", "c1", "c2")
    assert (code, out, err) == (
        0,
        "moved 1 pending event of group read-group-a from c1 to c2\n",
        "",
    )


# -- stats ----------------------------------------------------------------------------


def test_stats_on_a_narrow_terminal_cuts_nothing_short(project: Path) -> None:
    """The table is as wide as its figures and names need, whatever the terminal's
    width: its lines wrap there, but no name or figure ends in an ellipsis."""
    result = run([*CLI, "stats"], project, COLUMNS="40")
    assert (result.returncode, result.stderr) == (0, "")
    assert "read-group-ab (not created yet)" in result.stdout
    assert "…" not in result.stdout


def test_stats_watch_shows_a_header_and_rates(project: Path, client: sb.Broker) -> None:
    def rows(name: str) -> list[list[str]]:
        return [line.split() for line in lines_of(output(project)[0]) if line.split()[:1] == [name]]

    def rate_seen(name: str) -> bool:
        return any(row[-1] not in ("-", "0.0") and float(row[-1]) > 0 for row in rows(name))

    # Their first consumers create the groups, and the stream, before the watch starts.
    consumers = {group: client.consumer(group) for group in ("read-group-a", "read-group-ab")}
    for consumer in consumers.values():
        consumer.consume(lambda events: None, block=False)
    with started([*CLI, "stats", "stream-a", "--watch", "--interval", "0.2"], project) as process:
        wait_for(lambda: len(rows("stream-a")) >= 2, 30, "two tables")
        for n in range(20):
            client.publish("stream-a", n)
        wait_for(lambda: rate_seen("stream-a"), 30, "a publishing rate")
        consumers["read-group-a"].consume(lambda events: None, block=False)
        wait_for(lambda: rate_seen("read-group-a"), 30, "an acknowledging rate")
        stop_cleanly(process, signal.SIGINT)
    out, err = output(project)
    assert err == ""
    assert re.search(
        r"^\d\d:\d\d:\d\d, every 0.2 s; per s: events published \(streams\) and acknowledged "
        r"\(groups\) per second since the previous refresh$",
        out,
        re.M,
    ), out
    assert re.search(r"dead +idle +alive +per s *$", out, re.M), out
    assert all(row[-1] == "-" for row in rows("read-group-ab")[:1]), out
