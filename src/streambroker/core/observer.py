"""What a broker tells an observer (its metrics) as it works; free of I/O.

A broker has no observer by default, and then pays one ``is None`` test per round
trip for this. :class:`~streambroker.metrics.Metrics` is the observer that counts
for Prometheus.
"""

from __future__ import annotations

from typing import Literal, Protocol

__all__ = ["Observer", "Outcome"]

#: What became of delivered events: acknowledged after their handler, failed (to be
#: delivered again), or set aside as dead letters.
Outcome = Literal["acked", "failed", "dead_lettered"]


class Observer(Protocol):
    """Receives the broker's counts; each method must be quick and must not raise."""

    def published(self, pool: str, stream: str, count: int) -> None:
        """``count`` events were added to ``stream``."""

    def delivered(self, pool: str, stream: str, group: str, outcome: Outcome, count: int) -> None:
        """``count`` events of ``stream`` delivered to ``group`` ended as ``outcome``."""

    def handled(self, group: str, consumer: str, seconds: float) -> None:
        """A handler of ``group`` took ``seconds`` over one batch."""

    def collected(self, pool: str, stream: str, count: int) -> None:
        """Garbage collection removed ``count`` events of ``stream``."""
