"""How a consumer hands events to its handler, and what a failure leaves behind. I/O-free.

The rules rest on the server's own delivery counter, so they hold across crashes:

- Events delivered for the first time are handed in batches of up to ``count``.
- An event delivered again is handed in smaller batches, halving with each delivery
  (``count``, ``count / 2``, ``count / 4``, …): a batch that keeps failing is split
  until the event that fails it is alone, as with bisection of failed batches.
- An event on its last allowed delivery (``max_deliveries``) is always handed alone.
  Before that, the consumer sets its delivery counter to :data:`LAST_DELIVERY_MARK`:
  if the consumer dies (or hangs past ``retry_after``) while handling it, whoever
  receives the event next sees the mark and sets it aside as a dead letter instead
  of handing it out again. An event delivered more often than allowed without such
  a mark (its batch-mate failed, its consumer stopped before reaching it) was never
  handed alone on a last delivery, so it is handed alone now.

So an event reaches the dead letters only after the handler was given it, alone,
and failed on it (raised, called ``fail()``, or died), and the dead letter records
the handler's own error and ``max_deliveries`` as its count.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator, Sequence

from ..wire.events import Event

__all__ = [
    "DIED_ON_LAST_DELIVERY",
    "LAST_DELIVERY_MARK",
    "batch_limit",
    "batches",
    "describe_failure",
    "died_on_last_delivery",
]

#: The delivery counter of an event handed alone on its last delivery, while it is
#: handled (far above any real count; the next delivery counts from it).
LAST_DELIVERY_MARK = 1 << 40

#: What the dead letter of an event says when its consumer died handling it.
DIED_ON_LAST_DELIVERY = (
    "its consumer stopped while handling it on its last delivery (the process died, "
    "or hung longer than retry_after)"
)

#: Frames of the handler's traceback a dead letter keeps (the innermost ones).
TRACEBACK_FRAMES = 3
#: The package's own files, every subpackage's (frames a dead letter leaves out).
_OWN_CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def died_on_last_delivery(deliveries: int) -> bool:
    """Whether an event's delivery counter says its last handling never finished."""
    return deliveries >= LAST_DELIVERY_MARK


def batch_limit(deliveries: int, count: int, max_deliveries: int) -> int:
    """The most events a batch holding an event of ``deliveries`` deliveries may have."""
    if deliveries >= max_deliveries:
        return 1
    return max(1, count >> (deliveries - 1))


def batches(events: Sequence[Event], count: int, max_deliveries: int) -> Iterator[list[Event]]:
    """``events`` in order, cut into the batches the rules above allow."""
    start = 0
    while start < len(events):
        limit = batch_limit(events[start].delivery_count, count, max_deliveries)
        end = start + 1
        while end < len(events) and end - start < limit:
            limit = min(limit, batch_limit(events[end].delivery_count, count, max_deliveries))
            if end - start >= limit:
                break
            end += 1
        yield list(events[start:end])
        start = end


def describe_failure(error: BaseException) -> str:
    """The handler's error as a dead letter keeps it: type, message, and where it was
    raised (the innermost frames), when it was raised."""
    text = f"{type(error).__qualname__}: {error}" if str(error) else type(error).__qualname__
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith(_OWN_CODE)
    ][-TRACEBACK_FRAMES:]
    lines = [f"  at {frame.filename}:{frame.lineno} in {frame.name}" for frame in frames]
    return "\n".join([text, *lines])
