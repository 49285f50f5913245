"""Users the server's ACL restricts, on the real servers: a refused command is a
:class:`sb.PoolPermissionError` naming it, never retried, and a worker it stops
exits at once with one line."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import streambroker as sb

from .conftest import SEED_YAML_TEMPLATE, OpenBroker, Server

#: The rules of every test user, before what a test takes away.
ALL = ("on", "~*", "&*", "+@all")


class Users:
    """ACL users made on the server for one test, deleted after it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.names: list[str] = []
        self.passwords: list[str] = []

    def add(self, *rules: str) -> tuple[str, str]:
        """A new user with every permission but ``rules`` (e.g. ``-xadd``); (name, password)."""
        name, password = f"sb-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        admin = self.server.client()
        try:
            admin.execute_command("ACL", "SETUSER", name, "reset", *ALL, f">{password}", *rules)
        finally:
            admin.close()
        self.names.append(name)
        self.passwords.append(password)
        return name, password

    def config(self, *rules: str) -> sb.ValidatedRegistry:
        """The seed's registry on the server, as a new user restricted by ``rules``."""
        return sb.Registry.from_yaml(self.yaml(*rules)).validate()

    def yaml(self, *rules: str) -> str:
        name, password = self.add(*rules)
        url = f"redis://{name}:{password}@{self.server.address}"
        return SEED_YAML_TEMPLATE.format(default=f"{url}/0", second=f"{url}/3")


@pytest.fixture
def users(server: Server) -> Iterator[Users]:
    users = Users(server)
    yield users
    if users.names:
        admin = server.client()
        try:
            admin.execute_command("ACL", "DELUSER", *users.names)
        finally:
            admin.close()


def raised_within(seconds: float, call: Callable[[], object]) -> BaseException:
    """What ``call`` raises, run in a thread; fails the test if it has not within ``seconds``
    (an error that were retried would keep it running)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: the error is retried")
    if not raised:
        pytest.fail("nothing was raised")
    return raised[0]


def test_a_refused_publish_names_the_command(
    users: Users, open_broker: OpenBroker, server: Server
) -> None:
    broker = open_broker(users.config("-xadd"))

    with pytest.raises(sb.PoolPermissionError) as caught:
        broker.publish("stream-a", "one")

    error = caught.value
    assert isinstance(error, sb.PoolAuthenticationError)
    assert (error.pool, error.command) == ("default", "XADD stream-a")
    assert str(error).startswith("redis pool 'default': XADD stream-a: ")
    assert "no permissions to run the 'xadd' command" in str(error)
    # The connection stays in step: what the user may do still works.
    assert broker.stream_stats("stream-a").length == 0
    assert server.client().exists("stream-a") == 0  # publishing creates nothing else


def test_a_command_refused_inside_a_script_names_the_script(
    users: Users, open_broker: OpenBroker, server: Server
) -> None:
    # A consumer starts by handing its own pending events over again, with a script
    # that lists them (XPENDING).
    broker = open_broker(users.config("-xpending"))
    broker.publish("stream-a", "one")
    consumer = broker.consumer("read-group-a", "denied")

    error = raised_within(30, lambda: consumer.consume(lambda events: None, block=True))

    assert isinstance(error, sb.PoolPermissionError), repr(error)
    assert (error.pool, error.command) == ("default", "script on stream-a")
    assert str(error).startswith("redis pool 'default': script on stream-a: ")
    # Valkey names the refused command; Redis 7.0 only says it was refused.
    assert "'xpending'" in str(error) or "can't run this command" in str(error)
    assert server.client().xpending("stream-a", "read-group-a")["pending"] == 0


def test_a_command_refused_while_connecting_is_a_permission_error(
    users: Users, open_broker: OpenBroker
) -> None:
    broker = open_broker(users.config("-client"))  # connections name themselves

    with pytest.raises(sb.PoolPermissionError) as caught:
        broker.publish("stream-a", "one")

    assert caught.value.command == ""
    assert str(caught.value).startswith("redis pool 'default': ")
    assert "no permissions to run the 'client|setname' command" in str(caught.value)


APPS = {
    "sync": """\
import streambroker as sb

broker = sb.Registry.from_yaml("streambroker.yaml").validate().broker()

@broker.handler("read-group-a", block_timeout=0.1)
def handle(events):
    pass

@broker.handler("read-group-c", block_timeout=0.1)
def handle_c(events):
    pass
""",
    "async": """\
import streambroker as sb

broker = sb.Registry.from_yaml("streambroker.yaml").validate().async_broker()

@broker.handler("read-group-a", block_timeout=0.1)
async def handle(events):
    pass

@broker.handler("read-group-c", block_timeout=0.1)
async def handle_c(events):
    pass
""",
}


@pytest.mark.parametrize("face", list(APPS))
def test_a_worker_whose_user_is_refused_exits_at_once_with_one_line(
    users: Users, tmp_path: Path, face: str
) -> None:
    # Reading is refused; everything before (creating groups, taking leases) is not.
    (tmp_path / "streambroker.yaml").write_text(users.yaml("-xreadgroup"))
    (tmp_path / "app.py").write_text(APPS[face])

    finished = subprocess.run(
        [sys.executable, "-m", "streambroker", "worker", "app:broker", "--consumers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 1
    assert finished.stdout == ""
    errors = [line for line in finished.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1, finished.stderr
    assert errors[0].startswith("streambroker: error: redis pool '")
    assert ": XREADGROUP GROUP read-group-" in errors[0]
    assert "no permissions to run the 'xreadgroup' command" in errors[0]
    assert users.passwords[0] not in finished.stderr


@pytest.mark.parametrize(
    ("rules", "denied"),
    [
        (("-exists",), "EXISTS"),  # the lease read: a stopped consumer must not look alive
        (("-eval", "-evalsha"), "eval"),  # the lag count, needed after a deletion mid-stream
    ],
)
def test_stats_surface_a_denied_read(
    server: Server, open_broker: OpenBroker, users: Users, rules: tuple[str, ...], denied: str
) -> None:
    admin = server.client()
    with open_broker(users.config()) as owner:
        owner.consumer("read-group-ab", "idle").consume(lambda events: None, block=False)
        ids = [owner.publish("stream-a", n) for n in range(3)]
        owner.consumer("read-group-a", "stopped").consume(lambda events: None, count=1, block=False)
    admin.xdel("stream-a", ids[1])  # the server no longer knows the lag
    with (
        open_broker(users.config(*rules)) as broker,
        pytest.raises(sb.PoolPermissionError) as caught,
    ):
        broker.stats("stream-a")
    assert "cannot read the statistics of stream 'stream-a'" in str(caught.value)
    assert denied.lower() in str(caught.value).lower()


def test_stats_show_names_that_are_not_utf8(server: Server, open_broker: OpenBroker) -> None:
    config = sb.Registry.from_yaml(
        SEED_YAML_TEMPLATE.format(default=f"{server.address}:0", second=f"{server.address}:3")
    ).validate()
    with open_broker(config) as broker:
        broker.consumer("read-group-a", "c").consume(lambda events: None, block=False)
        broker.publish("stream-a", 1)
        server.client().execute_command(
            "XGROUP", "CREATECONSUMER", "stream-a", "read-group-a", b"bad\xffname"
        )
        (stream,) = broker.stats("stream-a")
    group = next(g for g in stream.groups if g.group == "read-group-a")
    assert [c.name for c in group.consumers] == ["bad\\xffname", "c"]
