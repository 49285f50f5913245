"""The asyncio I/O layer: performs the core's effects with redis.asyncio and tasks."""

from __future__ import annotations

import asyncio
import inspect
from contextlib import suppress
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions as rex

from . import _effects as fx
from .config import ValidatedRegistry
from .connection import ConnectionOptions, async_client
from .errors import BrokerError

T = TypeVar("T")


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
        self, op: fx.Op[T], handler: fx.AnyHandler | None = None, wake: asyncio.Event | None = None
    ) -> T:
        """Drive ``op`` to completion and return its result.

        ``handler`` performs :class:`fx.Handle` effects (coroutine functions are awaited,
        other callables run in a worker thread); ``wake`` cuts :class:`fx.Sleep` short.
        """
        driving = fx.Driving(op)
        while not driving.done:
            try:
                result = await self._perform(driving.effect, handler, wake)
            except BaseException as exc:
                driving.resume(None, exc)
            else:
                driving.resume(result, None)
        return driving.result  # type: ignore[return-value]

    async def _perform(
        self, effect: fx.Effect, handler: fx.AnyHandler | None, wake: asyncio.Event | None
    ) -> Any:
        if isinstance(effect, fx.Send):
            return await self._send(effect)
        if isinstance(effect, fx.Parallel):
            return await self._parallel(effect)
        if isinstance(effect, fx.Sleep):
            return await _sleep(effect.seconds, wake)
        assert handler is not None
        return await self._handle(effect, handler)

    async def _handle(self, effect: fx.Handle, handler: fx.AnyHandler) -> object:
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

    async def _beat(self, effect: fx.Handle) -> None:
        assert effect.heartbeat is not None
        while True:
            await asyncio.sleep(effect.interval)
            try:
                await self.run(effect.heartbeat())
            except BrokerError as exc:
                fx.log.warning("heartbeat failed (will try again): %s", exc)

    async def _send(self, send: fx.Send) -> list[Any]:
        with fx.translated(send.pool):
            pool = (await self.client(send.pool)).connection_pool
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.send_packed_command(fx.pack(send.commands))
                replies: list[Any] = []
                for _ in send.commands:
                    try:
                        replies.append(await connection.read_response())
                    except rex.ResponseError as exc:
                        replies.append(exc)
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            finally:
                await pool.release(connection)
            return fx.settle(send, replies)

    async def _parallel(self, parallel: fx.Parallel) -> list[list[Any]]:
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
