"""Routing a round trip over the nodes of a Redis Cluster, without I/O.

The core emits one round trip (a :class:`~streambroker.core.effects.Send`) per pool; on a
cluster pool the I/O layers drive :func:`route` for it. It splits the commands into one
piece per node owning their hash slots (each node's commands in their order), asks the
I/O layer to send the pieces concurrently, puts the replies back in the round trip's
order, and sends again only the commands the cluster refused without running them
(``MOVED``, ``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``), after a refresh of the slot map.

A *unit* goes to nodes whole: one command, or a ``MULTI`` … ``EXEC`` block (its keys
share a slot). Commands without a key follow a rule each (:data:`KEYLESS`):

- ``any``: one node, that of the round trip's first keyed command (else a master):
  ``TIME``, ``PING``, ``ECHO``;
- ``every``: every master, their replies combined: ``SCRIPT LOAD``/``EXISTS``/``FLUSH``,
  ``DBSIZE`` (summed), ``FLUSHALL``, ``FLUSHDB``;
- ``written``: every node a command before it in the round trip went to, in the same
  piece (so on the connection that wrote): ``WAIT``, the least count prevailing.

Other commands without keys are refused (:class:`RoutingError`): a cluster rule must be
chosen for each before the broker sends it.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..errors import PoolError
from .effects import AnyCommand, arguments

__all__ = [
    "KEYLESS",
    "MAX_ROUNDS",
    "SLOTS",
    "Piece",
    "Pieces",
    "Refresh",
    "Refusal",
    "Routing",
    "RoutingError",
    "Topology",
    "Wait",
    "command_keys",
    "key_slot",
    "route",
    "split",
]

#: The hash slots of a Redis Cluster.
SLOTS = 16384
#: Rounds of a round trip at most: the first, then those sending refused commands again.
#: With the waits below, a round trip is held back less than a second in all: a
#: consumer's lease outlasts it, and a longer outage is the caller's to retry.
MAX_ROUNDS = 6
#: The wait before sending again what the cluster refused for the time being
#: (``TRYAGAIN``, ``CLUSTERDOWN``), doubled each round up to :data:`_MAX_WAIT` (seconds).
_FIRST_WAIT = 0.05
_MAX_WAIT = 0.2

Arg = str | bytes | int | float
Command = tuple[Arg, ...]
Rule = Literal["slot", "any", "every", "written"]

#: How each command without a key is routed (see the module's docstring).
KEYLESS: dict[str, Rule] = {
    "TIME": "any",
    "PING": "any",
    "ECHO": "any",
    "SCRIPT": "every",
    "DBSIZE": "every",
    "FLUSHALL": "every",
    "FLUSHDB": "every",
    "WAIT": "written",
}
#: Commands whose arguments after the name are all keys.
_ALL_KEYS = frozenset({"DEL", "UNLINK", "EXISTS", "TOUCH", "MGET"})
#: Commands whose key follows a subcommand.
_SUBCOMMAND_KEY = frozenset({"XINFO", "XGROUP", "MEMORY", "OBJECT"})


class RoutingError(Exception):
    """A round trip the cluster cannot run as asked: keys of one command in several hash
    slots, or a command without a key that has no cluster rule."""


def _bytes(word: Arg) -> bytes:
    if isinstance(word, bytes):
        return word
    return str(word).encode()


def key_slot(key: Arg) -> int:
    """The hash slot of ``key``: CRC16 of its hash tag (between the first ``{`` and the
    first ``}`` after it, when not empty), else of the whole key."""
    data = _bytes(key)
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


def _name(word: Arg) -> str:
    return word.decode(errors="replace").upper() if isinstance(word, bytes) else str(word).upper()


def command_keys(command: Command) -> Sequence[Arg]:
    """The keys ``command`` acts on (none for the commands of :data:`KEYLESS`)."""
    name = _name(command[0])
    if name in KEYLESS or name in ("MULTI", "EXEC", "DISCARD", "ASKING"):
        return ()
    if name in ("EVAL", "EVALSHA", "FCALL", "FCALL_RO"):
        count = int(command[2])
        return command[3 : 3 + count]
    if name in ("XREADGROUP", "XREAD"):
        for index, word in enumerate(command):
            if _name(word) == "STREAMS":
                rest = command[index + 1 :]
                return rest[: len(rest) // 2]
        return ()
    if name in _ALL_KEYS:
        return command[1:]
    if name in _SUBCOMMAND_KEY:
        return command[2:3]
    return command[1:2]


def _slot(command: Command) -> int | None:
    slots = {key_slot(key) for key in command_keys(command)}
    if len(slots) > 1:
        raise RoutingError(
            f"{_name(command[0])} touches keys of {len(slots)} hash slots: on a cluster, "
            "a command's keys must share one"
        )
    return slots.pop() if slots else None


@dataclass(slots=True)
class _Unit:
    """Commands ``start`` to ``stop`` (excluded) of the round trip, sent together."""

    start: int
    stop: int
    rule: Rule
    slot: int | None
    #: The node to send it to with ``ASKING`` (a slot being migrated), else None.
    ask: str | None = None
    #: Per node, the replies of a unit sent to several (``every``, ``written``).
    fanned: dict[str, Any] = field(default_factory=dict)


def _units(packed: Sequence[AnyCommand]) -> list[_Unit]:
    # The XADDs of a batch come packed: read back (on cluster pools only) for their keys.
    commands = [arguments(command) for command in packed]
    units: list[_Unit] = []
    index = 0
    while index < len(commands):
        name = _name(commands[index][0])
        if name == "MULTI":
            stop = index + 1
            while stop < len(commands) and _name(commands[stop][0]) not in ("EXEC", "DISCARD"):
                stop += 1
            stop = min(stop + 1, len(commands))
            slots = {s for c in commands[index:stop] if (s := _slot(c)) is not None}
            if len(slots) > 1:
                raise RoutingError("a MULTI block touches keys of several hash slots")
            units.append(_Unit(index, stop, "slot", slots.pop() if slots else None))
            index = stop
            continue
        slot = _slot(commands[index])
        if slot is None and name not in KEYLESS:
            raise RoutingError(f"no cluster rule for {name}, a command without a key")
        rule: Rule = "slot" if slot is not None else KEYLESS[name]
        units.append(_Unit(index, index + 1, rule, slot))
        index += 1
    return units


class Topology(Protocol):
    """What routing asks of the I/O layer's view of the cluster (nodes named
    ``host:port``)."""

    def owner(self, slot: int) -> str:
        """The master serving ``slot``."""

    def masters(self) -> list[str]:
        """Every master."""


@dataclass(slots=True)
class Piece:
    """The commands of a round trip going to one node, in the round trip's order."""

    node: str
    commands: list[AnyCommand] = field(default_factory=list)
    #: Per command: (its unit, its index in the round trip); index -1 for an ``ASKING``.
    origins: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class Pieces:
    """Send each piece to its node, concurrently; the result lists each piece's raw
    replies (error replies in place)."""

    pieces: list[Piece]


@dataclass(slots=True)
class Refresh:
    """Read the cluster's slot map again (the result is ignored)."""


@dataclass(slots=True)
class Wait:
    """Wait ``seconds`` before the next round."""

    seconds: float


Request = Pieces | Refresh | Wait


@dataclass(frozen=True, slots=True)
class Refusal:
    """A command the cluster refused without running it: ``kind`` is the error's code,
    ``node`` (``host:port``) where to send it for ``MOVED`` and ``ASK``."""

    kind: Literal["MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"]
    node: str = ""

    @classmethod
    def parse(cls, code: str, text: str) -> Refusal | None:
        """The refusal an error reply with ``code`` and the rest of its ``text`` means,
        or None (for ``MOVED 3999 127.0.0.1:6381``: code ``MOVED``, text ``3999 …``)."""
        if code in ("MOVED", "ASK"):
            words = text.split()
            return cls(code, words[1] if len(words) > 1 else "")  # type: ignore[arg-type]
        if code in ("TRYAGAIN", "CLUSTERDOWN"):
            return cls(code)  # type: ignore[arg-type]
        return None


def split(
    commands: Sequence[AnyCommand],
    topology: Topology,
    units: list[_Unit] | None = None,
    sending: Sequence[int] | None = None,
) -> list[Piece]:
    """The pieces sending ``commands`` (their units ``sending``, default all) to their
    nodes: per node, its commands in the round trip's order."""
    units = _units(commands) if units is None else units
    chosen = range(len(units)) if sending is None else sending
    pieces: dict[str, Piece] = {}

    def piece(node: str) -> Piece:
        found = pieces.get(node)
        if found is None:
            found = pieces[node] = Piece(node)
        return found

    first = next((u for u in (units[i] for i in chosen) if u.slot is not None), None)
    for index in chosen:
        unit = units[index]
        if unit.rule == "every":
            nodes = topology.masters()
        elif unit.rule == "written":
            nodes = [node for node, p in pieces.items() if p.commands] or topology.masters()[:1]
        elif unit.ask is not None:
            nodes = [unit.ask]
        elif unit.slot is not None:
            nodes = [topology.owner(unit.slot)]
        elif first is not None and first.slot is not None:
            nodes = [first.ask or topology.owner(first.slot)]
        else:
            nodes = topology.masters()[:1]
        for node in nodes:
            target = piece(node)
            for at in range(unit.start, unit.stop):
                if unit.ask is not None:
                    target.commands.append(("ASKING",))
                    target.origins.append((index, -1))
                target.commands.append(commands[at])
                target.origins.append((index, at))
    return list(pieces.values())


def _combine(command: Command, replies: Sequence[Any], is_error: Callable[[Any], bool]) -> Any:
    """One reply for a unit sent to several nodes: the first error, else by command."""
    for reply in replies:
        if is_error(reply):
            return reply
    name = _name(command[0])
    if name == "WAIT":
        return min(replies)
    if name == "DBSIZE":
        return sum(replies)
    if name == "SCRIPT" and _name(command[1]) == "EXISTS":
        return [int(all(held)) for held in zip(*replies, strict=True)]
    return replies[0]


def route(
    commands: Sequence[AnyCommand],
    topology: Topology,
    refusal: Callable[[Any], Refusal | None],
    is_error: Callable[[Any], bool],
) -> Generator[Request, Any, list[Any]]:
    """Run ``commands`` on the cluster: yields what the I/O layer must do, and returns
    the replies in the round trip's order (error replies in place).

    ``refusal`` tells what refusal a raw reply is (None: not one); ``is_error`` whether
    it is an error reply. A command refused in every one of :data:`MAX_ROUNDS` rounds
    keeps its refusal as its reply. A failure to send a piece (a connection error)
    propagates: nothing is sent again then, as commands of it may have run.
    """
    units = _units(commands)
    replies: list[Any] = [None] * len(commands)
    sending: list[int] = list(range(len(units)))
    wait = _FIRST_WAIT
    for attempt in range(MAX_ROUNDS):
        pieces = split(commands, topology, units, sending)
        results = yield Pieces(pieces)
        refused: dict[int, Refusal] = {}
        for piece, piece_replies in zip(pieces, results, strict=True):
            for (unit_index, at), reply in zip(piece.origins, piece_replies, strict=True):
                if at < 0:
                    continue  # the reply to ASKING
                unit = units[unit_index]
                found = refusal(reply)
                if found is not None and unit_index not in refused:
                    refused[unit_index] = found
                if unit.rule in ("every", "written"):
                    unit.fanned[piece.node] = reply
                else:
                    replies[at] = reply
        for index in sending:
            unit = units[index]
            if unit.rule in ("every", "written"):
                fanned = list(unit.fanned.values())
                command = arguments(commands[unit.start])
                replies[unit.start] = _combine(command, fanned, is_error)
        if not refused or attempt == MAX_ROUNDS - 1:
            break
        first_refused = min(refused)
        sending = sorted(
            set(refused) | {i for i in sending if units[i].rule == "written" and i > first_refused}
        )
        kinds = {found.kind for found in refused.values()}
        for index, found in refused.items():
            unit = units[index]
            # ASKING covers the next command only: a MULTI block waits for the
            # migration to end instead.
            single = unit.stop - unit.start == 1
            unit.ask = found.node if found.kind == "ASK" and single and found.node else None
            if unit.rule == "every":
                unit.fanned.clear()
        if kinds & {"MOVED", "CLUSTERDOWN"}:
            yield Refresh()
        if kinds & {"TRYAGAIN", "CLUSTERDOWN"} or any(
            found.kind == "ASK" and units[i].ask is None for i, found in refused.items()
        ):
            yield Wait(wait)
            wait = min(wait * 2, _MAX_WAIT)
    return replies


class Routing:
    """:func:`route` as the I/O layers drive it: perform :attr:`request`, hand what it
    gave to :meth:`resume`, until :attr:`done`; :attr:`replies` are then the replies. A
    command that no cluster rule routes raises :class:`~streambroker.PoolError` naming
    ``pool``."""

    request: Request

    def __init__(
        self,
        pool: str,
        commands: Sequence[AnyCommand],
        topology: Topology,
        refusal: Callable[[Any], Refusal | None],
        is_error: Callable[[Any], bool],
    ) -> None:
        self._pool = pool
        self._steps = route(commands, topology, refusal, is_error)
        self.done = False
        self.replies: list[Any] = []
        self.resume(None)

    def resume(self, result: Any) -> None:
        """Go on with what the request in progress gave (None for a refresh or a wait)."""
        try:
            self.request = self._steps.send(result)
        except StopIteration as stop:
            self.done = True
            self.replies = stop.value
        except RoutingError as exc:
            raise PoolError(self._pool, str(exc)) from None
