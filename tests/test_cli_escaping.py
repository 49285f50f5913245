"""What the command-line tool prints of the servers' data cannot drive the terminal.

Hostile strings are written straight to the server (meta tags, bodies, group and consumer
names, dead letter errors, codecs); ``tail``, ``stats`` and ``dead-letters`` must show them
escaped, as text (Rich markup in them printed as it is), and their ``--json`` must still
give them back exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

import streambroker as sb
from streambroker.apps.cli import app, error_lines

from .conftest import Server
from .test_cli import client, project

__all__ = ["client", "project"]

#: A window title, a bell, a screen clear, a forged line, a C1 CSI, DEL, markup, a bidi override.
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\r\nFORGED\u009b31m\x7f[bold]b[/bold]\u202ex"
#: How :data:`HOSTILE` must look once printed.
SHOWN = "\\u001b]0;PWNED\\u0007\\u001b[2J\\r\\nFORGED\\u009b31m\\u007f[bold]b[/bold]\\u202ex"
#: What must never reach the terminal raw (a newline only between the lines of the output).
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def invoke(*args: str) -> tuple[int, str, str]:
    """Run the tool in this process, as wide as no cell is folded."""
    env = {"STREAMBROKER_CONFIG": None, "COLUMNS": "1000"}
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_inert(text: str) -> None:
    """No control character in ``text`` but its newlines, and no line of it forged."""
    assert not RAW.search(text), ascii(text)
    assert not any(line.lstrip().startswith("FORGED") for line in text.splitlines()), text


def test_tail_escapes_meta_bodies_ids_and_decode_errors(project: Path, server: Server) -> None:
    redis_client = server.client()
    redis_client.xgroup_create("stream-a", "read-group-a", "0", mkstream=True)
    body = json.dumps({HOSTILE: [HOSTILE]})
    redis_client.xadd("stream-a", {"$body": body, "$codec": "json", HOSTILE: HOSTILE})
    redis_client.xadd("stream-a", {"$body": "1", "$codec": HOSTILE})

    code, out, err = invoke("tail", "stream-a", "-g", "read-group-a", "--name", "t", "--count", "2")

    # The line saying tail started, and the one saying the undecodable event stays pending.
    assert (code, err.count("\n")) == (0, 2), err
    assert_inert(out)
    decoded, undecodable = out.splitlines()
    assert decoded.endswith(f'{SHOWN}={SHOWN} {{"{SHOWN}": ["{SHOWN}"]}}'), decoded
    assert undecodable.split(" ", 3)[3].startswith("<cannot decode: "), undecodable
    assert "unknown codec" in undecodable

    redis_client.xadd("stream-a", {"$body": body, "$codec": "json", HOSTILE: HOSTILE})
    code, out, err = invoke("tail", "stream-a", "-g", "read-group-a", "--count", "1", "--json")

    assert code == 0, err
    assert_inert(out)
    record = json.loads(out)
    assert (record["meta"], record["body"]) == ({HOSTILE: HOSTILE}, {HOSTILE: [HOSTILE]})


def test_stats_escapes_group_and_consumer_names(project: Path, server: Server) -> None:
    redis_client = server.client()
    redis_client.xgroup_create("stream-a", "read-group-a", "0", mkstream=True)
    redis_client.xgroup_createconsumer("stream-a", "read-group-a", HOSTILE)
    redis_client.xgroup_create("stream-a", f"orphan {HOSTILE}", "0")

    code, out, err = invoke("stats", "stream-a")

    assert (code, err) == (0, ""), err
    assert_inert(out)
    assert f"    {SHOWN} " in out, out
    assert f"  orphan {SHOWN} (not registered)" in out, out

    code, out, err = invoke("stats", "stream-a", "--json")

    assert (code, err) == (0, ""), err
    assert_inert(out)
    (stream,) = json.loads(out)
    (group,) = [g for g in stream["groups"] if g["group"] == "read-group-a"]
    assert [consumer["name"] for consumer in group["consumers"]] == [HOSTILE]
    assert stream["orphan_groups"] == [f"orphan {HOSTILE}"]


def test_dead_letters_escape_errors_meta_and_bodies(project: Path, client: sb.Broker) -> None:
    event_id = client.publish("stream-a", {"text": HOSTILE}, {"tag": HOSTILE})

    def reject(events: list[sb.Event]) -> None:
        for event in events:
            event.fail(HOSTILE)

    client.consumer("read-group-a", max_deliveries=1).consume(reject, block=False)

    code, out, err = invoke("dead-letters", "stream-a", "read-group-a")

    assert (code, err) == (0, ""), err
    assert_inert(out)
    (row,) = [line for line in out.splitlines() if line.lstrip().startswith(event_id)]
    assert f"RuntimeError: {SHOWN}" in row, row
    assert f'tag={SHOWN} {{"text": "{SHOWN}"}}' in row, row

    code, out, err = invoke("dead-letters", "stream-a", "read-group-a", "--json")

    assert (code, err) == (0, ""), err
    assert_inert(out)
    (letter,) = json.loads(out)
    assert (letter["error"], letter["meta"], letter["body"]) == (
        f"RuntimeError: {HOSTILE}",
        {"tag": HOSTILE},
        {"text": HOSTILE},
    )


def test_error_messages_are_escaped_line_by_line() -> None:
    # A server's reply or a handler's exception can carry anything into an error message;
    # its lines stay lines (indented), each escaped.
    assert error_lines(sb.BrokerError(f"bad {HOSTILE}")) == [
        "streambroker: error: bad \\u001b]0;PWNED\\u0007\\u001b[2J",
        "  FORGED\\u009b31m\\u007f[bold]b[/bold]\\u202ex",
    ]


def test_claim_and_group_reset_errors_escape_consumer_names(
    project: Path, client: sb.Broker, server: Server
) -> None:
    client.publish("stream-a", 1)
    redis_client = server.client()
    redis_client.xgroup_create("stream-a", "read-group-a", "0")  # publishing creates none
    redis_client.xreadgroup("read-group-a", HOSTILE, {"stream-a": ">"})

    code, out, err = invoke("claim", "read-group-a", "ghost", "c2")

    assert (code, out) == (1, "")
    assert_inert(err.removesuffix("\n"))
    assert f"(its consumers: {SHOWN})" in err, err

    code, out, err = invoke("group", "reset", "stream-a", "read-group-a", "--to", "0")

    assert (code, out) == (1, "")
    assert_inert(err.removesuffix("\n"))
    assert f"1 consumer ({SHOWN}) holds 1 pending event: " in err, err
