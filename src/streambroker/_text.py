"""Wording shared by what the tool prints and the worker logs."""

from __future__ import annotations

__all__ = ["counted"]


def counted(number: int, noun: str) -> str:
    """``1 event``, ``2 events``: the number with the noun in the right number."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
