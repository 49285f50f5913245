"""The ``streambroker`` command-line tool, driven as a user would against real servers.

Commands that must be seen from outside (exit codes, signals, stderr, the console
script) run as real processes in a temp dir; the others through Typer's CliRunner.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

import streambroker as sb
from streambroker.apps.cli import app, event_time

from .conftest import SEED_YAML_TEMPLATE, Server, free_port, wait_for

CLI = [sys.executable, "-m", "streambroker"]
SCRIPT = Path(sys.executable).with_name("streambroker")
DEFAULT_DIR = ".streambroker"
ROW = re.compile(r"(read-group-[a-z]+)[^\w-]+(stream-[a-z])[^\w-]+(\d+)[^\w-]+(\d+)")
FAST = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.1, "retry_delay": 0.01}

CONFIG = SEED_YAML_TEMPLATE


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBROKER")}
    return {**env, "COLUMNS": "80", "PYTHONUNBUFFERED": "1", **extra}


def run(
    command: list[str], cwd: Path, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env=cli_env(**env),
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def started(command: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """A process whose stdout and stderr go to files in ``cwd`` (read them with
    :func:`output`); killed when the block ends, if it still runs."""
    with open(cwd / "out.txt", "w") as out, open(cwd / "err.txt", "w") as err:
        process = subprocess.Popen(
            command, cwd=cwd, env=cli_env(), stdout=out, stderr=err, text=True
        )
    try:
        yield process
    finally:
        process.kill()


def stop_cleanly(process: subprocess.Popen[str], signum: int) -> None:
    """Send ``signum`` and check the process then exits with 0."""
    process.send_signal(signum)
    assert process.wait(timeout=30) == 0


def output(cwd: Path) -> tuple[str, str]:
    return (cwd / "out.txt").read_text(), (cwd / "err.txt").read_text()


def invoke(*args: str, input: str | None = None) -> tuple[int, str, str]:
    """Run the tool in this process; returns exit code, stdout and stderr."""
    env = {"STREAMBROKER_CONFIG": None, "COLUMNS": "80"}
    result = CliRunner().invoke(app, list(args), input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def write_config(
    directory: Path, default: str, second: str, name: str = "streambroker.yaml"
) -> Path:
    path = directory / name
    path.write_text(CONFIG.format(default=default, second=second))
    return path


@pytest.fixture
def project(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory, holding ``streambroker.yaml``: the seed's registry on
    ``server``."""
    write_config(tmp_path, server.pool_address(0), server.pool_address(3))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def client(config: sb.ValidatedRegistry) -> Iterator[sb.Broker]:
    """A synchronous broker of the same registry, to publish and look."""
    with config.broker() as broker:
        yield broker


def lengths(broker: sb.Broker) -> dict[str, int]:
    return {stream.stream: stream.length for stream in broker.stats()}


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """An empty working directory; the server of its default data dir is stopped after."""
    yield tmp_path
    server = sb.EmbeddedServer(tmp_path / DEFAULT_DIR)
    if server.is_running():
        server.stop()


def test_demo_runs_without_configuration_then_server_commands(workdir: Path) -> None:
    assert SCRIPT.exists(), "the console script is installed next to the interpreter"
    assert list(workdir.iterdir()) == []

    demo = run([str(SCRIPT), "demo", "--events", "50"], workdir)

    assert demo.returncode == 0, demo.stderr
    assert demo.stderr == ""
    rows = {(group, stream): (int(p), int(h)) for group, stream, p, h in ROW.findall(demo.stdout)}
    assert rows == {
        ("read-group-a", "stream-a"): (50, 50),
        ("read-group-ab", "stream-a"): (50, 50),
        ("read-group-ab", "stream-b"): (50, 50),
        ("read-group-c", "stream-c"): (50, 50),
    }, demo.stdout
    # The consumers removed every event as the last group acknowledged it.
    left = dict(re.findall(r"^(stream-[a-z]): (\d+) events left$", demo.stdout, re.M))
    assert left == {"stream-a": "0", "stream-b": "0", "stream-c": "0"}, demo.stdout
    # The statistics table: each stream empty, each group settled, its consumers gone.
    assert re.search(r"^ ?stream-a \(default\) +0 +- *$", demo.stdout, re.M), demo.stdout
    assert re.search(r"^ ?stream-c \(second\) +0 +- *$", demo.stdout, re.M), demo.stdout
    groups = re.findall(r"^ +(read-group-\S+) +0 +0 +0 *$", demo.stdout, re.M)
    assert groups == ["read-group-a", "read-group-ab", "read-group-ab", "read-group-c"], demo.stdout
    assert not re.search(r"^ +\S+-[12] ", demo.stdout, re.M), demo.stdout
    # The embedded server runs in ./.streambroker and keeps running.
    data_dir = workdir / DEFAULT_DIR
    server = sb.EmbeddedServer(data_dir)
    assert server.is_running()

    status = run([*CLI, "server", "status"], workdir)
    assert status.returncode == 0, status.stderr
    here = server.data_dir
    assert status.stdout.strip() == f"{here}: running on unix socket {server.socket_path}"

    stop = run([*CLI, "server", "stop"], workdir)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == f"{here}: stopped"
    assert not server.is_running()

    status = run([*CLI, "server", "status"], workdir)
    assert status.returncode == 3
    assert status.stdout.strip() == f"{here}: not running"

    stop = run([*CLI, "server", "stop"], workdir)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == f"{here}: not running"


def test_demo_runs_afresh_each_time(workdir: Path) -> None:
    for _ in range(2):
        demo = run([*CLI, "demo", "--events", "3"], workdir)
        assert demo.returncode == 0, demo.stderr
        rows = ROW.findall(demo.stdout)
        assert len(rows) == 4, demo.stdout
        assert all((p, h) == ("3", "3") for _, _, p, h in rows), demo.stdout


def test_server_start_and_stop_with_data_dir(workdir: Path) -> None:
    # Rich markup in a path is printed as it is, and on one line though longer than
    # the 80 columns.
    data_dir = workdir / "[b]x[/]"
    server = sb.EmbeddedServer(data_dir)
    try:
        start = run([*CLI, "server", "start", "--data-dir", str(data_dir)], workdir)
        assert start.returncode == 0, start.stderr
        running = f"on unix socket {server.socket_path}\n"
        assert start.stdout == f"{server.data_dir}: started {running}"
        assert len(start.stdout) > 80
        assert server.socket_path == str(data_dir / "valkey.sock")
        assert server.is_running()

        again = run([*CLI, "server", "start", "--data-dir", str(data_dir)], workdir)
        assert again.returncode == 0, again.stderr
        assert again.stdout == f"{server.data_dir}: already running {running}"

        status = run([*CLI, "server", "status", "--data-dir", str(data_dir)], workdir)
        assert status.returncode == 0, status.stderr
        assert status.stdout == f"{server.data_dir}: running {running}"
        # The default data dir is another one, not running.
        assert run([*CLI, "server", "status"], workdir).returncode == 3
    finally:
        if server.is_running():
            server.stop()


def test_server_commands_act_on_the_configurations_embedded_pools(workdir: Path) -> None:
    first, second = workdir / "first", workdir / "second"
    config = workdir / "streambroker.yaml"
    config.write_text(
        f"default:\n  redis: embedded:{first}\n  streams:\n    s: [g]\n"
        f"other:\n  redis: embedded:{second}\n  db: 2\n"
        f"again:\n  redis: embedded:{first}\n  db: 1\n"
        "remote:\n  redis: 127.0.0.1:1\n"
    )
    servers = [sb.EmbeddedServer(first), sb.EmbeddedServer(second)]
    try:
        servers[0].start()
        start = run([*CLI, "server", "start"], workdir)  # ./streambroker.yaml
        assert start.returncode == 0, start.stderr
        assert start.stdout.splitlines() == [
            f"{servers[0].data_dir}: already running on unix socket {servers[0].socket_path}",
            f"{servers[1].data_dir}: started on unix socket {servers[1].socket_path}",
        ]
        assert all(server.is_running() for server in servers)
        stop = run([*CLI, "server", "stop", "--config", str(config)], workdir)
        assert stop.stdout.splitlines() == [f"{s.data_dir}: stopped" for s in servers]
        status = run([*CLI, "--config", str(config), "server", "status"], workdir)
        assert status.returncode == 3
        assert status.stdout.splitlines() == [f"{s.data_dir}: not running" for s in servers]
        remote = workdir / "remote.yaml"
        remote.write_text("default:\n  redis: 127.0.0.1:1\n")
        refused = run([*CLI, "server", "start", "--config", str(remote)], workdir)
        assert refused.returncode == 1
        assert refused.stderr.strip().endswith("remote.yaml: no pool uses the embedded server")
    finally:
        for server in servers:
            if server.is_running():
                server.stop()


@pytest.mark.parametrize("problem", ["under-a-file", "server-fails"])
def test_broker_error_is_one_line_on_stderr(workdir: Path, problem: str) -> None:
    if problem == "under-a-file":
        a_file = workdir / "a-file"
        a_file.write_text("x")
        data_dir = a_file / "data"
    else:
        # The server starts, then exits: it finds a file where its AOF directory goes.
        data_dir = workdir / "data"
        data_dir.mkdir()
        (data_dir / "appendonlydir").write_text("x")

    result = run([*CLI, "server", "start", "--data-dir", str(data_dir)], workdir)

    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streambroker: error: ")
    assert str(data_dir) in lines[0]
    assert "Traceback" not in result.stderr


def test_demo_broker_error_is_one_line_on_stderr(workdir: Path) -> None:
    a_file = workdir / "a-file"
    a_file.write_text("x")

    result = run([str(SCRIPT), "demo", "--events", "1", "--data-dir", str(a_file)], workdir)

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streambroker: error: ")
    assert str(a_file) in lines[0]


def test_usage_errors_exit_2(workdir: Path) -> None:
    result = run([*CLI, "demo", "--events", "0"], workdir)
    assert result.returncode == 2
    assert "--events" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / DEFAULT_DIR).exists()


# -- validate -------------------------------------------------------------------------


def test_validate_lists_the_registry_and_masks_passwords(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "127.0.0.1:6379:0", "redis://user:s3cret@127.0.0.1:6380/3")
    other = write_config(tmp_path, "127.0.0.1:6379:0", "127.0.0.1:6379:1", "other.yaml")

    code, out, err = invoke("validate")

    assert (code, err) == (0, ""), err
    lines = out.splitlines()
    assert lines[0] == "streambroker.yaml: valid: 2 pools, 3 streams, 3 consumer groups"
    rows = {line.split()[0]: line.split()[1:4] for line in lines if line.startswith(" stream-")}
    assert rows == {
        "stream-a": ["default", "127.0.0.1:6379/0", "read-group-a,"],
        "stream-b": ["default", "127.0.0.1:6379/0", "read-group-ab"],
        "stream-c": ["second", "redis://user:***@127.0.0.1:6380/3", "read-group-c"],
    }, out
    assert "s3cret" not in out
    # The file can be named before or after the command, or in the environment.
    for args, env in [
        (["--config", str(other), "validate"], {}),
        (["validate", "-c", str(other)], {}),
        (["validate"], {"STREAMBROKER_CONFIG": str(other)}),
    ]:
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"{other}: valid: 2 pools"), result.stdout
        assert " 127.0.0.1:6379/1 " in result.stdout


BAD_CONFIGS = {
    "one problem": (
        "default:\n  redis: localhost:6379:0\n  streams:\n    s1: [g]\n    s1: [h]\n",
        ["streambroker: error: streambroker.yaml:5: stream with name s1 already exists"],
    ),
    "several problems": (
        "default:\n  redis: localhost:6379:0\n  streams:\n    s1: [g]\n    s1: [h]\n    s2: []\n",
        [
            "streambroker: error: the configuration has 2 problems:",
            "  streambroker.yaml:5: stream with name s1 already exists",
            "  streambroker.yaml:6: stream s2 has no consumer groups",
        ],
    ),
    "no file": (
        None,
        [
            "streambroker: error: streambroker.yaml: config file not found (pass --config "
            "FILE or set STREAMBROKER_CONFIG)"
        ],
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_validate_errors_name_file_and_line(tmp_path: Path, case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    if text is not None:
        (tmp_path / "streambroker.yaml").write_text(text)

    result = run([*CLI, "validate"], tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == expected


# -- errors ---------------------------------------------------------------------------


def test_errors_are_one_line_and_never_show_passwords(tmp_path: Path) -> None:
    # Nothing listens on the port: the pool cannot be reached.
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    write_config(tmp_path, url, url.replace("/0", "/1"))

    unknown = run([*CLI, "stats", "stream-x"], tmp_path)
    unreachable = run([*CLI, "publish", "stream-a", "hello"], tmp_path)
    debug = run([*CLI, "--debug", "publish", "stream-a", "hello"], tmp_path)

    assert (unknown.returncode, unknown.stdout) == (1, "")
    assert unknown.stderr == "streambroker: error: stream 'stream-x' is not registered\n"
    assert (unreachable.returncode, unreachable.stdout) == (1, "")
    (line,) = unreachable.stderr.splitlines()
    assert line.startswith("streambroker: error: redis pool 'default': "), line
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr
    assert "PoolConnectionError" in debug.stderr
    for result in (unknown, unreachable, debug):
        assert "s3cret" not in result.stdout + result.stderr


# -- stats ----------------------------------------------------------------------------


def test_stats_table_and_json(project: Path, client: sb.Broker) -> None:
    for n in range(5):
        client.publish("stream-a", n)
    client.publish("stream-c", "c")

    def crash(events: list[sb.Event]) -> None:
        events[0].ack()
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        client.consumer("read-group-a", "c1").consume(crash, count=3, block=False)
    config = str(project / "streambroker.yaml")

    code, out, err = invoke("stats", "--json", "-c", config)

    assert (code, err) == (0, ""), err
    data = json.loads(out)
    by_stream = {stream["stream"]: stream for stream in data}
    assert list(by_stream) == ["stream-a", "stream-b", "stream-c"]
    a = by_stream["stream-a"]
    assert (a["pool"], a["length"], a["orphan_groups"]) == ("default", 5, [])
    group_a, group_ab = a["groups"]
    assert (group_a["group"], group_a["lag"], group_a["pending"]) == ("read-group-a", 2, 2)
    assert [(c["name"], c["pending"], c["alive"]) for c in group_a["consumers"]] == [
        ("c1", 2, False)
    ]
    assert (group_ab["lag"], group_ab["pending"], group_ab["consumers"]) == (5, 0, [])
    assert (group_a["created"], group_ab["created"]) == (True, False)  # no consumer ran yet
    assert (by_stream["stream-c"]["length"], by_stream["stream-b"]["length"]) == (1, 0)

    code, out, err = invoke("--config", config, "stats", "stream-a", "stream-c")

    assert (code, err) == (0, ""), err
    rows = [line.split() for line in out.splitlines()]
    assert rows[2][:3] == ["stream-a", "(default)", "5"], out
    assert ["read-group-a", "2", "2", "0"] in rows, out
    assert next(row for row in rows if row[0] == "c1")[:2] == ["c1", "2"], out
    assert next(row for row in rows if row[0] == "c1")[-1] == "no", out
    assert ["read-group-ab", "(not", "created", "yet)", "5", "0", "0"] in rows, out
    assert next(r for r in rows if r[0] == "stream-c")[:3] == ["stream-c", "(second)", "1"]
    assert not any(row[0] == "stream-b" for row in rows if row), out


def test_stats_watch_refreshes_until_ctrl_c(project: Path, client: sb.Broker) -> None:
    client.publish("stream-b", "b")
    code, out, err = invoke(
        "stats", "stream-b", "--watch", "--json", "--interval", "0.01", "--iterations", "2"
    )
    assert (code, err) == (0, ""), err
    first, second = (json.loads(line) for line in out.splitlines())
    assert first[0]["length"] == second[0]["length"] == 1

    with started([*CLI, "stats", "--watch", "--interval", "0.05"], project) as process:
        wait_for(lambda: output(project)[0].count("stream-b (default)") >= 2, 30, "2 tables")
        stop_cleanly(process, signal.SIGINT)
    out, err = output(project)
    assert err == ""
    assert re.search(r"^ ?stream-b \(default\) +1 ", out, re.M), out


# -- publish --------------------------------------------------------------------------


def test_publish_arguments_json_meta_and_stdin(project: Path, client: sb.Broker) -> None:
    config = str(project / "streambroker.yaml")

    code, out, err = invoke("publish", "stream-a", '{"a": 1}', "-c", config)
    assert (code, err) == (0, ""), err
    (plain_id,) = out.split()
    code, out, err = invoke(
        "publish", "stream-a", '{"a": [1, 2.5]}', "--json", "--meta", "k=v", "-m", "x=y=z",
        "-c", config,
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    (json_id,) = out.split()
    code, out, err = invoke(
        "publish", "stream-c", "--json", "-m", "src=stdin", "-c", config,
        input='"one"\n\n{"two": 2}\nnull\n',
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    stdin_ids = out.split()
    assert len(stdin_ids) == 3

    seen: list[tuple[str, str, object, dict[str, str]]] = []

    def record(events: list[sb.Event]) -> None:
        seen.extend((e.stream, e.id, e.body, dict(e.meta)) for e in events)

    client.consumer("read-group-a").consume(record, block=False)
    client.consumer("read-group-c").consume(record, block=False)
    assert seen == [
        ("stream-a", plain_id, '{"a": 1}', {}),
        ("stream-a", json_id, {"a": [1, 2.5]}, {"k": "v", "x": "y=z"}),
        ("stream-c", stdin_ids[0], "one", {"src": "stdin"}),
        ("stream-c", stdin_ids[1], {"two": 2}, {"src": "stdin"}),
        ("stream-c", stdin_ids[2], None, {"src": "stdin"}),
    ]

    # A line that is not JSON stops it: the lines before it are published, not those after.
    code, out, err = invoke("publish", "stream-b", "--json", "-c", config, input="1\n{\n2\n")
    assert code == 1
    (first_id,) = out.split()
    assert err.startswith("streambroker: error: line 2 is not valid JSON: "), err
    assert err.endswith("; stopped: 1 event published from the lines before it\n"), err
    assert [e.id for e in client.read("stream-b")] == [first_id]
    code, out, err = invoke("publish", "stream-b", "--json", "-c", config, input="{\n")
    assert (code, out) == (1, "")
    assert err.endswith("; stopped: 0 events published from the lines before it\n"), err
    code, out, err = invoke("publish", "stream-b", "x", "--meta", "novalue", "-c", config)
    assert code == 2
    assert "'novalue' is not KEY=VALUE" in err


# -- tail -----------------------------------------------------------------------------


def test_tail_without_group_prints_new_events_and_changes_nothing(
    project: Path, server: Server
) -> None:
    redis_client = server.client()
    redis_client.xadd("stream-a", {"$body": '"before"', "$codec": "json"})
    with started([*CLI, "tail", "stream-a"], project) as process:
        wait_for(lambda: "tailing stream-a" in output(project)[1], 30, "tail to start")
        # Written by another program: a JSON body with a tag, then one it cannot decode.
        first = redis_client.xadd("stream-a", {"$body": '{"n": 1}', "$codec": "json", "k": "v"})
        second = redis_client.xadd("stream-a", {"$body": b"\xff", "$codec": "json"})
        wait_for(lambda: output(project)[0].count("\n") >= 2, 30, "two events printed")
        stop_cleanly(process, signal.SIGINT)
    out, err = output(project)
    lines = out.splitlines()
    assert lines[0] == f'stream-a {first.decode()} {event_time(first.decode())} k=v {{"n": 1}}'
    assert lines[1].startswith(
        f"stream-a {second.decode()} {event_time(second.decode())} <cannot "
    ), lines
    assert len(lines) == 2
    assert err == "tailing stream-a (read-only); Ctrl-C to stop\n"
    # Read-only: it created no group, and removed nothing.
    assert redis_client.xinfo_groups("stream-a") == []
    assert redis_client.xlen("stream-a") == 3


def test_tail_with_group_acknowledges_what_it_prints(project: Path, client: sb.Broker) -> None:
    a_ids = [client.publish("stream-a", n, {"n": str(n)}) for n in range(3)]
    b_id = client.publish("stream-b", "b")
    expected = {f"stream-a {a_ids[n]} {event_time(a_ids[n])} n={n} {n}" for n in range(3)}
    expected.add(f'stream-b {b_id} {event_time(b_id)} "b"')

    code, first, err = invoke(
        "tail", "stream-b", "--group", "read-group-ab", "--name", "t1", "--count", "3"
    )

    assert code == 0, err
    # The group reads both streams, and one read took all four events: the one left
    # over is not handed out once the consumer stops; it stays pending for t1, which
    # gets it first when it runs again.
    assert err.splitlines() == [
        "tailing stream-a, stream-b as consumer t1 of group read-group-ab; Ctrl-C to stop",
    ]
    assert len(first.splitlines()) == 3
    assert (
        client.group_stats("stream-b", "read-group-ab").pending
        + client.group_stats("stream-a", "read-group-ab").pending
        == 1
    )

    code, second, err = invoke(
        "tail", "stream-a", "-g", "read-group-ab", "--name", "t1", "--count", "1"
    )

    assert code == 0, err
    assert set(first.splitlines()) | set(second.splitlines()) == expected
    c_id = client.publish("stream-b", {"x": [1, 2]}, {"k": "v"})
    code, out, err = invoke("tail", "stream-a", "-g", "read-group-ab", "--count", "1", "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "stream": "stream-b",
        "id": c_id,
        "time": event_time(c_id),
        "meta": {"k": "v"},
        "body": {"x": [1, 2]},
    }
    group_ab = client.group_stats("stream-a", "read-group-ab")
    assert (group_ab.lag, group_ab.pending, group_ab.consumers) == (0, 0, ())
    assert client.group_stats("stream-a", "read-group-a").lag == 3
    # Every group acknowledged stream-b's events, so they were removed.
    assert lengths(client) == {"stream-a": 3, "stream-b": 0, "stream-c": 0}

    code, out, err = invoke("tail", "stream-c", "-g", "read-group-a")
    assert (code, out) == (1, "")
    assert err == (
        "streambroker: error: consumer group 'read-group-a' does not read stream 'stream-c'\n"
    )


# -- worker ---------------------------------------------------------------------------

APP = """\
import gc

import redis

import streambroker as sb

client = redis.Redis(host="127.0.0.1", port={port}, db=5)
broker = sb.Registry.from_yaml("streambroker.yaml").validate().broker()
FAST = {fast!r}


def record(group, events):
    client.rpush("handled:" + group, *[event.id for event in events])
    client.set("gc-frozen", gc.get_freeze_count())


@broker.handler("read-group-a", count=3, **FAST)
def handle_a(events):
    for event in events:
        if event.body == "fail once" and client.set("failed:" + event.id, 1, nx=True):
            raise RuntimeError("failing " + event.id + " once")
    record("read-group-a", events)


@broker.handler("read-group-ab", **FAST)
def handle_ab(events):
    record("read-group-ab", events)


@broker.handler("read-group-c", **FAST)
def handle_c(events):
    record("read-group-c", events)
"""


def test_worker_runs_the_handlers_until_sigterm(
    project: Path, client: sb.Broker, server: Server
) -> None:
    (project / "app.py").write_text(APP.format(port=server.port, fast=FAST))
    records = server.client(db=5)

    def handled(group: str) -> list[str]:
        return [raw.decode() for raw in records.lrange(f"handled:{group}", 0, -1)]

    # Published before the worker starts, and while it runs.
    a_ids = [client.publish("stream-a", body) for body in (1, "fail once", 3, 4)]
    b_ids = [client.publish("stream-b", n) for n in range(3)]
    command = [*CLI, "worker", "app:broker", "--consumers", "2", "--summary-interval", "0.1"]
    with started(command, project) as process:
        c_ids = [client.publish("stream-c", n) for n in range(5)]
        a_ids.append(client.publish("stream-a", 5))
        wait_for(lambda: len(handled("read-group-a")) == 5, 30, "read-group-a")
        wait_for(lambda: len(handled("read-group-ab")) == 8, 30, "read-group-ab")
        wait_for(lambda: len(handled("read-group-c")) == 5, 30, "read-group-c")
        wait_for(lambda: "events in the last 0.1 s" in output(project)[1], 30, "a summary")
        stop_cleanly(process, signal.SIGTERM)
    out, err = output(project)

    assert sorted(handled("read-group-a")) == sorted(a_ids)
    assert sorted(handled("read-group-ab")) == sorted(a_ids + b_ids)
    assert sorted(handled("read-group-c")) == sorted(c_ids)
    # Nothing pending, and every event removed once every group acknowledged it.
    stats = client.stats()
    assert [(s.stream, s.length) for s in stats] == [
        ("stream-a", 0),
        ("stream-b", 0),
        ("stream-c", 0),
    ]
    for stream in stats:
        for group in stream.groups:
            assert (group.lag, group.pending, group.dead_letters) == (0, 0, 0)
            assert group.consumers == ()  # the stopped consumers left their groups
    # The handler's failure was logged with its traceback, and the worker went on.
    failed = a_ids[1]
    assert "the handler raised RuntimeError" in err
    assert f"RuntimeError: failing {failed} once" in err
    assert "SIGTERM received: stopping after the batches in hand" in err
    assert (
        "worker stopped; handled 18 events: read-group-a 5, read-group-ab 8, read-group-c 5" in err
    )
    assert out == ""
    # The objects made at start-up were frozen out of the garbage collector's reach.
    assert int(records.get("gc-frozen") or 0) > 1000


ASYNC_APP = """\
import asyncio
import gc

import redis.asyncio

import streambroker as sb

client = redis.asyncio.Redis(host="127.0.0.1", port={port}, db=5)
broker = sb.Registry.from_yaml("streambroker.yaml").validate().async_broker()


@broker.handler("read-group-ab", count=2, **{fast!r})
async def handle_ab(events):
    await asyncio.sleep(0)
    await client.rpush("handled:read-group-ab", *[event.id for event in events])
    await client.set("gc-frozen", gc.get_freeze_count())
"""


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_worker_serves_metrics_health_and_readiness(
    project: Path, client: sb.Broker, server: Server, kind: str
) -> None:
    app = APP if kind == "sync" else ASYNC_APP
    (project / "app.py").write_text(app.format(port=server.port, fast=FAST))
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    command = [*CLI, "worker", "app:broker", "--metrics-port", str(port)]
    with started(command, project) as process:
        wait_for(lambda: get("/readyz") == (200, "ready\n"), 30, "the worker to be ready")
        assert get("/healthz") == (200, "ok\n")
        client.publish("stream-b", "x")
        wait_for(lambda: 'outcome="acked"' in get("/metrics")[1], 30, "the delivery to be counted")
        text = get("/metrics")[1]
        assert 'streambroker_deliveries_total{group="read-group-ab",outcome="acked"' in text
        assert "streambroker_handler_duration_seconds_bucket" in text
        stop_cleanly(process, signal.SIGTERM)
    assert get("/healthz") == (0, "")  # gone with the worker


def test_worker_runs_coroutine_handlers_of_an_async_broker(
    project: Path, client: sb.Broker, server: Server
) -> None:
    (project / "app.py").write_text(ASYNC_APP.format(port=server.port, fast=FAST))
    records = server.client(db=5)
    ids = [client.publish("stream-a", n) for n in range(3)]
    with started([*CLI, "worker", "app:broker", "--consumers", "2"], project) as process:
        ids += [client.publish("stream-b", n) for n in range(3)]
        wait_for(lambda: records.llen("handled:read-group-ab") == 6, 30, "the events")
        stop_cleanly(process, signal.SIGTERM)
    handled = sorted(raw.decode() for raw in records.lrange("handled:read-group-ab", 0, -1))
    assert handled == sorted(ids)
    assert "worker stopped; handled 6 events: read-group-ab 6" in output(project)[1]
    assert int(records.get("gc-frozen") or 0) > 1000
    group = client.group_stats("stream-b", "read-group-ab")
    assert (group.pending, group.consumers) == (0, ())
    assert client.stream_stats("stream-b").length == 0


def test_worker_errors(project: Path) -> None:
    (project / "app.py").write_text("import streambroker as sb\nbroker = 1\n")
    (project / "broken.py").write_text("raise ValueError('broken module')\n")

    for spec, message in [
        ("app", "'app' is not MODULE:APP (e.g. myapp.events:broker)"),
        ("missing:broker", "cannot import 'missing': no module named 'missing' in the current "
         "directory or on the Python path"),
        ("app:nothing", "module 'app' has no attribute 'nothing'"),
        ("app:broker", "'app:broker' is a int, not a streambroker Broker or AsyncBroker"),
        ("broken:broker", "importing 'broken' failed: ValueError: broken module"),
    ]:  # fmt: skip
        code, out, err = invoke("worker", spec)
        assert (code, out) == (1, ""), spec
        assert err == f"streambroker: error: {message}\n"


# -- gc, claim, dead letters ----------------------------------------------------------


def test_gc_removes_what_every_group_acknowledged(project: Path, client: sb.Broker) -> None:
    for n in range(4):
        client.publish("stream-a", n)
        client.publish("stream-c", n)
    for group in ("read-group-a", "read-group-ab", "read-group-c"):
        client.consumer(group, collect=False).consume(lambda events: None, block=False)
    assert lengths(client) == {"stream-a": 4, "stream-b": 0, "stream-c": 4}

    code, out, err = invoke("gc", "stream-a", "--json")

    assert (code, err) == (0, ""), err
    assert json.loads(out) == {"stream-a": 4}
    code, out, err = invoke("gc")
    assert (code, err) == (0, ""), err
    assert out == "removed 4 events: stream-a 0, stream-b 0, stream-c 4\n"
    assert lengths(client) == {"stream-a": 0, "stream-b": 0, "stream-c": 0}
    # Watching prints what each round removed, and nothing when nothing was.
    client.publish("stream-b", 1)
    client.consumer("read-group-ab", collect=False).consume(lambda events: None, block=False)
    code, out, err = invoke("gc", "--watch", "--interval", "0.01", "--iterations", "3")
    assert (code, err) == (0, ""), err
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d removed 1 event: stream-a 0, stream-b 1, stream-c 0\n", out
    ), out
    code, out, err = invoke("gc", "--watch", "--json", "--interval", "0.01", "--iterations", "2")
    assert [json.loads(line) for line in out.splitlines()] == [
        {"stream-a": 0, "stream-b": 0, "stream-c": 0}
    ] * 2


def test_claim_moves_pending_events(project: Path, client: sb.Broker) -> None:
    for n in range(3):
        client.publish("stream-a", n)

    def crash(events: list[sb.Event]) -> None:
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        client.consumer("read-group-a", "c1").consume(crash, block=False)

    code, out, err = invoke("claim", "read-group-a", "c1", "c2")

    assert (code, err) == (0, ""), err
    assert out == "moved 3 pending events of group read-group-a from c1 to c2\n"
    consumers = client.group_stats("stream-a", "read-group-a").consumers
    assert [(c.name, c.pending) for c in consumers] == [("c1", 0), ("c2", 3)]

    # Not from a consumer that runs, unless forced.
    running = client.consumer("read-group-a", "c2", **FAST)
    thread = threading.Thread(target=running.consume, args=(lambda events: None,))
    thread.start()
    try:
        wait_for(
            lambda: client.group_stats("stream-a", "read-group-a").pending == 0, 30, "c2 to run"
        )
        client.publish("stream-a", 3)
        code, out, err = invoke("claim", "read-group-a", "c2", "c1")
        assert (code, out) == (1, "")
        assert err == (
            "streambroker: error: consumer 'c2' of group 'read-group-a' is running: stop it first\n"
        )
        code, out, err = invoke("claim", "read-group-a", "c2", "c1", "--force")
        assert code == 0, err
        assert re.fullmatch(r"moved [01] pending events of group read-group-a from c2 to c1\n", out)
    finally:
        running.stop()
        thread.join()


def test_dead_letters_show_the_handlers_exception(project: Path, client: sb.Broker) -> None:
    event_id = client.publish("stream-a", {"price": -1})

    def explode(events: list[sb.Event]) -> None:
        raise ValueError(f"negative price {events[0].body['price']}")

    with pytest.raises(ValueError, match="negative price"):
        client.consumer("read-group-a", max_deliveries=1).consume(explode, block=False)

    code, out, err = invoke("dead-letters", "stream-a", "read-group-a", "--json")
    assert (code, err) == (0, ""), err
    (letter,) = json.loads(out)
    assert (letter["event_id"], letter["deliveries"]) == (event_id, 1)
    first, *where = letter["error"].splitlines()
    assert first == "ValueError: negative price -1"
    assert where
    assert where[-1].endswith("in explode")
    code, out, err = invoke("dead-letters", "stream-a", "read-group-a")
    assert (code, err) == (0, ""), err
    assert "ValueError: negative price -1" in out


def test_dead_letters_list_and_replay(project: Path, client: sb.Broker) -> None:
    ids = [client.publish("stream-a", {"price": n}, {"n": str(n)}) for n in range(3)]

    def reject_odd(events: list[sb.Event]) -> None:
        for event in events:
            if event.body["price"] % 2 == 0:
                event.fail(f"bad price {event.body['price']}")

    client.consumer("read-group-a", max_deliveries=1).consume(reject_odd, block=False)

    code, out, err = invoke("dead-letters", "stream-a", "read-group-a", "--json")

    assert (code, err) == (0, ""), err
    letters = json.loads(out)
    assert [(d["event_id"], d["error"], d["deliveries"]) for d in letters] == [
        (ids[0], "RuntimeError: bad price 0", 1),
        (ids[2], "RuntimeError: bad price 2", 1),
    ]
    assert [(d["stream"], d["group"], d["meta"], d["body"]) for d in letters] == [
        ("stream-a", "read-group-a", {"n": "0"}, {"price": 0}),
        ("stream-a", "read-group-a", {"n": "2"}, {"price": 2}),
    ]
    code, out, err = invoke("dead-letters", "stream-a", "read-group-a")
    assert (code, err) == (0, ""), err
    rows = [line.strip().split(maxsplit=2) for line in out.splitlines()[2:]]
    assert rows == [
        [ids[0], "1", 'RuntimeError: bad price 0   n=0 {"price": 0}'],
        [ids[2], "1", 'RuntimeError: bad price 2   n=2 {"price": 2}'],
    ], out
    assert invoke("dead-letters", "stream-a", "read-group-ab")[1] == (
        "no dead letters of stream-a in group read-group-ab\n"
    )

    code, out, err = invoke("dead-letters", "stream-a", "read-group-a", "--replay", "all")

    assert (code, err) == (0, ""), err
    assert out == "replayed 2 dead letters of stream-a to group read-group-a\n"
    assert client.group_stats("stream-a", "read-group-a").dead_letters == 0
    again: list[tuple[str, object]] = []
    client.consumer("read-group-a").consume(
        lambda events: again.extend((e.stream, e.body) for e in events), block=False
    )
    assert again == [("stream-a", {"price": 0}), ("stream-a", {"price": 2})]
