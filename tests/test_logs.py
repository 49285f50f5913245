"""``streambroker worker --log-format json``: one JSON object per line, with the broker's
fields, from a real worker process on the real servers."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import streambroker as sb
from streambroker.logs import JsonFormatter

from .conftest import Server, wait_for
from .test_cli import CLI, FAST, client, output, project, started, stop_cleanly

__all__ = ["client", "project"]  # fixtures of the command-line tests, used here too

APP = """\
import streambroker as sb

broker = sb.Registry.from_yaml("streambroker.yaml").validate().broker()


@broker.handler("read-group-c", max_deliveries=1, **{fast!r})
def handle(events):
    for event in events:
        if event.body == "poison":
            raise ValueError("cannot handle " + event.id)
"""


def test_a_worker_logs_json_lines_with_the_brokers_fields(
    project: Path, server: Server, client: sb.Broker
) -> None:
    (project / "app.py").write_text(APP.format(fast=FAST))
    poison = client.publish("stream-c", "poison")
    with started([*CLI, "worker", "app:broker", "--log-format", "json"], project) as process:
        wait_for(lambda: "dead letters" in output(project)[1], 30, "the dead letter")
        stop_cleanly(process, signal.SIGTERM)
    lines = [json.loads(line) for line in output(project)[1].splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert all(line["time"].endswith("+00:00") for line in lines)
    started_line = next(line for line in lines if line["message"].startswith("worker started"))
    assert (started_line["level"], started_line["logger"]) == ("info", "streambroker.worker")
    failed = next(line for line in lines if "the handler raised ValueError" in line["message"])
    assert failed["group"] == "read-group-c"
    assert failed["consumer"].endswith("-1")
    assert f"ValueError: cannot handle {poison}" in failed["error"]
    dead = next(line for line in lines if "moving it to the dead letters" in line["message"])
    assert (dead["group"], dead["stream"], dead["ids"]) == ("read-group-c", "stream-c", [poison])
    assert dead["consumer"] == failed["consumer"]


def test_an_unknown_log_format_is_a_usage_error(project: Path) -> None:
    (project / "app.py").write_text(APP.format(fast=FAST))
    with started([*CLI, "worker", "app:broker", "--log-format", "xml"], project) as process:
        assert process.wait(timeout=30) == 2
    assert "'xml' is not text or json" in output(project)[1]


def test_the_formatter_keeps_what_a_record_carries() -> None:
    record = logging.LogRecord("streambroker", logging.WARNING, "f", 1, "a %s", ("b",), None)
    record.group, record.ids = "g", ["1-0"]
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "a b"
    assert (line["group"], line["ids"], line["level"]) == ("g", ["1-0"], "warning")
    assert "consumer" not in line
