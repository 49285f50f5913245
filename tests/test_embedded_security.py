"""The embedded server trusts only its own user's data directory and socket, and keeps
the events it stores readable by that user only.

"Owned by another user" is made with ``os.chown``, which needs root (or CAP_CHOWN).
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import streambroker as sb

from .test_embedded import Make, consume, embedded, registry

__all__ = ["embedded"]  # the fixture, imported for the tests of this module

OTHER_UID = 65534  # nobody


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


@pytest.fixture
def can_chown(tmp_path: Path) -> None:
    probe = tmp_path / "chown-probe"
    probe.touch()
    try:
        os.chown(probe, OTHER_UID, -1)
    except PermissionError:
        pytest.skip("giving a file to another user needs root (CAP_CHOWN)")


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, whatever the test runner's: the broker must not rely on it."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def assert_refused(server: sb.EmbeddedServer, *words: str) -> str:
    with pytest.raises(sb.EmbeddedServerError) as caught:
        server.start()
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


@pytest.mark.usefixtures("can_chown")
def test_a_data_dir_of_another_user_is_refused(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / ".streambroker"
    data_dir.mkdir(mode=0o755)
    os.chown(data_dir, OTHER_UID, -1)
    server = sb.EmbeddedServer(data_dir)

    message = assert_refused(server, str(data_dir), owner_name(OTHER_UID), f"uid {OTHER_UID}")
    assert "a data directory of your own" in message
    # Nothing was written there, or changed, and no server started in it.
    assert list(data_dir.iterdir()) == []
    assert mode(data_dir) == 0o755
    with pytest.raises(sb.EmbeddedServerError, match=str(data_dir)):
        server.is_running()
    with (
        registry(data_dir).broker() as broker,
        pytest.raises(sb.EmbeddedServerError, match=str(data_dir)),
    ):
        broker.publish("events", "for another user's server")
    assert list(data_dir.iterdir()) == []
    os.chown(data_dir, os.getuid(), -1)
    assert not server.is_running()


@pytest.mark.parametrize("open_mode", [0o777, 0o1777, 0o770], ids=oct)
def test_a_data_dir_others_may_write_to_is_refused(tmp_path: Path, open_mode: int) -> None:
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("not the broker's")
    data_dir.chmod(open_mode)
    server = sb.EmbeddedServer(data_dir)

    message = assert_refused(server, str(data_dir), "writable by other users", f"{open_mode:04o}")
    assert f"chmod 700 {data_dir}" in message
    with pytest.raises(sb.EmbeddedServerError, match="writable by other users"):
        server.is_running()
    assert mode(data_dir) == open_mode  # left as it was
    assert sorted(path.name for path in data_dir.iterdir()) == ["notes.txt"]


@pytest.mark.usefixtures("can_chown")
def test_an_open_data_dir_holding_another_users_file_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "appendonlydir").mkdir()
    os.chown(data_dir / "appendonlydir", OTHER_UID, -1)  # planted while it was open
    data_dir.chmod(0o777)
    server = sb.EmbeddedServer(data_dir)

    assert_refused(server, str(data_dir), "writable by other users")
    assert mode(data_dir) == 0o777
    assert os.lstat(data_dir / "appendonlydir").st_uid == OTHER_UID


@pytest.mark.usefixtures("can_chown")
def test_a_socket_of_another_user_is_refused(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    server = embedded(data_dir)
    socket = server.start()
    # As if another user's server listened there.
    os.chown(socket, OTHER_UID, -1)
    try:
        with pytest.raises(sb.EmbeddedServerError) as caught:
            server.is_running()
        assert socket in str(caught.value)
        assert owner_name(OTHER_UID) in str(caught.value)
        assert_refused(server, socket, owner_name(OTHER_UID))
        with (
            registry(data_dir).broker() as broker,
            pytest.raises(sb.EmbeddedServerError, match=socket),
        ):
            broker.publish("events", "for another user's server")
    finally:
        os.chown(socket, os.getuid(), -1)
    assert server.is_running()


def test_a_socket_others_may_write_to_is_refused(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    server = embedded(data_dir)
    socket = server.start()
    os.chmod(socket, 0o777)
    try:
        with pytest.raises(sb.EmbeddedServerError) as caught:
            server.is_running()
        assert socket in str(caught.value)
        assert "writable by other users" in str(caught.value)
    finally:
        os.chmod(socket, 0o700)
    assert server.is_running()


def server_files(data_dir: Path) -> dict[str, int]:
    """The mode of every file and directory under ``data_dir``, by relative path."""
    found = {".": mode(data_dir)}
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = Path(root, name)
            found[str(path.relative_to(data_dir))] = mode(path)
    return found


def assert_private(data_dir: Path) -> None:
    files = server_files(data_dir)
    for name, file_mode in files.items():
        is_dir = (data_dir / name).is_dir() or name == "valkey.sock"
        assert file_mode == (0o700 if is_dir else 0o600), (name, oct(file_mode))


@pytest.mark.usefixtures("umask_022")
def test_the_data_dir_and_the_server_files_are_private(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "data"
    server = embedded(data_dir)
    with registry(data_dir).broker() as broker:
        broker.publish("events", "secret")

    files = server_files(data_dir)
    # The server's own files are there: the log, the pid file, the append-only
    # directory and its files, the socket.
    assert {"valkey.log", "valkey.pid", "valkey.sock", "server.lock", "appendonlydir"} <= set(files)
    assert any(name.startswith("appendonlydir/") and name.endswith(".aof") for name in files)
    assert_private(data_dir)
    assert server.stop() is True
    assert_private(data_dir)


@pytest.mark.usefixtures("umask_022")
@pytest.mark.parametrize(
    ("dir_mode", "file_mode"), [(0o755, 0o644), (0o775, 0o664)], ids=["umask-022", "umask-002"]
)
def test_a_data_dir_left_open_by_an_earlier_version_is_made_private(
    tmp_path: Path, embedded: Make, dir_mode: int, file_mode: int
) -> None:
    data_dir = tmp_path / "data"
    server = embedded(data_dir)
    with registry(data_dir).broker() as broker:
        kept = broker.publish("events", "kept")
    assert server.stop() is True
    # What an earlier version left, under a umask of 022 or 002: everything readable
    # by every user (and writable by the user's group).
    for root, _, files in os.walk(data_dir):
        os.chmod(root, dir_mode)
        for name in files:
            os.chmod(Path(root, name), file_mode)

    server.start()

    assert_private(data_dir)
    with registry(data_dir).broker() as broker:
        assert [(event.id, event.body) for event in consume(broker)] == [(kept, "kept")]


@pytest.mark.usefixtures("umask_022")
@pytest.mark.parametrize("open_mode", [0o755, 0o777, 0o1777], ids=oct)
def test_an_empty_open_data_dir_is_made_private(
    tmp_path: Path, embedded: Make, open_mode: int
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(open_mode)
    server = embedded(data_dir)

    server.start()

    assert mode(data_dir) == 0o700
    assert_private(data_dir)


def test_an_open_data_dir_holding_other_files_is_refused(tmp_path: Path, embedded: Make) -> None:
    data_dir = tmp_path / "project"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    (data_dir / "notes.txt").write_text("not the broker's")
    server = embedded(data_dir)

    assert_refused(server, str(data_dir), "0755", "notes.txt", f"chmod 700 {data_dir}")
    assert mode(data_dir) == 0o755  # not changed behind the user's back
    assert sorted(path.name for path in data_dir.iterdir()) == ["notes.txt"]

    data_dir.chmod(0o700)  # the fix the message gives
    server.start()
    assert server.is_running()
