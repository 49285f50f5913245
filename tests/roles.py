"""Least-privilege ACL roles for the broker's users, in one place: the role tests create
their users from these rules, and the README must show exactly these lines.

Key patterns come from the functions that name the broker's keys (a ``*`` where a
group or consumer name goes), so they follow the key names. Commands a script runs
are checked against the user's rules too, so each role lists them as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import streambroker as sb
from streambroker.wire.keys import dead_letter_key, lease_key, replay_key

__all__ = ["ROLES", "role_rules", "setuser_line"]

#: Every connection names itself (``CLIENT SETNAME``) and selects its pool's database.
CONNECTING = ("+client|setname", "+select")
#: Scripts are sent as EVAL, or as EVALSHA when the server has them already (which
#: ``SCRIPT EXISTS`` asks).
SCRIPTS = ("+eval", "+evalsha", "+script|exists")

#: Publishing: ``XADD`` and nothing else, to the streams only.
PUBLISHER = ("+xadd",)
#: Consuming: groups, reads, acknowledgements, reclaims and heartbeats (XCLAIM,
#: XAUTOCLAIM), dead letters and their replay (XADD, XRANGE, XREVRANGE, XDEL, MULTI
#: and EXEC for one too large for a script), garbage collection (EXISTS, XINFO,
#: XPENDING, XTRIM, XDEL), leases (GET, SET, PEXPIRE, PTTL, DEL) and forgetting
#: consumers (XGROUP DELCONSUMER).
CONSUMER = (
    "+xgroup|create",
    "+xgroup|createconsumer",
    "+xgroup|delconsumer",
    "+xreadgroup",
    "+xack",
    "+xclaim",
    "+xautoclaim",
    "+xpending",
    "+xinfo|groups",
    "+xinfo|consumers",
    "+xrange",
    "+xrevrange",
    "+xadd",
    "+xdel",
    "+xtrim",
    "+exists",
    "+get",
    "+set",
    "+pexpire",
    "+pttl",
    "+del",
    "+multi",
    "+exec",
)
#: Statistics (TIME, XINFO, XPENDING, XLEN, EXISTS on leases, a script counting a lag
#: the server cannot tell), ``tail`` (XREAD) and listing dead letters (XRANGE).
OPERATOR = (
    "+time",
    "+xinfo|stream",
    "+xinfo|groups",
    "+xinfo|consumers",
    "+xpending",
    "+xlen",
    "+exists",
    "+xread",
    "+xrange",
    "+xrevrange",
    "+memory|usage",
)

ROLES = ("publisher", "consumer", "operator")


def role_rules(
    role: str, config: sb.ValidatedRegistry, groups: Sequence[str] | None = None
) -> list[str]:
    """The ACL rules of ``role`` for every stream and group of ``config`` (a consumer:
    of ``groups`` and the streams they read, when given).

    Collecting a stream covers the replay streams of all its groups, so a consumer
    may touch every side key of the streams it reads.
    """
    groups = list(config.groups) if groups is None else list(groups)
    specs = list(config.streams.values())
    if role == "publisher":
        keys = [f"%W~{spec.key}" for spec in specs]
        return [*CONNECTING, *PUBLISHER, *keys]
    if role == "consumer":
        specs = [spec for spec in specs if any(g in spec.groups for g in groups)]
    streams = [spec.key for spec in specs]
    side = [key for s in specs for key in (dead_letter_key(s, "*"), replay_key(s, "*"))]
    leases = [lease_key(config.key_prefix, group, "*") for group in groups]
    if role == "consumer":
        keys = [f"~{key}" for key in (*streams, *side, *leases)]
        return [*CONNECTING, *CONSUMER, *SCRIPTS, *keys]
    if role == "operator":
        # A script's key must be writable, so the streams and dead letters are not
        # read-only patterns; the user's commands only read, and so does any script it
        # runs (the lag count, the listing of dead letters).
        dead = [dead_letter_key(s, "*") for s in specs]  # listed by a script: ~ too
        replays = [replay_key(s, "*") for s in specs]
        keys = [f"~{key}" for key in (*streams, *dead)]
        keys += [f"%R~{key}" for key in (*replays, *leases)]
        return [*CONNECTING, *OPERATOR, *SCRIPTS, *keys]
    raise ValueError(f"no role {role!r}")


def setuser_line(
    role: str, config: sb.ValidatedRegistry, password: str, groups: Sequence[str] | None = None
) -> str:
    """The ``ACL SETUSER`` command that makes the user ``role`` from scratch."""
    rules = role_rules(role, config, groups)
    return " ".join(["ACL SETUSER", role, "reset", "on", f">{password}", *rules])
