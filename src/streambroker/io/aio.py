"""The asyncio I/O layer: performs the core's effects with redis.asyncio and tasks."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from functools import partial
from typing import Any, Generic, TypeVar

import redis.asyncio
import redis.exceptions as rex

from ..config.registry import ValidatedRegistry
from ..core import effects as fx
from ..core import routing
from ..errors import BrokerError
from . import replies as rp
from .connection import (
    AsyncCluster,
    ConnectionOptions,
    async_client,
    async_cluster,
    is_error,
    read_replies_async,
    refusal_of,
    reply_budget,
)

T = TypeVar("T")


async def _all(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Await ``calls`` at once (one alone, directly); once every one is over, their
    results in order, or the first error."""
    if len(calls) <= 1:
        return [await call for call in calls]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]


V = TypeVar("V")


class AsyncDriver:
    """Runs operations against one asyncio client per pool, made on first use."""

    def __init__(self, registry: ValidatedRegistry, options: ConnectionOptions) -> None:
        self._registry = registry
        self.options = options
        self._scripts = rp.LoadedScripts()
        self._clients: _PerPool[redis.asyncio.Redis] = _PerPool()
        self._clusters: _PerPool[AsyncCluster] = _PerPool()

    async def client(self, pool: str) -> redis.asyncio.Redis:
        """The client of ``pool``, made (and an embedded server started) on first use."""
        spec = self._registry.pools[pool]
        return await self._clients.get(pool, lambda: async_client(spec, self.options))

    async def cluster(self, pool: str) -> AsyncCluster | None:
        """The topology and node connections of ``pool`` when it is a cluster pool (its
        slot map read on first use), else None."""
        spec = self._registry.pools[pool]
        if not spec.cluster:
            return None
        return await self._clusters.get(pool, lambda: async_cluster(spec, self.options))

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
        with rp.translated(send.pool):
            cluster = await self.cluster(send.pool)
            if cluster is not None:
                return rp.settle(send, await self._on_cluster(send, cluster))
            pool = (await self.client(send.pool)).connection_pool
            return rp.settle(send, await self._scripted(send, send.pool, pool))

    async def _scripted(self, send: fx.Send, server: str, pool: Any) -> list[Any]:
        """The raw replies to ``send`` on the connections of ``pool`` (of the server
        known as ``server``), its scripts sent as the server needs them."""
        shas = rp.scripts_of(send)
        if not shas:
            return await self._round_trip(send, send.commands, pool)
        probe = self._scripts.probe(server, shas)
        if probe is not None:
            (known,) = await self._round_trip(fx.Send(send.pool, [probe]), [probe], pool)
            self._scripts.learn(server, probe, known)
        commands = self._scripts.commands(send, shas, server)
        replies = await self._round_trip(send, commands, pool)
        self._scripts.ran(server, shas, replies)
        again = rp.missing_scripts(send, replies)
        if again:
            replies = rp.put_back(send, replies, await self._round_trip(send, again, pool))
        return replies

    async def _on_cluster(self, send: fx.Send, cluster: AsyncCluster) -> list[Any]:
        """The raw replies to ``send`` on a cluster pool, as :func:`routing.route` routes
        them: its pieces sent to their nodes concurrently."""
        if cluster.stale:
            await cluster.refresh()
        send.received = 0
        steps = routing.Routing(send.pool, send.commands, cluster, refusal_of, is_error)
        while not steps.done:
            request, result = steps.request, None
            if isinstance(request, routing.Pieces):
                result = await self._pieces(send, cluster, request.pieces)
            elif isinstance(request, routing.Refresh):
                await cluster.refresh()
            else:
                await asyncio.sleep(request.seconds)
            steps.resume(result)
        return steps.replies

    async def _pieces(
        self, send: fx.Send, cluster: AsyncCluster, pieces: list[routing.Piece]
    ) -> list[list[Any]]:
        async def piece(piece: routing.Piece) -> list[Any]:
            # Each piece within the send's budget; what they took adds up.
            sub = fx.Send(send.pool, piece.commands, budget=send.budget)
            try:
                node = _NodePool(await cluster.node(piece.node))
                return await self._scripted(sub, f"{send.pool} {piece.node}", node)
            except BaseException:
                cluster.stale = True  # the node may have failed: read the slot map again
                raise
            finally:
                send.received += sub.received

        return await _all([piece(each) for each in pieces])

    async def _round_trip(
        self, send: fx.Send, commands: Sequence[fx.AnyCommand], pool: Any
    ) -> list[Any]:
        """The raw replies to ``commands`` of ``send`` on a connection of ``pool``
        (within the send's budget), error replies in place."""
        name = send.pool
        with rp.translated(name, self._registry.pools[name].tls):
            connection = await pool.get_connection()
        budget = reply_budget(connection)
        try:
            await connection.send_packed_command(rp.pack(commands))
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
        return await _all([self._send(send) for send in parallel.sends])

    async def close(self) -> None:
        """Close every connection."""
        for client in await self._clients.take():
            await client.aclose()
        for cluster in await self._clusters.take():
            await cluster.close()


class _PerPool(Generic[V]):
    """What is made once per pool by a coroutine (a client, a cluster's topology), on
    first use: callers arriving while it is made await the same making."""

    def __init__(self) -> None:
        self._made: dict[str, V] = {}
        self._making: dict[str, asyncio.Task[V]] = {}

    async def get(self, pool: str, make: Callable[[], Awaitable[V]]) -> V:
        """The value of ``pool``, made by ``make()`` if it is not yet."""
        found = self._made.get(pool)
        if found is not None:
            return found
        making = self._making.get(pool)
        if making is None:
            making = asyncio.ensure_future(make())
            making.add_done_callback(partial(self._done, pool))
            self._making[pool] = making
        # Shielded: one caller's cancellation must not fail the others waiting for it.
        return await asyncio.shield(making)

    def _done(self, pool: str, making: asyncio.Task[V]) -> None:
        # Kept even when every caller was cancelled meanwhile: take() hands it over.
        del self._making[pool]
        if not making.cancelled() and making.exception() is None:
            self._made[pool] = making.result()

    async def take(self) -> list[V]:
        """Every value made (once those being made are), forgotten here: to close them."""
        if self._making:
            await asyncio.wait(list(self._making.values()))
        made, self._made = self._made, {}
        return list(made.values())


class _NodePool:
    """A cluster node's connections, taken and given back as from a connection pool."""

    def __init__(self, node: Any) -> None:
        self._node = node

    async def get_connection(self) -> Any:
        """A connection of the node, connected and ready: one closed while it was idle
        (the server killed it, or restarted) is opened again, as redis-py's pools do."""
        connection = self._node.acquire_connection()
        try:
            await connection.connect()
            try:
                if await connection.can_read():
                    raise rex.ConnectionError("the idle connection has data")
            except (rex.ConnectionError, rex.TimeoutError, OSError):
                await connection.disconnect()
                await connection.connect()
        except BaseException:
            self._node.release(connection)
            raise
        return connection

    async def release(self, connection: Any) -> None:
        self._node.release(connection)


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
