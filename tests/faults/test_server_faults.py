"""The server under faults while producers and consumers run: killed and restarted
with and without persistence, connections killed in storms, memory exhausted."""

from __future__ import annotations

import random
import time

import pytest

from ..conftest import Server
from ..servers import AOF_PERSISTENCE, NO_PERSISTENCE
from .checker import FAILED, OK, UNKNOWN, mark_data_loss
from .conftest import BUDGET, MakeScenario, MakeServer, Scenario, scaled
from .streams import GROUPS

#: Each on Redis 8.2 too: what the server does under faults is what these scenarios test.
pytestmark = [pytest.mark.timeout(BUDGET + 60), pytest.mark.redis8]


def spawn_consumers(scenario: Scenario) -> None:
    """Two consumers per group (one of each face)."""
    for group in GROUPS:
        for i in (1, 2):
            scenario.spawn(group, f"{group}-{i}")


def restarted_server(
    own_server: MakeServer, make_scenario: MakeScenario, *, persistent: bool, down: float
) -> tuple[Scenario, int]:
    """A scenario on a server of its own, SIGKILLed and restarted a few times while events
    flow (without persistence, marking each loss of data); the scenario, and the events
    published ok before the last restart."""
    server = own_server(*(AOF_PERSISTENCE if persistent else NO_PERSISTENCE))
    scenario = make_scenario(server)
    spawn_consumers(scenario)
    scenario.wait_running()
    scenario.produce(rate=250)
    for _ in range(max(2, round(scaled(2)))):
        scenario.run_for(0.8)
        server.kill()
        if not persistent:
            mark_data_loss(scenario.logs)
        if down:
            scenario.run_for(down)
        server.start()
    return scenario, scenario.producers[0].counts[OK]


def test_server_killed_and_restarted_with_append_only_persistence(
    own_server: MakeServer, make_scenario: MakeScenario
) -> None:
    scenario, _ = restarted_server(own_server, make_scenario, persistent=True, down=0.3)
    scenario.run_for(0.8)
    report = scenario.finish()
    # The outages were felt, and yet every publish that succeeded was handled.
    producer = scenario.producers[0]
    assert producer.counts[UNKNOWN] + producer.counts[FAILED] > 0
    assert report.excused == 0
    assert "reconnected after" in scenario.stderr()  # each consumer came back by itself


def test_server_restarted_without_persistence(
    own_server: MakeServer, make_scenario: MakeScenario
) -> None:
    scenario, published = restarted_server(own_server, make_scenario, persistent=False, down=0.0)
    scenario.run_for(1.0)
    report = scenario.finish()
    # After the last loss, the groups came back and what was published was handled.
    assert scenario.producers[0].counts[OK] > published
    assert "recreating" in scenario.stderr()
    assert report.lost == []


def test_client_kill_storms(server: Server, make_scenario: MakeScenario) -> None:
    scenario = make_scenario(server)
    spawn_consumers(scenario)
    scenario.wait_running()
    scenario.produce(rate=250)
    admin = server.client()
    chance = random.Random(3)
    storms = killed = 0
    until = time.monotonic() + scaled(3.0)
    while time.monotonic() < until:
        scenario.run_for(chance.uniform(0.05, 0.3))
        for _ in range(chance.randint(1, 4)):
            killed += int(admin.client_kill_filter(_type="normal", skipme=True))
        storms += 1
    admin.close()
    scenario.finish()
    assert storms >= 10
    assert killed >= storms  # every storm cut connections
    assert "reconnected after" in scenario.stderr()  # the consumers came back by themselves


def test_consumers_started_during_out_of_memory_drain_it(
    own_server: MakeServer, make_scenario: MakeScenario
) -> None:
    server = own_server(*NO_PERSISTENCE, "--maxmemory-policy", "noeviction")
    admin = server.client()
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 3_000_000)
    scenario = make_scenario(server)
    # Fast enough to fill the server in a few seconds with nobody consuming.
    producer = scenario.produce(rate=2000, pad=1000, max_batch=20)
    scenario.wait_for(lambda: producer.out_of_memory >= 20, "publishing to fail with OOM")
    ok_in_oom = producer.counts[OK]
    producer.rate = 200
    spawn_consumers(scenario)
    scenario.wait_for(
        lambda: producer.counts[OK] >= ok_in_oom + 100,
        "publishing to work again once the consumers started in the OOM drained it",
        timeout=scaled(15.0),
    )
    scenario.run_for(scaled(1.0))
    scenario.finish()
    admin.close()
