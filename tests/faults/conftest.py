"""Fixtures of the fault suite: a :class:`Scenario` runs consumer processes and producer
threads on one real server, the test injects faults, and :meth:`Scenario.finish` ends
with the checker's verdict.

``STREAMBROKER_FAULTS_SCALE`` (default 1; ``./run soak`` sets 10) multiplies how long
the producers run, and so how many faults each scenario injects.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

import streambroker as sb
from streambroker.wire.keys import lease_key

from ..conftest import Server, _require_binary, server_kinds
from .checker import Letter, Report, check
from .consumer import judge
from .producer import Producer
from .streams import STREAMS, registry

ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("STREAMBROKER_FAULTS_SCALE", "1"))
#: Consumer options that make takeovers, lease expiry and retries take a second or less.
FAST: dict[str, Any] = {"retry_after": 0.5, "lease": 1.0, "block_timeout": 0.2, "retry_delay": 0.01}
#: The hard deadline of one scenario (seconds); the test fails with the report there.
BUDGET = 60.0 + 20.0 * SCALE
#: Draining fails when nothing moved (no handling logged, no stream or pending count
#: changed) for this long: consumers are wedged.
STALL = 8.0


def scaled(seconds: float) -> float:
    """``seconds`` of fault injection, times the soak scale."""
    return seconds * SCALE


@dataclass
class Process:
    """A consumer process (:mod:`tests.faults.consumer`), started again when it dies."""

    name: str
    group: str
    settings: dict[str, Any]
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid


class Scenario:
    """Consumers, producers and faults on ``server``, logged for the checker in
    ``directory``; every wait is bounded by the scenario's deadline."""

    def __init__(self, server: Server, directory: Path, max_deliveries: int) -> None:
        self.server = server
        self.logs = directory / "logs"
        self.logs.mkdir(parents=True)
        self.config = registry(server.address)
        self.max_deliveries = max_deliveries
        self.deadline = time.monotonic() + BUDGET
        self.consumers: list[Process] = []
        self.producers: list[Producer] = []
        self._lock = threading.Lock()
        self._finishing = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()
        self._broker: sb.Broker | None = None
        self._unexpected_exits: list[str] = []

    # -- processes ------------------------------------------------------------------

    def spawn(self, group: str, name: str, mode: str = "record", *, slow: float = 0.0) -> Process:
        """Start a consumer process (see :mod:`tests.faults.consumer` for ``mode`` and
        ``slow``); the faces alternate, sync first."""
        settings = {
            "address": self.server.address,
            "group": group,
            "name": name,
            "mode": mode,
            "face": ("sync", "async")[len(self.consumers) % 2],
            "count": 10,
            "slow": slow,
            "logs": str(self.logs),
            "options": {**FAST, "max_deliveries": self.max_deliveries},
        }
        process = Process(name, group, settings)
        with self._lock:
            self._start(process)
            self.consumers.append(process)
        return process

    def _ready(self, process: Process) -> Path:
        """The file the current start of ``process`` creates once SIGTERM stops it gracefully."""
        return self.logs / f"{process.name}-{process.starts}.ready"

    def _start(self, process: Process) -> None:
        process.starts += 1
        process.settings["ready"] = str(self._ready(process))
        errors = open(self.logs / f"{process.name}-{process.starts}.stderr", "wb")  # noqa: SIM115
        process.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.consumer", json.dumps(process.settings)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        errors.close()

    def _supervise(self) -> None:
        """Start again every consumer that died (killed, or by its own hand)."""
        while not self._finishing.wait(0.05):
            with self._lock:
                for process in self.consumers:
                    assert process.popen is not None
                    code = process.popen.poll()
                    if code is None or self._finishing.is_set():
                        continue
                    process.exits.append(code)
                    if code != -signal.SIGKILL:
                        self._unexpected_exits.append(
                            f"consumer {process.name} (pid {process.pid}) exited with {code}: "
                            f"{self._stderr_tail(process)}"
                        )
                    self._start(process)

    def wait_running(self) -> None:
        """Wait until every consumer holds its lease: its ``consume()`` is past its start,
        so faults injected from now on find it running."""
        client = self.client()
        try:
            self.wait_for(
                lambda: all(client.exists(lease_key("", p.group, p.name)) for p in self.consumers),
                "every consumer to start consuming",
            )
        finally:
            client.close()

    def kill(self, process: Process) -> bool:
        """SIGKILL ``process`` (it is started again under the same name); False when it
        had died already and was not started again yet."""
        with self._lock:
            assert process.popen is not None
            if process.popen.poll() is not None:
                return False
            process.popen.send_signal(signal.SIGKILL)
            return True

    def pause(self, process: Process) -> None:
        """SIGSTOP ``process``."""
        assert process.popen is not None
        process.popen.send_signal(signal.SIGSTOP)

    def resume(self, process: Process) -> None:
        """SIGCONT ``process``."""
        assert process.popen is not None
        process.popen.send_signal(signal.SIGCONT)

    def stderr(self) -> str:
        """Everything the consumer processes wrote to stderr (their log lines)."""
        return "\n".join(
            path.read_text(errors="replace") for path in sorted(self.logs.glob("*.stderr"))
        )

    def _stderr_tail(self, process: Process, lines: int = 3) -> str:
        path = self.logs / f"{process.name}-{process.starts}.stderr"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(line[:300] for line in text.strip().splitlines()[-lines:])

    # -- producers --------------------------------------------------------------------

    def produce(self, name: str = "p", **options: Any) -> Producer:
        """Start a producer thread (options of :class:`Producer`)."""
        producer = Producer(self.config, self.logs, name, **options)
        self.producers.append(producer)
        producer.start()
        return producer

    def run_for(self, seconds: float) -> None:
        """Let things run for ``seconds`` (within the deadline)."""
        self.wait_for(lambda: False, f"{seconds} s to pass", seconds, expire=True)

    # -- waiting and the verdict --------------------------------------------------------

    def wait_for(
        self,
        condition: Callable[[], object],
        what: str,
        timeout: float = 30.0,
        *,
        expire: bool = False,
    ) -> None:
        """Poll ``condition``; fail with the report after ``timeout`` (or the deadline).
        With ``expire``, running out of ``timeout`` is the normal end."""
        until = time.monotonic() + timeout
        while not condition():
            now = time.monotonic()
            if expire and now >= until:
                return
            if now >= min(until, self.deadline):
                self.fail(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)

    @property
    def broker(self) -> sb.Broker:
        """The scenario's own broker, for dead letters, reading and collecting."""
        if self._broker is None:
            self._broker = self.config.broker(socket_timeout=5.0)
        return self._broker

    def client(self) -> redis.Redis:
        return self.server.client()

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """The length of each stream, and the pending count of each (stream, group)."""
        client = self.client()
        try:
            lengths = {stream: int(client.xlen(stream)) for stream in STREAMS}
            pending: dict[str, int] = {}
            for stream, groups in STREAMS.items():
                for group in groups:
                    try:
                        pending[f"{stream}/{group}"] = int(
                            client.xpending(stream, group)["pending"]
                        )
                    except redis.ResponseError:
                        pending[f"{stream}/{group}"] = 0  # no group: nothing pending
            return lengths, pending
        finally:
            client.close()

    def _handled_size(self) -> int:
        return sum(path.stat().st_size for path in self.logs.glob("handled-*.jsonl"))

    def drain(self) -> None:
        """Wait until every stream is empty and nothing is pending; fail with the report
        at the deadline, or when nothing moved for :data:`STALL` seconds."""
        moved_at = time.monotonic()
        last: object = None
        while True:
            try:
                lengths, pending = self.counts()
            except redis.RedisError as exc:
                lengths, pending = {"error": str(exc)}, {}  # type: ignore[dict-item]
            if not any(lengths.values()) and not any(pending.values()):
                return
            now = time.monotonic()
            state = (self._handled_size(), lengths, pending)
            if state != last:
                last, moved_at = state, now
            if now - moved_at > STALL:
                self.fail(f"stalled: nothing moved for {STALL} s while draining")
            if now > self.deadline:
                self.fail("timed out while draining")
            time.sleep(0.1)

    def letters(self) -> list[Letter]:
        """Every group's dead letters."""
        letters = []
        for stream, groups in STREAMS.items():
            for group in groups:
                for letter in self.broker.dead_letters(stream, group, limit=10_000):
                    letters.append(
                        Letter(
                            stream,
                            group,
                            letter.event.id,
                            judge(letter.event)[0],
                            letter.deliveries,
                            letter.error,
                        )
                    )
        return letters

    def stored(self) -> list[tuple[str, str | None, str]]:
        """(stream, token, id) of every entry the streams hold."""
        return [
            (stream, judge(event)[0], event.id)
            for stream in STREAMS
            for event in self.broker.read(stream, count=100_000)
        ]

    def report(self) -> Report:
        """The checker's verdict on what the logs and the server say now."""
        return check(
            self.logs,
            STREAMS,
            self.max_deliveries,
            dead_letters=self.letters(),
            stored=self.stored(),
        )

    def state(self) -> str:
        """Streams, pending counts, processes and producers, for a failure message."""
        try:
            lengths, pending = self.counts()
            counts = f"stream lengths {lengths}, pending {pending}"
        except redis.RedisError as exc:
            counts = f"cannot read the server: {exc}"
        lines = [counts]
        for process in self.consumers:
            alive = process.popen is not None and process.popen.poll() is None
            lines.append(
                f"consumer {process.name} ({process.group}, {process.settings['mode']}, "
                f"{process.settings['face']}): started {process.starts} times, exits "
                f"{process.exits}, {'running' if alive else 'not running'}; stderr: "
                f"{self._stderr_tail(process)}"
            )
        for producer in self.producers:
            lines.append(f"producer {producer.producer}: {producer.counts}, {producer.errors[:3]}")
        lines.extend(self._unexpected_exits)
        return "\n".join(lines)

    def fail(self, why: str) -> None:
        """Fail the test with ``why``, the checker's report and the state."""
        try:
            report = str(self.report())
        except sb.BrokerError as exc:
            report = f"(no report: {exc})"
        pytest.fail(f"{why}\n{report}\n{self.state()}", pytrace=False)

    def stop_consumers(self) -> None:
        """SIGTERM every consumer and wait for it to exit 0."""
        self._finishing.set()
        self._supervisor.join(timeout=10)
        with self._lock:
            for process in self.consumers:
                assert process.popen is not None
                process.popen.send_signal(signal.SIGCONT)
            for process in self.consumers:
                # One started again just now may still be importing: SIGTERM would kill it.
                popen, ready = process.popen, self._ready(process)
                assert popen is not None
                self.wait_for(
                    lambda p=popen, r=ready: r.exists() or p.poll() is not None,
                    f"consumer {process.name} to handle SIGTERM",
                )
                if popen.poll() is None:
                    popen.send_signal(signal.SIGTERM)
            for process in self.consumers:
                assert process.popen is not None
                try:
                    code = process.popen.wait(timeout=max(10.0, self.deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.popen.kill()
                    code = process.popen.wait(timeout=10)
                    self._unexpected_exits.append(
                        f"consumer {process.name} did not stop on SIGTERM: "
                        f"{self._stderr_tail(process)}"
                    )
                if code != 0:
                    self._unexpected_exits.append(
                        f"consumer {process.name} exited with {code} on SIGTERM: "
                        f"{self._stderr_tail(process)}"
                    )

    def finish(self) -> Report:
        """Stop the producers, let the consumers drain, stop them, collect, and check:
        nothing lost, unexpected or duplicated without cause, streams empty."""
        for producer in self.producers:
            producer.stop()
        self.drain()
        self.stop_consumers()
        self.broker.collect_garbage()
        lengths, pending = self.counts()
        report = self.report()
        problems = report.problems + self._unexpected_exits
        if any(lengths.values()) or any(pending.values()):
            problems.append(f"not drained: stream lengths {lengths}, pending {pending}")
        if problems:
            pytest.fail(
                f"{len(problems)} problems\n{report}\n{self.state()}",
                pytrace=False,
            )
        print(report, self.state(), sep="\n")  # shown when a later assertion fails
        return report

    def close(self) -> None:
        """Kill whatever still runs (a failed scenario leaves nothing behind)."""
        self._finishing.set()
        self._supervisor.join(timeout=10)
        for producer in self.producers:
            if producer.is_alive():
                producer.stop()
        for process in self.consumers:
            if process.popen is not None and process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait(timeout=10)
        if self._broker is not None:
            self._broker.close()


MakeScenario = Callable[..., Scenario]


@pytest.fixture
def make_scenario(tmp_path: Path) -> Iterator[MakeScenario]:
    """``make_scenario(server, max_deliveries=20)``: a scenario, cleaned up after the test."""
    made: list[Scenario] = []

    def make(server: Server, max_deliveries: int = 20) -> Scenario:
        scenario = Scenario(server, tmp_path / f"scenario-{len(made)}", max_deliveries)
        made.append(scenario)
        return scenario

    yield make
    for scenario in made:
        scenario.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Scenarios that start (and kill) servers of their own take ``kind``: each server
    kind in turn (Redis 8.2 too when marked ``redis8``)."""
    if "kind" in metafunc.fixturenames:
        metafunc.parametrize("kind", server_kinds(metafunc))


MakeServer = Callable[..., Server]


@pytest.fixture
def own_server(kind: str, tmp_path: Path) -> Iterator[MakeServer]:
    """``own_server(*args)``: a started server of ``kind`` with those arguments (e.g.
    persistence), on a port and directory of its own; stopped after the test."""
    started: list[Server] = []

    def make(*args: str) -> Server:
        server = Server(kind, _require_binary(kind), tmp_path / f"server-{len(started)}")
        server.extra_args = args
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
