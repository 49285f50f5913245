"""The synchronous I/O layer: performs the core's effects with redis-py and threads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
import redis.exceptions as rex

from ._effects import Handle, Op, Parallel, ReplyError, Send, Sleep, translate_error
from .config import ValidatedRegistry
from .connection import ConnectionOptions, sync_client
from .errors import BrokerError

T = TypeVar("T")

Handler = Callable[[Any], object]

log = logging.getLogger("streambroker")


class _Heartbeat:
    """Runs a handler's heartbeat operation every interval while the handler runs."""

    def __init__(self, driver: SyncDriver, effect: Handle) -> None:
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
                log.warning("heartbeat failed (will try again): %s", exc)


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
        self, op: Op[T], handler: Handler | None = None, wake: threading.Event | None = None
    ) -> T:
        """Drive ``op`` to completion and return its result.

        ``handler`` performs :class:`Handle` effects; ``wake`` cuts :class:`Sleep` short.
        """
        try:
            effect = next(op)
            while True:
                try:
                    if isinstance(effect, Send):
                        result: Any = self._send(effect)
                    elif isinstance(effect, Parallel):
                        result = self._parallel(effect)
                    elif isinstance(effect, Sleep):
                        result = None
                        if wake is None:
                            time.sleep(effect.seconds)
                        else:
                            wake.wait(effect.seconds)
                    else:
                        assert handler is not None
                        result = self._handle(effect, handler)
                except BaseException as exc:
                    effect = op.throw(exc)
                else:
                    effect = op.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _handle(self, effect: Handle, handler: Handler) -> object:
        if effect.heartbeat is None:
            return handler(effect.events)
        with _Heartbeat(self, effect):
            return handler(effect.events)

    def _send(self, send: Send) -> list[Any]:
        try:
            client = self.client(send.pool)
            if len(send.commands) == 1:
                try:
                    return [client.execute_command(*send.commands[0])]  # type: ignore[no-untyped-call]
                except rex.ResponseError as exc:
                    if send.allow_errors and not isinstance(exc, rex.NoPermissionError):
                        return [ReplyError(str(exc))]
                    raise
            pipe = client.pipeline(transaction=False)
            for command in send.commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            replies = pipe.execute(raise_on_error=not send.allow_errors)
        except rex.RedisError as exc:
            raise translate_error(exc, send.pool) from exc
        return [
            ReplyError(str(reply)) if isinstance(reply, rex.ResponseError) else reply
            for reply in replies
        ]

    def _parallel(self, parallel: Parallel) -> list[list[Any]]:
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
