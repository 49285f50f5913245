"""What the command line, the dashboard and the worker show people: wording, durations,
rates, events as records, and text made safe for a terminal."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from ..core.stats import StreamStats
from ..errors import DecodeError
from ..wire.events import Event

__all__ = ["counted", "duration", "event_record", "event_time", "plain", "safe", "stats_rates"]


def counted(number: int, noun: str) -> str:
    """``1 event``, ``2 events``: the number with the noun in the right number."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


# Characters a terminal may act on instead of showing: C0 and C1 controls and DEL (escape
# sequences, bells, carriage returns, newlines), line and paragraph separators, and the
# bidirectional controls that reorder what is shown.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def safe(text: object) -> str:
    """``text`` with each character a terminal could act on written as an escape
    (``\\n``, ``\\r``, ``\\t``, else ``\\u001b`` and the like).

    Every string that came from a server or an event goes through it before it is
    printed. The escapes are those of JSON strings, so JSON text stays valid JSON.
    """
    return _UNSAFE.sub(lambda match: _ESCAPES.get(match[0]) or f"\\u{ord(match[0]):04x}", str(text))


def duration(seconds: float | None) -> str:
    """A short human duration: ``850ms``, ``12.5s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def stats_rates(
    before: Sequence[StreamStats], after: Sequence[StreamStats], seconds: float
) -> dict[str | tuple[str, str], float]:
    """Events per second between two statistics ``seconds`` apart: published to each
    stream (keyed by its name), acknowledged by each group (keyed by stream and group).

    A group acknowledged what was delivered to it and is no longer pending: the events
    published minus its growth in lag, minus its growth in pending events. Figures the
    server does not give (before Redis 7) are left out.
    """
    rates: dict[str | tuple[str, str], float] = {}
    previous = {stream.stream: stream for stream in before}
    for stream in after:
        old = previous.get(stream.stream)
        if old is None or old.entries_added is None or stream.entries_added is None:
            continue
        published = stream.entries_added - old.entries_added
        rates[stream.stream] = published / seconds
        old_groups = {group.group: group for group in old.groups}
        for group in stream.groups:
            was = old_groups.get(group.group)
            if was is not None:
                acked = published - (group.lag - was.lag) - (group.pending - was.pending)
                rates[(stream.stream, group.group)] = max(0, acked) / seconds
    return rates


def event_time(event_id: str) -> str:
    """The time of an event id, in ISO 8601 UTC to the millisecond
    (``2018-02-18T10:58:00.106Z``), or ``-`` when the id is not a time."""
    try:
        when = datetime.fromtimestamp(int(event_id.partition("-")[0]) / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return "-"
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_record(event: Event) -> dict[str, Any]:
    """An event as JSON-compatible values: ``stream``, ``id``, ``time`` (of the id, see
    :func:`event_time`), ``meta`` and ``body``, or ``error`` instead of the last two when
    the entry cannot be decoded."""
    record: dict[str, Any] = {"stream": event.stream, "id": event.id, "time": event_time(event.id)}
    try:
        record.update(meta=dict(event.meta), body=plain(event.body))
    except DecodeError as exc:
        record["error"] = str(exc)
    return record


def plain(value: Any) -> Any:
    """``value`` as JSON-compatible built-ins (bytes as base64, odd types as repr)."""
    return msgspec.to_builtins(value, str_keys=True, enc_hook=repr)
