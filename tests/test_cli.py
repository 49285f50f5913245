"""The ``streambroker`` command-line tool, run as a real process in a temp dir."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import streambroker as sb

CLI = [sys.executable, "-m", "streambroker"]
SCRIPT = Path(sys.executable).with_name("streambroker")
DEFAULT_DIR = ".streambroker"
ROW = re.compile(r"(read-group-[a-z]+)[^\w-]+(stream-[a-z])[^\w-]+(\d+)[^\w-]+(\d+)")


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBROKER")}
    env["COLUMNS"] = "80"
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


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
    # What is left stored depends on the clean-up of handled events: at most 50.
    stored = dict(re.findall(r"^(stream-[a-z]): (\d+) events stored$", demo.stdout, re.M))
    assert set(stored) == {"stream-a", "stream-b", "stream-c"}, demo.stdout
    assert all(0 <= int(n) <= 50 for n in stored.values()), demo.stdout
    # The embedded server runs in ./.streambroker and keeps running.
    data_dir = workdir / DEFAULT_DIR
    server = sb.EmbeddedServer(data_dir)
    assert server.is_running()

    status = run([*CLI, "server", "status"], workdir)
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == f"running on unix socket {server.socket_path}"

    stop = run([*CLI, "server", "stop"], workdir)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == "stopped"
    assert not server.is_running()

    status = run([*CLI, "server", "status"], workdir)
    assert status.returncode == 3
    assert status.stdout.strip() == "not running"

    stop = run([*CLI, "server", "stop"], workdir)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == "not running"


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
        assert start.stdout == f"running on unix socket {server.socket_path}\n"
        assert len(start.stdout) > 80
        assert server.socket_path == str(data_dir / "valkey.sock")
        assert server.is_running()

        again = run([*CLI, "server", "start", "--data-dir", str(data_dir)], workdir)
        assert again.returncode == 0, again.stderr
        assert again.stdout == start.stdout

        status = run([*CLI, "server", "status", "--data-dir", str(data_dir)], workdir)
        assert status.returncode == 0, status.stderr
        assert status.stdout == start.stdout
        # The default data dir is another one, not running.
        assert run([*CLI, "server", "status"], workdir).returncode == 3
    finally:
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
