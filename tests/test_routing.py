"""Routing a round trip over a cluster's nodes, without a server: hash slots as Redis
computes them, the pieces per node, the replies put back in order, and what is sent
again after each kind of refusal (against a model of a cluster whose slots move)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot as redis_key_slot

from streambroker.core import routing
from streambroker.core.routing import Pieces, Refresh, Refusal, RoutingError, Wait, key_slot, route

NODES = ["n1:1", "n2:2", "n3:3"]


class Model:
    """A cluster of three nodes: ``owners`` is the truth, ``view`` what the client knows
    (brought up to date by a refresh). Each command is answered by its text; a node that
    does not own a keyed command's slot answers MOVED."""

    def __init__(self) -> None:
        self.owners = {slot: NODES[slot * 3 // routing.SLOTS] for slot in range(routing.SLOTS)}
        self.view = dict(self.owners)
        self.ran: list[tuple[str, routing.Command]] = []
        self.refreshes = 0
        self.requests: list[str] = []

    def owner(self, slot: int) -> str:
        return self.view[slot]

    def masters(self) -> list[str]:
        return list(NODES)

    def answer(self, node: str, commands: list[routing.Command]) -> list[Any]:
        replies: list[Any] = []
        asking = False
        for command in commands:
            name = str(command[0])
            keys = routing.command_keys(command)
            if name == "ASKING":
                asking = True
                replies.append("OK")
                continue
            if keys and self.owners[key_slot(keys[0])] != node and not asking:
                replies.append(("MOVED", self.owners[key_slot(keys[0])]))
            elif name == "WAIT":
                replies.append(NODES.index(node) + 1)
            else:
                self.ran.append((node, command))
                replies.append(("ran", command))
            asking = False
        return replies


def refusal(reply: Any) -> Refusal | None:
    if isinstance(reply, tuple) and reply[0] in ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"):
        return Refusal(reply[0], reply[1] if len(reply) > 1 else "")
    return None


def is_error(reply: Any) -> bool:
    return refusal(reply) is not None


def drive(model: Model, commands: list[routing.Command], answer: Any = None) -> list[Any]:
    answer = answer or model.answer
    steps = route(commands, model, refusal, is_error)
    result: Any = None
    try:
        while True:
            request = steps.send(result)
            if not isinstance(request, Pieces):
                model.requests.append(type(request).__name__)
            if isinstance(request, Pieces):
                result = [answer(piece.node, piece.commands) for piece in request.pieces]
            elif isinstance(request, Refresh):
                model.view = dict(model.owners)
                model.refreshes += 1
                result = None
            else:
                assert isinstance(request, Wait)
                result = None
    except StopIteration as stop:
        return list(stop.value)


keys = st.text(alphabet="ab{}xyz1", min_size=0, max_size=8)


@given(st.binary(max_size=20) | st.text(max_size=12))
def test_slots_are_those_of_redis(key: bytes | str) -> None:
    assert key_slot(key) == redis_key_slot(key if isinstance(key, bytes) else key.encode())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["XADD", "XLEN", "TIME", "WAIT", "DEL"]), keys)))
def test_replies_come_back_in_order(picked: list[tuple[str, str]]) -> None:
    commands: list[routing.Command] = []
    for name, key in picked:
        if name == "TIME":
            commands.append(("TIME",))
        elif name == "WAIT":
            commands.append(("WAIT", 1, 10))
        else:
            commands.append((name, key))
    model = Model()

    replies = drive(model, commands)

    for command, reply in zip(commands, replies, strict=True):
        if command[0] == "WAIT":
            assert isinstance(reply, int)
        else:
            assert reply == ("ran", command)
    # Each node got its own commands in the round trip's order, each once.
    for node in NODES:
        mine = [c for n, c in model.ran if n == node]
        assert mine == [c for c in commands if c in mine]
    assert len(model.ran) == len([c for c in commands if c[0] != "WAIT"])


@settings(max_examples=100, deadline=None)
@given(st.lists(keys, min_size=1, max_size=30), st.integers(0, routing.SLOTS - 1))
def test_moved_commands_run_once_on_their_new_owner(names: list[str], moved: int) -> None:
    model = Model()
    commands: list[routing.Command] = [("XADD", name) for name in names]
    # Every slot of the first key, and one more, moved to another node unknown to the view.
    for slot in (key_slot(names[0]), moved):
        model.owners[slot] = NODES[(NODES.index(model.owners[slot]) + 1) % 3]

    replies = drive(model, commands)

    assert replies == [("ran", c) for c in commands]
    assert sorted(c[1] for _, c in model.ran) == sorted(names)  # none twice, none lost
    assert all(model.owners[key_slot(c[1])] == node for node, c in model.ran)
    assert model.refreshes == 1


def test_wait_goes_to_each_node_written_and_the_least_count_wins() -> None:
    model = Model()
    first = next(k for k in "abcdefgh" if model.owner(key_slot(k)) == NODES[0])
    third = next(k for k in "abcdefgh" if model.owner(key_slot(k)) == NODES[2])
    commands: list[routing.Command] = [("XADD", third), ("XADD", first), ("WAIT", 1, 10)]

    pieces = routing.split(commands, model)

    assert sorted(p.node for p in pieces) == [NODES[0], NODES[2]]
    assert all(p.commands[-1] == ("WAIT", 1, 10) for p in pieces)
    assert drive(model, commands)[2] == 1  # node 1 answers 1, node 3 answers 3


def test_script_commands_go_to_every_master() -> None:
    model = Model()
    commands: list[routing.Command] = [("SCRIPT", "EXISTS", "a", "b")]
    answers = {NODES[0]: [[1, 1]], NODES[1]: [[1, 0]], NODES[2]: [[1, 1]]}

    replies = drive(model, commands, lambda node, _: answers[node])

    assert replies == [[1, 0]]


def test_a_multi_block_stays_together_and_is_sent_again_whole() -> None:
    model = Model()
    block: list[routing.Command] = [("MULTI",), ("XADD", "{s}a"), ("XACK", "{s}b"), ("EXEC",)]
    slot = key_slot("s")
    model.owners[slot] = NODES[(NODES.index(model.owners[slot]) + 1) % 3]

    replies = drive(model, [("XLEN", "other"), *block])

    assert replies[1:] == [("ran", c) for c in block]
    assert [c for n, c in model.ran if n == model.owners[slot]][-4:] == block


def test_ask_is_sent_with_asking_and_tryagain_waits() -> None:
    model = Model()
    seen: list[list[routing.Command]] = []
    rounds = iter([[("ASK", NODES[1])], ["OK", ("TRYAGAIN",)], None])

    def answer(node: str, commands: list[routing.Command]) -> list[Any]:
        seen.append(commands)
        scripted = next(rounds)
        return scripted if scripted is not None else model.answer(node, commands)

    requests: list[str] = []

    def recorded(node: str, commands: list[routing.Command]) -> list[Any]:
        requests.append("Pieces")
        return answer(node, commands)

    assert drive(model, [("XADD", "k")], recorded) == [("ran", ("XADD", "k"))]
    assert seen[1] == [("ASKING",), ("XADD", "k")]
    assert requests == ["Pieces", "Pieces", "Pieces"]
    assert model.requests == ["Wait"]


def test_refusals_stop_after_the_last_round() -> None:
    model = Model()
    replies = drive(model, [("XADD", "k")], lambda node, _: [("CLUSTERDOWN",)])
    assert replies == [("CLUSTERDOWN",)]


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        ([("XREADGROUP", "GROUP", "g", "c", "STREAMS", "a", "b", ">", ">")], "2 hash slots"),
        ([("MULTI",), ("XADD", "a"), ("XADD", "b"), ("EXEC",)], "several hash slots"),
        ([("INFO",)], "no cluster rule for INFO"),
    ],
)
def test_what_a_cluster_cannot_run_is_refused(
    commands: list[routing.Command], expected: str
) -> None:
    with pytest.raises(RoutingError, match=expected):
        routing.split(commands, Model())
