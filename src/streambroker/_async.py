"""The asyncio I/O layer: performs the core's effects with redis.asyncio and tasks."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Sequence
from contextlib import suppress
from functools import partial
from typing import Any, TypeVar

import redis.asyncio

from . import _effects as fx
from .config import ValidatedRegistry
from .connection import ConnectionOptions, async_client, read_replies_async, reply_budget
from .errors import BrokerError

T = TypeVar("T")


class AsyncDriver:
    """Runs operations against one asyncio client per pool, made on first use."""

    def __init__(self, registry: ValidatedRegistry, options: ConnectionOptions) -> None:
        self._registry = registry
        self.options = options
        self._scripts = fx.LoadedScripts()
        self._clients: dict[str, redis.asyncio.Redis] = {}
        self._making: dict[str, asyncio.Task[redis.asyncio.Redis]] = {}

    async def client(self, pool: str) -> redis.asyncio.Redis:
        """The client of ``pool``, made (and an embedded server started) on first use."""
        client = self._clients.get(pool)
        if client is not None:
            return client
        making = self._making.get(pool)
        if making is None:
            making = asyncio.ensure_future(async_client(self._registry.pools[pool], self.options))
            making.add_done_callback(partial(self._made, pool))
            self._making[pool] = making
        # Shielded: one caller's cancellation must not fail the others waiting for it.
        return await asyncio.shield(making)

    def _made(self, pool: str, making: asyncio.Task[redis.asyncio.Redis]) -> None:
        # Kept even when every caller was cancelled meanwhile: close() closes it.
        del self._making[pool]
        if not making.cancelled() and making.exception() is None:
            self._clients[pool] = making.result()

    async def run(
        self, op: fx.Op[T], handler: fx.AnyHandler | None = None, wake: asyncio.Event | None = None
    ) -> T:
        """Drive ``op`` to completion and return its result.

        ``handler`` performs :class:`fx.Handle` effects (coroutine functions are awaited,
        other callables run in a worker thread); ``wake`` cuts :class:`fx.Sleep` short.

        A cancellation of the task always reaches ``op``, thrown in at the effect in
        progress, even when something below swallowed it (redis-py's writes do on Python
        3.11; so may a handler): ``Task.cancelling()`` tells. A batch whose handler
        returned (or ran on in its thread) is kept, though: ``op`` takes the result and
        the cancellation comes at its next effect, or as ``op`` ends when it is stopping
        anyway (``wake`` set), so that the batch is acknowledged.
        """
        task = asyncio.current_task()
        assert task is not None
        cancels = task.cancelling()
        held = False  # a cancellation that came while a batch was finished
        driving = fx.Driving(op)
        while not driving.done:
            if held and not (wake is not None and wake.is_set()):
                held = False
                driving.resume(None, asyncio.CancelledError())
                continue
            effect = driving.effect
            result: Any = None
            error: BaseException | None = None
            try:
                result = await self._perform(effect, handler, wake)
            except BaseException as exc:
                error = exc
            missed = task.cancelling() > cancels and not isinstance(error, asyncio.CancelledError)
            cancels = task.cancelling()
            if not missed:
                driving.resume(result, error)
            elif error is not None:
                driving.resume(None, _cancellation(error))
            elif isinstance(effect, fx.Handle):
                held = True
                driving.resume(result, None)
            else:
                driving.resume(None, asyncio.CancelledError())
        if held:
            raise asyncio.CancelledError
        return driving.result  # type: ignore[return-value]

    async def _perform(
        self, effect: fx.Effect, handler: fx.AnyHandler | None, wake: asyncio.Event | None
    ) -> Any:
        if isinstance(effect, fx.Send):
            return await self._send(effect)
        if isinstance(effect, fx.Parallel):
            return await self._parallel(effect)
        if isinstance(effect, fx.Sleep):
            return await sleep(effect.seconds, wake)
        assert handler is not None
        return await self._handle(effect, handler)

    async def _handle(self, effect: fx.Handle, handler: fx.AnyHandler) -> object:
        beating = None
        if effect.heartbeat is not None:
            beating = asyncio.create_task(self._beat(effect))
        try:
            if inspect.iscoroutinefunction(handler):
                return await handler(effect.events)
            # A thread cannot be interrupted: the batch in hand is finished first.
            thread = asyncio.get_running_loop().run_in_executor(
                None, contextvars.copy_context().run, handler, effect.events
            )
            await _finish(thread)
            result = thread.result()
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            if beating is not None:
                beating.cancel()
                await _finish(beating)
                if not beating.cancelled():
                    beating.result()  # a fault of the heartbeat itself

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
            shas = fx.scripts_of(send)
            if not shas:
                return fx.settle(send, await self._round_trip(send, send.commands))
            probe = self._scripts.probe(send.pool, shas)
            if probe is not None:
                (known,) = await self._round_trip(fx.Send(send.pool, [probe]), [probe])
                self._scripts.learn(send.pool, probe, known)
            replies = await self._round_trip(send, self._scripts.commands(send, shas))
            self._scripts.ran(send.pool, shas, replies)
            again = fx.missing_scripts(send, replies)
            if again:
                replies = fx.put_back(send, replies, await self._round_trip(send, again))
            return fx.settle(send, replies)

    async def _round_trip(self, send: fx.Send, commands: Sequence[fx.AnyCommand]) -> list[Any]:
        """The raw replies to ``commands`` of ``send`` (within its budget), error replies
        in place."""
        name = send.pool
        pool = (await self.client(name)).connection_pool
        with fx.translated(name, self._registry.pools[name].tls):
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        budget = reply_budget(connection)
        try:
            await connection.send_packed_command(fx.pack(commands))
            budget.start(send)
            replies = await read_replies_async(connection, len(commands))
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        finally:
            budget.stop()
            await pool.release(connection)
        return replies

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
        if self._making:
            await asyncio.wait(list(self._making.values()))  # to close those clients too
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()


async def sleep(seconds: float, wake: asyncio.Event | None) -> None:
    """Wait ``seconds``, or less if ``wake`` is set meanwhile; a cancellation propagates."""
    if wake is None:
        await asyncio.sleep(seconds)
        return
    # Not wait_for(): on Python 3.11 it drops a cancellation that races the wake-up.
    with suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wake.wait()


async def _finish(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, through cancellations of the task: they stay
    counted by ``Task.cancelling()``, and :meth:`AsyncDriver.run` delivers them."""
    while not future.done():
        with suppress(asyncio.CancelledError):
            await asyncio.wait([future])


def _cancellation(cause: BaseException) -> asyncio.CancelledError:
    """The cancellation that came while an effect failed with ``cause``: it prevails."""
    error = asyncio.CancelledError()
    error.__cause__ = cause
    return error
