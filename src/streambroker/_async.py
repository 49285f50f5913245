"""The asyncio I/O layer: performs the core's effects with redis.asyncio and tasks."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions as rex

from ._effects import Handle, Op, Parallel, ReplyError, Send, Sleep, translate_error
from .config import ValidatedRegistry
from .connection import ConnectionOptions, async_client
from .errors import BrokerError

T = TypeVar("T")

Handler = Callable[[Any], object]

log = logging.getLogger("streambroker")


class AsyncDriver:
    """Runs operations against one asyncio client per pool, made on first use."""

    def __init__(self, registry: ValidatedRegistry, options: ConnectionOptions) -> None:
        self._registry = registry
        self.options = options
        self._clients: dict[str, redis.asyncio.Redis] = {}
        self._making: dict[str, asyncio.Task[redis.asyncio.Redis]] = {}

    async def client(self, pool: str) -> redis.asyncio.Redis:
        """The client of ``pool``, made (and an embedded server started) on first use."""
        client = self._clients.get(pool)
        if client is None:
            making = self._making.get(pool)
            if making is None:
                making = asyncio.ensure_future(
                    async_client(self._registry.pools[pool], self.options)
                )
                self._making[pool] = making
            try:
                client = await asyncio.shield(making)
            finally:
                if making.done():
                    self._making.pop(pool, None)
            self._clients[pool] = client
        return client

    async def run(
        self, op: Op[T], handler: Handler | None = None, wake: asyncio.Event | None = None
    ) -> T:
        """Drive ``op`` to completion and return its result.

        ``handler`` performs :class:`Handle` effects (coroutine functions are awaited,
        other callables run in a worker thread); ``wake`` cuts :class:`Sleep` short.
        """
        try:
            effect = next(op)
            while True:
                try:
                    if isinstance(effect, Send):
                        result: Any = await self._send(effect)
                    elif isinstance(effect, Parallel):
                        result = await self._parallel(effect)
                    elif isinstance(effect, Sleep):
                        result = None
                        await _sleep(effect.seconds, wake)
                    else:
                        assert handler is not None
                        result = await self._handle(effect, handler)
                except BaseException as exc:
                    effect = op.throw(exc)
                else:
                    effect = op.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _handle(self, effect: Handle, handler: Handler) -> object:
        beating = None
        if effect.heartbeat is not None:
            beating = asyncio.create_task(self._beat(effect))
        try:
            if inspect.iscoroutinefunction(handler):
                result = await handler(effect.events)
            else:
                result = await asyncio.to_thread(handler, effect.events)
                if inspect.isawaitable(result):
                    result = await result
            return result
        finally:
            if beating is not None:
                beating.cancel()
                with suppress(asyncio.CancelledError):
                    await beating

    async def _beat(self, effect: Handle) -> None:
        assert effect.heartbeat is not None
        while True:
            await asyncio.sleep(effect.interval)
            try:
                await self.run(effect.heartbeat())
            except BrokerError as exc:
                log.warning("heartbeat failed (will try again): %s", exc)

    async def _send(self, send: Send) -> list[Any]:
        try:
            client = await self.client(send.pool)
            if len(send.commands) == 1:
                try:
                    return [await client.execute_command(*send.commands[0])]  # type: ignore[no-untyped-call]
                except rex.ResponseError as exc:
                    if send.allow_errors and not isinstance(exc, rex.NoPermissionError):
                        return [ReplyError(str(exc))]
                    raise
            pipe = client.pipeline(transaction=False)
            for command in send.commands:
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=not send.allow_errors)
        except rex.RedisError as exc:
            raise translate_error(exc, send.pool) from exc
        return [
            ReplyError(str(reply)) if isinstance(reply, rex.ResponseError) else reply
            for reply in replies
        ]

    async def _parallel(self, parallel: Parallel) -> list[list[Any]]:
        if len(parallel.sends) <= 1:
            return [await self._send(send) for send in parallel.sends]
        results = await asyncio.gather(
            *(self._send(send) for send in parallel.sends), return_exceptions=True
        )
        replies: list[list[Any]] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            replies.append(result)
        return replies

    async def close(self) -> None:
        """Close every connection."""
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()


async def _sleep(seconds: float, wake: asyncio.Event | None) -> None:
    if wake is None:
        await asyncio.sleep(seconds)
        return
    with suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), seconds)
