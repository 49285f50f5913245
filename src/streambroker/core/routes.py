"""Handlers per stream of a group, and typed bodies, free of I/O.

A group may have one handler for all its streams, or one per stream
(``@broker.handler(group, stream=..., model=...)``) beside a default one for the
rest. One consumer reads all the group's streams, so a batch may mix them:
:func:`router` makes the single handler the consumer calls, which hands each
handler the events of its streams, in order. With a ``model``, each event's body
is decoded into it first; an event that does not decode is failed with the
:class:`~streambroker.DecodeError` (delivered again, then a dead letter), and its
handler never sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DecodeError, InvalidArgumentError
from ..wire.events import Event

__all__ = ["Route", "check_kind", "check_routes", "router", "split"]


@dataclass(frozen=True)
class Route:
    """A handler of a group: for one stream (``stream``) or the rest (None)."""

    function: Callable[..., Any]
    stream: str | None = None
    model: Any = None


def check_routes(group: str, streams: Sequence[str], routes: Mapping[str | None, Route]) -> None:
    """Refuse handlers that leave some of the group's streams without one."""
    if None in routes:
        return
    missing = [stream for stream in streams if stream not in routes]
    if missing:
        raise InvalidArgumentError(
            f"consumer group {group!r} has handlers for {', '.join(map(repr, routes))} but "
            f"none for {', '.join(map(repr, missing))}: register one with stream= for "
            "each, or one without stream= for the rest"
        )


def split(
    routes: Mapping[str | None, Route], events: list[Event]
) -> list[tuple[Callable[..., Any], list[Event]]]:
    """The calls that hand ``events`` to their streams' handlers: (function, events),
    one per route in the order its first event came. Events a model does not fit are
    failed here and left out."""
    batches: dict[str | None, list[Event]] = {}
    for event in events:
        key = event.stream if event.stream in routes else None
        route = routes[key]
        if route.model is not None:
            try:
                event._set_body(event.decode(route.model))
            except DecodeError as exc:
                event.fail(exc)
                continue
        batches.setdefault(key, []).append(event)
    return [(routes[key].function, batch) for key, batch in batches.items()]


def check_kind(
    group: str, routes: Mapping[str | None, Route], function: Callable[..., Any]
) -> None:
    """Refuse mixing coroutine functions and plain functions among a group's handlers."""
    kinds = {inspect.iscoroutinefunction(route.function) for route in routes.values()}
    if kinds and inspect.iscoroutinefunction(function) not in kinds:
        raise InvalidArgumentError(
            f"the handlers of consumer group {group!r} must be all coroutine functions "
            "or all plain functions"
        )


def router(routes: Mapping[str | None, Route]) -> Callable[..., Any]:
    """The one handler a consumer of the group calls: a lone handler without a model
    as it is, else one that calls each handler with its events (a coroutine function
    when the handlers are)."""
    if set(routes) == {None} and routes[None].model is None:
        return routes[None].function
    if any(inspect.iscoroutinefunction(route.function) for route in routes.values()):

        async def route_async(events: list[Event]) -> None:
            for function, batch in split(routes, events):
                await function(batch)

        return route_async

    def route(events: list[Event]) -> None:
        for function, batch in split(routes, events):
            function(batch)

    return route
