"""The synchronous I/O layer: performs the core's effects with redis-py and threads."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import redis

from ..config.registry import ValidatedRegistry
from ..core import effects as fx
from ..core import routing
from ..errors import BrokerError
from . import replies as rp
from .connection import (
    ConnectionOptions,
    SyncCluster,
    is_error,
    read_replies,
    ready,
    refusal_of,
    reply_budget,
    sync_client,
    sync_cluster,
)

T = TypeVar("T")

#: The connections one run keeps between its round trips: pool name -> (pool, connection).
Held = dict[str, tuple[Any, Any]]


class _Heartbeat:
    """One thread per ``run()`` that beats while a handler runs.

    :meth:`during` tells it a handler started (and when it ended); it then runs the
    handler's heartbeat operation every interval. One thread serves every batch, so
    a batch costs no thread start; and it is woken only when it would otherwise beat
    too late: between handlers it looks again every half interval by itself, and a
    handler starting finds it due to wake before its first beat is (a wake-up per batch
    would hand the GIL back and forth twice a batch: some 10 µs an event, more in the
    tail, at one event a batch).
    """

    def __init__(self, driver: SyncDriver) -> None:
        self._driver = driver
        self._changed = threading.Condition()
        self._effect: fx.Handle | None = None
        self._since = 0.0
        self._wake_at = math.inf  # when the thread wakes up by itself
        self._every = 0.0  # the interval of the last handler's heartbeats (0: none yet)
        self._closed = False
        self._thread = threading.Thread(target=self._beat, name="streambroker-heartbeat")
        self._thread.start()

    def during(self, effect: fx.Handle | None) -> None:
        """A handler of ``effect`` runs from now on (``None``: it returned)."""
        with self._changed:
            self._effect = effect
            self._since = time.monotonic()
            if effect is not None:
                self._every = effect.interval
                if self._since + effect.interval < self._wake_at:
                    self._changed.notify()

    def close(self) -> None:
        """Stop the thread."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _beat(self) -> None:
        with self._changed:
            while not self._closed:
                effect = self._effect
                if effect is None or effect.heartbeat is None:
                    if self._every:
                        self._wake_at = time.monotonic() + self._every / 2
                        self._changed.wait(self._every / 2)
                    else:
                        self._wake_at = math.inf
                        self._changed.wait()
                    continue
                self._wake_at = self._since + effect.interval
                due = self._wake_at - time.monotonic()
                if due > 0:
                    self._changed.wait(due)
                    continue
                self._since = time.monotonic()
                self._changed.release()
                try:
                    self._driver.run(effect.heartbeat())
                except BrokerError as exc:
                    fx.log.warning("heartbeat failed (will try again): %s", exc)
                finally:
                    self._changed.acquire()


class SyncDriver:
    """Runs operations against one client per pool, made on first use."""

    def __init__(self, registry: ValidatedRegistry, options: ConnectionOptions) -> None:
        self._registry = registry
        self.options = options
        self._scripts = rp.LoadedScripts()
        self._clients: dict[str, redis.Redis] = {}
        self._clusters: dict[str, SyncCluster] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._node_executor: ThreadPoolExecutor | None = None

    def client(self, pool: str) -> redis.Redis:
        """The client of ``pool``, made (and an embedded server started) on first use."""
        client = self._clients.get(pool)
        if client is None:
            with self._lock:
                client = self._clients.get(pool)
                if client is None:
                    client = sync_client(self._registry.pools[pool], self.options)
                    self._clients[pool] = client
        return client

    def cluster(self, pool: str) -> SyncCluster | None:
        """The topology and node connections of ``pool`` when it is a cluster pool (its
        slot map read on first use), else None."""
        found = self._clusters.get(pool)
        if found is None and self._registry.pools[pool].cluster:
            with self._lock:
                found = self._clusters.get(pool)
                if found is None:
                    found = sync_cluster(self._registry.pools[pool], self.options)
                    self._clusters[pool] = found
        return found

    def run(
        self,
        op: fx.Op[T],
        handler: fx.AnyHandler | None = None,
        wake: threading.Event | None = None,
    ) -> T:
        """Drive ``op`` to completion and return its result.

        ``handler`` performs ``Handle`` effects; ``wake`` cuts ``Sleep`` short. The run
        keeps the connection of each pool it sent to until it ends: a consume loop's round
        trips then skip the pool's lock, bookkeeping and hooks (a quarter of the Python calls
        of a round trip bringing one event).
        """
        driving = fx.Driving(op)
        beats: list[_Heartbeat] = []
        held: Held = {}
        try:
            while not driving.done:
                effect = driving.effect
                if isinstance(effect, fx.Handle):
                    assert handler is not None
                    driving.resume(*fx.outcome(self._handle, effect, handler, beats))
                else:
                    driving.resume(*fx.outcome(self._perform, effect, wake, held))
        finally:
            for beat in beats:
                beat.close()
            for pool, connection in held.values():
                pool.release(connection)
        return driving.result  # type: ignore[return-value]

    def _perform(
        self, effect: fx.Effect, wake: threading.Event | None, held: Held | None = None
    ) -> Any:
        if isinstance(effect, fx.Send):
            return self._send(effect, held)
        if isinstance(effect, fx.Parallel):
            return self._parallel(effect, held)
        assert isinstance(effect, fx.Sleep)
        return wake.wait(effect.seconds) if wake else time.sleep(effect.seconds)

    def _handle(self, effect: fx.Handle, handler: fx.AnyHandler, beats: list[_Heartbeat]) -> object:
        if effect.heartbeat is None:
            return handler(effect.events)
        if not beats:
            beats.append(_Heartbeat(self))
        beats[0].during(effect)
        try:
            return handler(effect.events)
        finally:
            beats[0].during(None)

    def _send(self, send: fx.Send, held: Held | None = None) -> list[Any]:
        with rp.translated(send.pool):
            cluster = self.cluster(send.pool)
            if cluster is not None:
                return rp.settle(send, self._on_cluster(send, cluster))
            pool = self.client(send.pool).connection_pool
            if self._registry.pools[send.pool].kind == "sentinel":
                held = None  # its pool checks where the master is as it hands connections out
            return rp.settle(send, self._scripted(send, send.pool, pool, held))

    def _scripted(self, send: fx.Send, server: str, pool: Any, held: Held | None) -> list[Any]:
        """The raw replies to ``send`` on the connections of ``pool`` (of the server
        known as ``server``), its scripts sent as the server needs them."""
        shas = rp.scripts_of(send)
        if not shas:
            return self._round_trip(send, send.commands, pool, held)
        probe = self._scripts.probe(server, shas)
        if probe is not None:
            (known,) = self._round_trip(fx.Send(send.pool, [probe]), [probe], pool, held)
            self._scripts.learn(server, probe, known)
        commands = self._scripts.commands(send, shas, server)
        replies = self._round_trip(send, commands, pool, held)
        self._scripts.ran(server, shas, replies)
        again = rp.missing_scripts(send, replies)
        if again:
            replies = rp.put_back(send, replies, self._round_trip(send, again, pool, held))
        return replies

    def _on_cluster(self, send: fx.Send, cluster: SyncCluster) -> list[Any]:
        """The raw replies to ``send`` on a cluster pool, as :func:`routing.route` routes
        them: its pieces sent to their nodes concurrently."""
        if cluster.stale:
            cluster.refresh()
        send.received = 0
        steps = routing.Routing(send.pool, send.commands, cluster, refusal_of, is_error)
        while not steps.done:
            request, result = steps.request, None
            if isinstance(request, routing.Pieces):
                result = self._pieces(send, cluster, request.pieces)
            elif isinstance(request, routing.Refresh):
                cluster.refresh()
            else:
                time.sleep(request.seconds)
            steps.resume(result)
        return steps.replies

    def _pieces(
        self, send: fx.Send, cluster: SyncCluster, pieces: list[routing.Piece]
    ) -> list[list[Any]]:
        # Each piece within the send's budget; what they took adds up once all are back.
        subs = [fx.Send(send.pool, piece.commands, budget=send.budget) for piece in pieces]

        def piece(index: int) -> list[Any]:
            node = pieces[index].node
            try:
                return self._scripted(subs[index], f"{send.pool} {node}", cluster.pool(node), None)
            except BaseException:
                cluster.stale = True  # the node may have failed: read the slot map again
                raise

        try:
            return self._at_once([partial(piece, index) for index in range(len(pieces))], True)
        finally:
            send.received += sum(sub.received for sub in subs)

    def _at_once(self, calls: Sequence[Callable[[], T]], nodes: bool) -> list[T]:
        """Every one of ``calls`` at once (the first in this thread), on the threads for
        a cluster's nodes or those for pools; once every one is over, their results in
        order, or the first error. (Two sets of threads: a pool's round trip, on a pool
        thread, may wait on its nodes' pieces.)"""
        if len(calls) <= 1:
            return [call() for call in calls]
        with self._lock:
            if nodes and self._node_executor is None:
                self._node_executor = ThreadPoolExecutor(
                    max_workers=64, thread_name_prefix="streambroker-node"
                )
            if not nodes and self._executor is None:
                self._executor = ThreadPoolExecutor(thread_name_prefix="streambroker")
            executor = self._node_executor if nodes else self._executor
        assert executor is not None
        futures = [executor.submit(call) for call in calls[1:]]
        results: list[T] = []
        error: BaseException | None = None
        try:
            results.append(calls[0]())
        except BaseException as exc:
            error = exc
        for future in futures:  # every piece finished before anything is raised
            try:
                results.append(future.result())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    def _round_trip(
        self, send: fx.Send, commands: Sequence[fx.AnyCommand], pool: Any, held: Held | None
    ) -> list[Any]:
        """The raw replies to ``commands`` of ``send`` on a connection of ``pool`` (within
        the send's budget), error replies in place; the connection is kept in ``held``
        (when given) for the next round trip to the pool."""
        name = send.pool
        kept = held.pop(name, None) if held is not None else None
        connection = kept[1] if kept is not None else None
        if connection is not None and not ready(connection):
            connection.disconnect()
            pool.release(connection)
            connection = None
        if connection is None:
            with rp.translated(name, self._registry.pools[name].tls):
                connection = pool.get_connection()
        budget = reply_budget(connection)
        try:
            connection.send_packed_command(rp.pack(commands))
            budget.start(send)
            replies = read_replies(connection, len(commands))
        except BaseException:
            connection.disconnect()
            pool.release(connection)
            raise
        finally:
            budget.stop()
        if held is not None:
            held[name] = (pool, connection)
        else:
            pool.release(connection)
        return replies

    def _parallel(self, parallel: fx.Parallel, held: Held | None = None) -> list[list[Any]]:
        # Each send goes to a pool of its own: the threads touch distinct entries of held.
        return self._at_once([partial(self._send, send, held) for send in parallel.sends], False)

    def close(self) -> None:
        """Close every connection and the worker threads."""
        with self._lock:
            clients, self._clients = self._clients, {}
            clusters, self._clusters = self._clusters, {}
            executors = [self._executor, self._node_executor]
            self._executor = self._node_executor = None
        for executor in executors:
            if executor is not None:
                executor.shutdown(wait=True)
        for client in clients.values():
            client.close()
        for cluster in clusters.values():
            cluster.close()
