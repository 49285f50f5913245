"""Loading the broker's server-side scripts ahead of use. I/O-free.

The broker sends each script by its SHA1 (``EVALSHA``), and its text (``EVAL``) only
when the server does not have it yet. A user the ACL allows ``EVALSHA`` but not
``EVAL`` therefore needs the scripts loaded beforehand, by a user that may: after
every restart of the server and every ``SCRIPT FLUSH``, since servers keep scripts
in memory only.
"""

from __future__ import annotations

from . import consuming, deadletters, gc, stats  # noqa: F401 - they make the scripts
from .effects import Op, Parallel, Send, scripts
from .state import BrokerCore

__all__ = ["load_scripts"]


def load_scripts(core: BrokerCore) -> Op[dict[str, int]]:
    """``SCRIPT LOAD`` every script of the broker on every pool; how many, per pool."""
    every = scripts()
    sends = [
        Send(pool, [("SCRIPT", "LOAD", script.text) for script in every])
        for pool in core.registry.pools
    ]
    yield Parallel(sends)
    return {send.pool: len(every) for send in sends}
