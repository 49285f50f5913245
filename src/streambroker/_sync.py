"""The synchronous I/O layer: performs the core's effects with redis-py and threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis

from . import _effects as fx
from .config import ValidatedRegistry
from .connection import ConnectionOptions, sync_client
from .errors import BrokerError

T = TypeVar("T")


class _Heartbeat:
    """Runs a handler's heartbeat operation every interval while the handler runs."""

    def __init__(self, driver: SyncDriver, effect: fx.Handle) -> None:
        self._driver = driver
        self._effect = effect
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="streambroker-heartbeat")

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        assert self._effect.heartbeat is not None
        while not self._done.wait(self._effect.interval):
            try:
                self._driver.run(self._effect.heartbeat())
            except BrokerError as exc:
                fx.log.warning("heartbeat failed (will try again): %s", exc)


class SyncDriver:
    """Runs operations against one client per pool, made on first use."""

    def __init__(self, registry: ValidatedRegistry, options: ConnectionOptions) -> None:
        self._registry = registry
        self.options = options
        self._clients: dict[str, redis.Redis] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

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

    def run(
        self,
        op: fx.Op[T],
        handler: fx.AnyHandler | None = None,
        wake: threading.Event | None = None,
    ) -> T:
        """Drive ``op`` to completion and return its result.

        ``handler`` performs ``Handle`` effects; ``wake`` cuts ``Sleep`` short.
        """
        driving = fx.Driving(op)
        while not driving.done:
            driving.resume(*fx.outcome(self._perform, driving.effect, handler, wake))
        return driving.result  # type: ignore[return-value]

    def _perform(
        self, effect: fx.Effect, handler: fx.AnyHandler | None, wake: threading.Event | None
    ) -> Any:
        if isinstance(effect, fx.Send):
            return self._send(effect)
        if isinstance(effect, fx.Parallel):
            return self._parallel(effect)
        if isinstance(effect, fx.Sleep):
            return wake.wait(effect.seconds) if wake else time.sleep(effect.seconds)
        assert handler is not None
        return self._handle(effect, handler)

    def _handle(self, effect: fx.Handle, handler: fx.AnyHandler) -> object:
        if effect.heartbeat is None:
            return handler(effect.events)
        with _Heartbeat(self, effect):
            return handler(effect.events)

    def _send(self, send: fx.Send) -> list[Any]:
        with fx.translated(send.pool):
            client = self.client(send.pool)
            if fx.is_single(send):
                return [client.execute_command(*send.commands[0])]  # type: ignore[no-untyped-call]
            pipeline = fx.fill(client.pipeline(transaction=False), send)
            return fx.replies_of(pipeline.execute(raise_on_error=not send.allow_errors))

    def _parallel(self, parallel: fx.Parallel) -> list[list[Any]]:
        sends = parallel.sends
        if len(sends) <= 1:
            return [self._send(send) for send in sends]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(thread_name_prefix="streambroker")
            executor = self._executor
        futures = [executor.submit(self._send, send) for send in sends]
        results: list[list[Any]] = []
        error: BaseException | None = None
        for future in futures:
            try:
                results.append(future.result())
            except BrokerError as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    def close(self) -> None:
        """Close every connection and the worker threads."""
        with self._lock:
            clients, self._clients = self._clients, {}
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        for client in clients.values():
            client.close()
