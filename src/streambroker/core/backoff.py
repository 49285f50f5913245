"""Jittered exponential back-off, for retrying events and reconnecting."""

from __future__ import annotations

import random

__all__ = ["backoff"]


def backoff(attempt: int, base: float, cap: float) -> float:
    """The delay before try number ``attempt`` (1, 2, ...): ``base`` doubling up to
    ``cap``, then scaled by a random factor in [0.5, 1] so that many consumers that
    failed together do not retry together."""
    delay = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 30))
    jitter: float = random.uniform(0.5, 1.0)
    return delay * jitter
