"""Running the behaviour tests on both faces: the asyncio broker behind a sync facade.

The facade runs every coroutine of an :class:`sb.AsyncBroker` on an event loop in a
background thread and waits for its result, so a test written against the
synchronous API exercises the asyncio face unchanged. Handlers given to it are
plain functions, which the asyncio face runs in worker threads.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import streambroker as sb

T = TypeVar("T")


class Loop:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class _Facade:
    def __init__(self, inner: Any, loop: Loop) -> None:
        self._inner = inner
        self._loop = loop

    def __repr__(self) -> str:
        return repr(self._inner)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if inspect.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self._loop.run(attribute(*args, **kwargs))
        return attribute


class AsyncBrokerFacade(_Facade):
    """An :class:`sb.AsyncBroker` with the methods of :class:`sb.Broker`."""

    def batch(self, **options: Any) -> AsyncBatchFacade:
        return AsyncBatchFacade(self._inner.batch(**options), self._loop)

    def consumer(self, group: str, name: str = "consumer-1", **options: Any) -> _Facade:
        return AsyncConsumerFacade(self._inner.consumer(group, name, **options), self._loop)

    def __enter__(self) -> AsyncBrokerFacade:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncBatchFacade(_Facade):
    def __len__(self) -> int:
        return len(self._inner)

    def __enter__(self) -> AsyncBatchFacade:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._loop.run(self._inner.__aexit__(exc_type, exc, tb))


class AsyncConsumerFacade(_Facade):
    def consume(self, handler: Any, count: int = 10, *, block: bool = True) -> int:
        consume = self._inner.consume(handler, count, block=block, handle_signals=False)
        result: int = self._loop.run(consume)
        return result


def async_facade(config: sb.ValidatedRegistry, loop: Loop, **options: Any) -> sb.Broker:
    """An asyncio broker of ``config`` that tests can use as an :class:`sb.Broker`."""
    facade: Any = AsyncBrokerFacade(config.async_broker(**options), loop)
    return facade  # type: ignore[no-any-return]
