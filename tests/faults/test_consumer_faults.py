"""Consumer processes under faults: killed at random, paused past ``retry_after``, and
poison events on each path by which a handler can fail."""

from __future__ import annotations

import random
import re
import time

import pytest

from ..conftest import Server
from .conftest import BUDGET, MakeScenario, scaled
from .streams import GROUPS, STREAMS

pytestmark = pytest.mark.timeout(BUDGET + 60)


def test_consumers_killed_at_random_while_a_producer_runs(
    server: Server, make_scenario: MakeScenario
) -> None:
    scenario = make_scenario(server)
    # Slow handlers hold their batches long enough for kills to land in them.
    consumers = [
        scenario.spawn(group, f"{group}-{i}", "slow", slow=0.05) for group in GROUPS for i in (1, 2)
    ]
    scenario.wait_running()
    scenario.produce(rate=250)
    chance = random.Random(7)
    kills = 0
    until = time.monotonic() + scaled(3.0)
    while time.monotonic() < until:
        scenario.run_for(chance.uniform(0.15, 0.4))
        kills += scenario.kill(chance.choice(consumers))
    report = scenario.finish()
    assert kills >= 6
    # Each was started again (the last one maybe only seen dead when they were stopped).
    assert sum(len(process.exits) for process in consumers) >= kills - 1
    assert report.redelivered > 0  # killed batches came again, to their own or another
    assert report.dead == {}


@pytest.mark.redis8  # takeovers: claims, and acknowledgements checked on the server
def test_consumers_paused_past_retry_after_then_resumed(
    server: Server, make_scenario: MakeScenario
) -> None:
    scenario = make_scenario(server)
    pairs = [
        [scenario.spawn(group, f"{group}-{i}", "slow", slow=0.05) for group in GROUPS]
        for i in (1, 2)
    ]
    scenario.wait_running()
    scenario.produce(rate=250)
    for _ in range(max(1, round(scaled(1)))):
        for paused in pairs:
            scenario.run_for(0.4)
            for process in paused:
                scenario.pause(process)
            # Past retry_after (0.5 s): the others take over; past the lease (1 s) too.
            scenario.run_for(1.3)
            for process in paused:
                scenario.resume(process)
    scenario.run_for(0.4)
    report = scenario.finish()
    assert report.redelivered > 0  # what the paused held was taken over
    assert report.dead == {}
    stderr = scenario.stderr()
    assert "taken over by another consumer" in stderr  # they noticed, and did not ack them
    assert "its lease expired" in stderr  # and took their names back, without a false alarm
    assert "the server lost data" not in stderr


POISON_ERROR = {
    "poison-fail": "PoisonError: poison {token}",
    "poison-raise": "PoisonError: poison {token}",
}


@pytest.mark.parametrize("mode", ["poison-fail", "poison-raise", "poison-kill"])
def test_only_poison_events_become_dead_letters(
    server: Server, make_scenario: MakeScenario, mode: str
) -> None:
    scenario = make_scenario(server, max_deliveries=3)
    for group in GROUPS:
        for i in (1, 2):
            scenario.spawn(group, f"{group}-{i}", mode)
    rate, seconds = 200, scaled(2.0)
    total = int(rate * seconds)
    # Each poison costs max_deliveries process starts on the kill path: fewer there.
    poisons = round(scaled(2 if mode == "poison-kill" else 4))
    at = [total * (k + 1) // (poisons + 1) for k in range(poisons)]
    producer = scenario.produce(rate=rate, poison=at)
    scenario.run_for(seconds)
    scenario.wait_for(lambda: producer.sent > at[-1], "the last poison event to be published")
    report = scenario.finish()
    poisoned = {token for token in report.published_to if token.endswith("-poison")}
    assert len(poisoned) == poisons, producer.errors
    assert {report.published_to[token] for token in poisoned} == set(STREAMS)
    for group in GROUPS:
        expected = {t for t in poisoned if group in STREAMS[report.published_to[t]]}
        assert report.dead_tokens(group) == expected, str(report)
        for letter in report.dead[group]:
            assert letter.deliveries == 3, str(report)
            if mode == "poison-kill":
                assert re.search(r"\b(stopped|died|killed)\b", letter.error), letter.error
            else:
                # The handler's exception, then the innermost frames of its traceback.
                first = letter.error.splitlines()[0]
                assert first == POISON_ERROR[mode].format(token=letter.token), letter.error
