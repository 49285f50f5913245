"""The least-privilege roles of :mod:`tests.roles`, as real ACL users on both servers:
each does its whole job with an empty ``ACL LOG`` (nothing it tried was refused, not
even by a script or while connecting), and gets the right results."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

import streambroker as sb
from streambroker.wire.keys import dead_letter_key

from .conftest import SEED_YAML_TEMPLATE, Server, wait_for
from .roles import ROLES, setuser_line
from .test_cli import cli_env, invoke

README = Path(__file__).resolve().parent.parent / "README.md"


def _spec(stream: str) -> sb.StreamSpec:
    """A stream of the seed's registry (no key prefix), for the names of its side keys."""
    return sb.StreamSpec(stream, "default", ())


class Role:
    """One role's user on the server, with the seed's registry under its name."""

    def __init__(self, server: Server, role: str, groups: Sequence[str] | None = None) -> None:
        self.server = server
        self.name = f"{role}-{uuid.uuid4().hex[:6]}"
        self.password = uuid.uuid4().hex
        line = setuser_line(role, seed_config(server.address), self.password, groups).split()
        line[2] = self.name
        self.admin = server.client()
        self.admin.execute_command(*line)
        url = f"redis://{self.name}:{self.password}@{server.address}"
        self.yaml = SEED_YAML_TEMPLATE.format(default=f"{url}/0", second=f"{url}/3")
        self.config = sb.Registry.from_yaml(self.yaml).validate()
        self.admin.execute_command("ACL", "LOG", "RESET")

    def refused(self) -> list[tuple[str, str, str]]:
        """What the ACL refused anyone since the user was made: (user, reason, object)."""
        return [
            (e[b"username"].decode(), e[b"reason"].decode(), e[b"object"].decode())
            for e in self.admin.execute_command("ACL", "LOG")
        ]

    def close(self) -> None:
        self.admin.execute_command("ACL", "DELUSER", self.name)
        self.admin.close()


def seed_config(address: str) -> sb.ValidatedRegistry:
    return sb.Registry.from_yaml(
        SEED_YAML_TEMPLATE.format(default=f"{address}:0", second=f"{address}:3")
    ).validate()


@pytest.fixture
def role(server: Server, request: pytest.FixtureRequest) -> Iterator[Role]:
    """The role ``request.param`` names: ``"consumer"``, or ``("consumer", groups)``."""
    name, *groups = request.param if isinstance(request.param, tuple) else (request.param,)
    made = Role(server, name, *groups)
    yield made
    made.close()


def bodies(client: redis.Redis, stream: str) -> list[bytes]:
    return [fields[b"$body"] for _, fields in client.xrange(stream)]


@pytest.mark.parametrize("role", ["publisher"], indirect=True)
@pytest.mark.parametrize("face", ["sync", "async"])
def test_the_publisher_publishes_to_both_pools(role: Role, face: str) -> None:
    ids: list[str] = []
    if face == "async":

        async def publish() -> None:
            async with role.config.async_broker(codec="json") as broker:
                ids.append(await broker.publish("stream-a", "one"))
                async with broker.batch() as batch:
                    batch.publish("stream-b", "two")
                    batch.publish("stream-c", "three", meta={"k": "v"})
                ids.extend(batch.ids)

        asyncio.run(publish())
    else:
        with role.config.broker(codec="json") as broker:
            ids.append(broker.publish("stream-a", "one"))
            with broker.batch() as batch:
                batch.publish("stream-b", "two")
                batch.publish("stream-c", "three", meta={"k": "v"})
            ids.extend(batch.ids)

    assert role.refused() == []
    second = role.server.client(3)
    assert [i.decode() for i, _ in role.admin.xrange("stream-a")] == ids[:1]
    assert bodies(role.admin, "stream-a") == [b'"one"']
    assert bodies(role.admin, "stream-b") == [b'"two"']
    assert [(i.decode(), f[b"k"]) for i, f in second.xrange("stream-c")] == [(ids[2], b"v")]
    # The publisher may do nothing else: not read, nor write any other key.
    with pytest.raises(sb.PoolPermissionError), role.config.broker() as broker:
        broker.read("stream-a")
    assert [(r[1], r[2]) for r in role.refused()] == [("command", "xread")]


def crash(events: list[sb.Event]) -> None:
    raise RuntimeError("the consumer stops")


class Job:
    """The consumer's handler: fails ``retry`` once and ``poison`` always, handles
    ``slow`` until a heartbeat renewed it, records everything else it handled."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin
        self.handled: dict[str, int] = {}  # body: the delivery it was handled on
        self.lock = threading.Lock()

    def idle_ms(self, event: sb.Event) -> int:
        (row,) = self.admin.xpending_range(event.key, "read-group-a", event.id, event.id, 1)
        return int(row["time_since_delivered"])

    def hold_until_a_heartbeat(self, event: sb.Event) -> None:
        """Keep ``event`` in hand until its idle time drops: a heartbeat renewed it."""
        peak = -1

        def renewed() -> bool:
            nonlocal peak
            idle = self.idle_ms(event)
            if idle < peak:
                return True
            peak = idle
            return False

        wait_for(renewed, 20, "a heartbeat")

    def __call__(self, events: list[sb.Event]) -> None:
        for event in events:
            body = event.body
            if body == "poison" or (body == "retry" and event.delivery_count == 1):
                event.fail(ValueError(f"cannot take {body}"))
                continue
            if body == "slow":
                self.hold_until_a_heartbeat(event)
            with self.lock:
                self.handled[str(body)] = event.delivery_count


@pytest.mark.parametrize("role", ["consumer"], indirect=True)
def test_the_consumer_does_its_whole_job(role: Role) -> None:
    admin = role.admin
    with seed_config(role.server.address).broker() as owner:
        for body in ("held", "retry", "poison", "slow", "plain"):
            owner.publish("stream-a", body)
        owner.publish("stream-b", "b")
        owner.publish("stream-c", "c")
    options = {"retry_after": 1.0, "max_deliveries": 2, "retry_delay": 0.05}

    with role.config.broker() as broker:
        # A consumer stops (its handler raised) holding the first event.
        crashed = broker.consumer("read-group-a", "crashed", **options)
        with pytest.raises(RuntimeError):
            crashed.consume(crash, count=1)
        job = Job(admin)
        worker = broker.consumer("read-group-a", "worker", block_timeout=0.1, **options)
        thread = threading.Thread(target=worker.consume, args=(job,), daemon=True)
        thread.start()
        dead = dead_letter_key(_spec("stream-a"), "read-group-a")
        wait_for(lambda: len(job.handled) == 4 and admin.xlen(dead) == 1, 30, "the job")
        worker.stop()
        thread.join(30)
        assert not thread.is_alive()

        # held: taken over from the stopped consumer; retry: handled on its second try.
        assert job.handled == {"held": 2, "retry": 2, "slow": 1, "plain": 1}
        (letter,) = broker.dead_letters("stream-a", "read-group-a")
        assert (letter.event.body, letter.deliveries) == ("poison", 2)
        assert "cannot take poison" in letter.error

        assert broker.replay_dead_letters("stream-a", "read-group-a") == 1
        again: list[object] = []
        broker.consumer("read-group-a", "worker").consume(
            lambda events: again.extend(e.body for e in events), block=False
        )
        assert again == ["poison"]
        for group in ("read-group-ab", "read-group-c"):
            broker.consumer(group, "worker").consume(lambda events: None, block=False)
        broker.collect_garbage()
        assert broker.consumer("read-group-a", "crashed").leave() == []

    assert role.refused() == []
    second = role.server.client(3)
    assert (admin.xlen("stream-a"), admin.xlen("stream-b"), second.xlen("stream-c")) == (0, 0, 0)
    assert admin.xlen(dead) == 0


@pytest.mark.parametrize("role", [("consumer", ["read-group-a"])], indirect=True)
def test_a_consumer_of_one_group_needs_nothing_of_the_others(role: Role) -> None:
    with seed_config(role.server.address).broker() as owner:
        owner.publish("stream-a", "a")
        owner.publish("stream-b", "b")
    seen: list[object] = []

    with role.config.broker() as broker:
        broker.consumer("read-group-a").consume(
            lambda events: seen.extend(e.body for e in events), block=False
        )
        assert broker.collect_garbage("stream-a") == {"stream-a": 0}  # read-group-ab holds it

    assert seen == ["a"]
    assert role.refused() == []
    assert role.admin.xlen("stream-a") == 1
    assert not role.admin.exists(dead_letter_key(_spec("stream-b"), "read-group-ab"))


def tail_one(role: Role, directory: Path) -> str:
    """``streambroker tail stream-a --count 1`` as the role, while an event comes."""
    (directory / "streambroker.yaml").write_text(role.yaml)
    command = [sys.executable, "-m", "streambroker", "tail", "stream-a", "--count", "1"]
    process = subprocess.Popen(
        command,
        cwd=directory,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        assert "tailing stream-a" in process.stderr.readline()
        role.admin.xadd("stream-a", {"$body": '"tailed"', "$codec": "json"})
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.returncode == 0, stderr
    return stdout


@pytest.mark.parametrize("role", ["operator"], indirect=True)
def test_the_operator_reads_everything_and_changes_nothing(role: Role, tmp_path: Path) -> None:
    admin = role.admin
    with seed_config(role.server.address).broker() as owner:
        for group in ("read-group-a", "read-group-ab"):
            owner.consumer(group, "stopped").consume(lambda events: None, block=False)
        ids = [owner.publish("stream-a", n) for n in range(3)]
        owner.consumer("read-group-a", "stopped").consume(lambda events: None, count=1, block=False)
    admin.xdel("stream-a", ids[1])  # the server cannot tell read-group-ab's lag: a script counts
    dead = dead_letter_key(_spec("stream-a"), "read-group-a")
    admin.xadd(dead, {"$body": "1", "$codec": "json", "$dead:id": ids[0], "$dead:error": "boom"})
    before = sorted(admin.keys("*"))

    with role.config.broker() as broker:
        (stream,) = broker.stats("stream-a")
        assert stream.length == 2
        by_name = {g.group: g for g in stream.groups}
        assert (by_name["read-group-a"].lag, by_name["read-group-a"].dead_letters) == (0, 1)
        assert [c.name for c in by_name["read-group-a"].consumers] == ["stopped"]
        assert by_name["read-group-ab"].lag == 2
        (other,) = broker.stats("stream-c")
        assert [(g.group, g.created) for g in other.groups] == [("read-group-c", False)]
        assert [s.stream for s in broker.stats()] == ["stream-a", "stream-b", "stream-c"]
        assert [e.body for e in broker.read("stream-a")] == [0, 2]
        (letter,) = broker.dead_letters("stream-a", "read-group-a")
        assert (letter.event.id, letter.error) == (ids[0], "boom")

    (tmp_path / "streambroker.yaml").write_text(role.yaml)
    config = str(tmp_path / "streambroker.yaml")
    code, stdout, stderr = invoke("stats", "--config", config)
    assert code == 0, stderr
    assert "read-group-c (not created yet)" in stdout
    code, stdout, stderr = invoke("dead-letters", "stream-a", "read-group-a", "--config", config)
    assert code == 0, stderr
    assert "boom" in stdout
    assert '"tailed"' in tail_one(role, tmp_path)

    assert role.refused() == []
    after = sorted(admin.keys("*"))
    assert after == before
    # The operator changes nothing, not even through a script.
    with role.config.broker() as broker, pytest.raises(sb.PoolPermissionError):
        broker.collect_garbage("stream-a")


def test_the_readme_shows_the_roles() -> None:
    text = README.read_text()
    config = seed_config("localhost:6379")
    for name in ROLES:
        line = setuser_line(name, config, "PASSWORD")
        assert line in text, f"README.md does not show the {name} role as:\n{line}"
