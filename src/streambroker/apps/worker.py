"""Running the handlers an application registered with ``@broker.handler``.

``streambroker worker MODULE:APP`` imports the application (:func:`load_app`), and a
:class:`Worker` runs the registered handlers: ``consumers`` consumers per group, each
in a thread of its own, named ``<prefix>-<i>`` (the prefix defaults to
``<hostname>-<pid>``).

A consumer whose ``consume()`` raises (its handler raised, or a pool failed for
good) is logged and started again after a back-off; the events its handler did not
acknowledge stay pending, and come back when it starts again. A pool that refuses
the credentials or a permission (:class:`~streambroker.PoolAuthenticationError`)
stops the whole worker instead, at once: no retry can mend it, and whoever runs the
worker must see it fail (:meth:`Worker.run` raises it). :meth:`Worker.run`
stops every consumer on SIGTERM or SIGINT and waits for the batches in hand; each
stopped consumer then leaves its group (:meth:`Consumer.leave`), so the names of
past processes do not pile up in the group.

A :class:`Worker` runs the plain-function handlers of a :class:`~streambroker.Broker`
in threads; an :class:`AsyncWorker` runs the handlers of an
:class:`~streambroker.AsyncBroker` (coroutine functions, or plain functions in worker
threads) as tasks. Both share the planning (:func:`plan_consumers`), the counts
(:class:`HandledCounts`), the back-off (:func:`restart_delay`) and the logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Generic, TypeVar

from ..async_broker import AsyncBroker, AsyncConsumer
from ..broker import Broker, Consumer, Handler
from ..core.backoff import backoff
from ..core.state import HandlerSpec
from ..core.stats import StreamStats, holding_back_warning
from ..errors import BrokerError, InvalidArgumentError, PoolAuthenticationError
from ..io.aio import sleep
from ..wire.events import Event
from .text import counted

__all__ = [
    "AsyncWorker",
    "ConsumerPlan",
    "HandledCounts",
    "Worker",
    "default_name_prefix",
    "load_app",
    "plan_consumers",
    "restart_delay",
]

log = logging.getLogger("streambroker.worker")

#: The first back-off before a failed consumer starts again (seconds); it doubles
#: with each failure in a row, up to :data:`MAX_RESTART_DELAY`.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: Seconds between two summaries of :meth:`Worker.run`, by default.
SUMMARY_INTERVAL = 60.0
#: How often :meth:`Worker.run` looks whether a signal arrived (seconds).
_SIGNAL_POLL = 0.1


def load_app(spec: str, *, cwd: bool = True) -> Broker | AsyncBroker:
    """Import ``MODULE:APP`` and return the broker (sync or asyncio) it names.

    The module is looked up in the current directory first (it is put first on
    ``sys.path``; ``cwd=False`` leaves ``sys.path`` alone, so a file there cannot shadow
    an installed module);
    ``APP`` may be a dotted path (``module:services.broker``). Raises
    :class:`~streambroker.InvalidArgumentError` saying what is wrong; an error the
    module raises while it is imported is chained to it.
    """
    module_name, colon, attribute = spec.partition(":")
    if not (colon and module_name and attribute):
        raise InvalidArgumentError(f"{spec!r} is not MODULE:APP (e.g. myapp.events:broker)")
    here = os.getcwd()
    if cwd and here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except BrokerError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise InvalidArgumentError(
                f"cannot import {module_name!r}: no module named {exc.name!r} in the current "
                "directory or on the Python path"
            ) from exc
        raise InvalidArgumentError(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise InvalidArgumentError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    app: object = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise InvalidArgumentError(
                f"module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not isinstance(app, Broker | AsyncBroker):
        raise InvalidArgumentError(
            f"{spec!r} is a {type(app).__name__}, not a streambroker Broker or AsyncBroker"
        )
    return app


def default_name_prefix() -> str:
    """``<hostname>-<pid>``: consumer names unique to this process."""
    host = socket.gethostname().partition(".")[0] or "localhost"
    return f"{host}-{os.getpid()}"


@dataclass(frozen=True)
class ConsumerPlan:
    """One consumer a worker runs: its group, its name and the handler it calls."""

    group: str
    name: str
    handler: HandlerSpec


def plan_consumers(
    handlers: Sequence[HandlerSpec],
    *,
    groups: Iterable[str] = (),
    consumers: int = 1,
    name_prefix: str | None = None,
) -> list[ConsumerPlan]:
    """The consumers to run: ``consumers`` per registered handler, named
    ``<name_prefix>-1`` … ``<name_prefix>-<consumers>`` in each group.

    Only the handlers of ``groups`` when given; raises
    :class:`~streambroker.InvalidArgumentError` for a group without a handler, or
    when there is nothing to run.
    """
    if isinstance(consumers, bool) or not isinstance(consumers, int) or consumers < 1:
        raise InvalidArgumentError(f"consumers must be an integer >= 1, got {consumers!r}")
    if not handlers:
        raise InvalidArgumentError(
            "no handlers are registered: decorate functions with @broker.handler(group)"
        )
    by_group = {spec.group: spec for spec in handlers}
    wanted = list(dict.fromkeys(groups)) or list(by_group)
    missing = [group for group in wanted if group not in by_group]
    if missing:
        raise InvalidArgumentError(
            f"no handler is registered for consumer group {', '.join(map(repr, missing))} "
            f"(handlers: {', '.join(by_group)})"
        )
    prefix = default_name_prefix() if name_prefix is None else name_prefix
    return [
        ConsumerPlan(group, f"{prefix}-{i}", by_group[group])
        for group in wanted
        for i in range(1, consumers + 1)
    ]


def restart_delay(failures: int) -> float:
    """The back-off before a consumer that failed ``failures`` times in a row starts
    again (seconds, jittered)."""
    return backoff(failures, RESTART_DELAY, MAX_RESTART_DELAY)


class HandledCounts:
    """How many events each group handled; safe to update from several threads."""

    def __init__(self, groups: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(groups, 0)

    def add(self, group: str, count: int) -> None:
        """Count ``count`` more events handled by ``group``."""
        with self._lock:
            self._counts[group] += count

    def snapshot(self) -> dict[str, int]:
        """The counts now, per group."""
        with self._lock:
            return dict(self._counts)


def _summary(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{group} {count}" for group, count in counts.items())


# The lines both workers log, the same for each.


def _log_started(slots: Sequence[_Slot[Any]], per_group: int) -> None:
    log.info(
        "worker started: %s per group for %s (%s)",
        counted(per_group, "consumer"),
        ", ".join(dict.fromkeys(slot.plan.group for slot in slots)),
        ", ".join(dict.fromkeys(slot.plan.name for slot in slots)),
    )


def _log_signal(signum: int) -> None:
    log.info(
        "%s received: stopping after the batches in hand (send it again to quit at once)",
        signal.Signals(signum).name,
    )


def _log_summary(interval: float, last: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """Log what was handled since ``last``; returns ``now``, the next ``last``."""
    log.info(
        "handled %s in the last %g s: %s",
        counted(sum(now.values()) - sum(last.values()), "event"),
        interval,
        _summary({group: now[group] - last[group] for group in now}),
    )
    return now


def _watched(broker: Broker | AsyncBroker, slots: Sequence[_Slot[Any]]) -> list[str]:
    """The streams of the groups a worker runs, whose other groups it keeps an eye on."""
    groups = dict.fromkeys(slot.plan.group for slot in slots)
    return list(dict.fromkeys(s for g in groups for s in broker.registry.groups[g]))


def _warn_held_back(figures: Sequence[StreamStats] | BrokerError) -> None:
    """With each summary: warn of the groups that hold the worker's streams back with no
    consumer running (their events stay, and so does everything after them)."""
    if isinstance(figures, BrokerError):
        log.debug("could not read the statistics of the worker's streams: %s", figures)
        return
    for stream in figures:
        for group in stream.held_back_by:
            log.warning("%s", holding_back_warning(stream, group))


def _log_stopped(totals: dict[str, int]) -> dict[str, int]:
    log.info(
        "worker stopped; handled %s: %s", counted(sum(totals.values()), "event"), _summary(totals)
    )
    return totals


def _positive_interval(seconds: object, what: str = "summary_interval") -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        raise InvalidArgumentError(f"{what} must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


ConsumerT = TypeVar("ConsumerT", Consumer, AsyncConsumer)


class _Slot(Generic[ConsumerT]):
    """A consumer of a worker, with its failures in a row."""

    def __init__(self, plan: ConsumerPlan, consumer: ConsumerT) -> None:
        self.plan = plan
        self.consumer: ConsumerT = consumer
        self.failures = 0
        self.handler_failed = False
        self.thread: threading.Thread | None = None


def _readiness(slots: Sequence[_Slot[Any]], stopping: bool) -> str | None:
    """Why a worker is not ready (``/readyz``), or None when every consumer runs."""
    if stopping:
        return "the worker is stopping"
    for slot in slots:
        consumer = slot.consumer
        if not consumer.running:
            why = f": {consumer.problem}" if consumer.problem else " yet"
            return f"consumer {slot.plan.name} of group {slot.plan.group} is not running{why}"
    return None


class Worker:
    """Runs the handlers registered on ``broker`` with consumers in threads.

    ``groups`` restricts it to the handlers of those groups; ``consumers`` is the
    number of consumers per group; their names are ``<name_prefix>-<i>``
    (default prefix: ``<hostname>-<pid>``). Each consumer gets the ``count`` and
    consumer options given to ``@broker.handler``. ``summary_interval`` is the time
    between two summaries :meth:`run` logs. Consumer names and options are checked
    here, before anything runs.

    Use :meth:`run` to run until SIGTERM or SIGINT, or :meth:`start`, :meth:`stop`
    and :meth:`join` (or ``with``) to run it beside other work.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        groups: Iterable[str] = (),
        consumers: int = 1,
        name_prefix: str | None = None,
        summary_interval: float = SUMMARY_INTERVAL,
    ) -> None:
        interval = _positive_interval(summary_interval)
        plans = plan_consumers(
            broker.handlers, groups=groups, consumers=consumers, name_prefix=name_prefix
        )
        self._slots = []
        for plan in plans:
            function = plan.handler.function
            if inspect.iscoroutinefunction(function):
                raise InvalidArgumentError(
                    f"the handler of consumer group {plan.group!r} ({function.__qualname__}) is "
                    "a coroutine function: register it on an AsyncBroker (config.async_broker())"
                )
            consumer = broker.consumer(plan.group, plan.name, **plan.handler.options)
            self._slots.append(_Slot(plan, consumer))
        self.summary_interval = interval
        self._per_group = consumers
        self._broker = broker
        self._watched = _watched(broker, self._slots)
        self.counts = HandledCounts(dict.fromkeys(plan.group for plan in plans))
        self._stopping = threading.Event()
        self._started = False
        self._lock = threading.Lock()
        self._error: PoolAuthenticationError | None = None

    @property
    def consumers(self) -> list[Consumer]:
        """The consumers this worker runs, group by group."""
        return [slot.consumer for slot in self._slots]

    @property
    def groups(self) -> list[str]:
        """The consumer groups this worker serves."""
        return list(self.counts.snapshot())

    @property
    def error(self) -> PoolAuthenticationError | None:
        """What stopped the worker, if anything did: a pool refused the credentials or
        a permission (the first consumer's error, when several failed)."""
        return self._error

    def start(self) -> None:
        """Start every consumer in a thread of its own; returns at once."""
        if self._started:
            raise InvalidArgumentError("the worker was started already")
        self._started = True
        for slot in self._slots:
            slot.thread = threading.Thread(
                target=self._serve,
                args=(slot,),
                name=f"streambroker-{slot.plan.group}-{slot.plan.name}",
                daemon=True,
            )
            slot.thread.start()
        _log_started(self._slots, self._per_group)

    def readiness(self) -> str | None:
        """None once every consumer runs (holds its lease, reaches its pools); else why
        not, in one line (what ``/readyz`` answers)."""
        return _readiness(self._slots, self._stopping.is_set())

    def stop(self) -> None:
        """Ask every consumer to stop once its batch in hand is handled; returns at once.

        Safe to call from another thread.
        """
        self._stopping.set()
        for slot in self._slots:
            slot.consumer.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every consumer to stop; True when all have (False on timeout).

        Raises the :attr:`error` that stopped the worker, once every consumer stopped.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for slot in self._slots:
            if slot.thread is None:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            slot.thread.join(left)
            if slot.thread.is_alive():
                return False
        if self._error is not None:
            raise self._error
        return True

    def run(self, handle_signals: bool | None = None) -> dict[str, int]:
        """Run until :meth:`stop` is called, or SIGTERM or SIGINT arrives.

        Logs a summary every ``summary_interval`` seconds, then stops every consumer,
        waits for the batches in hand and returns how many events each group handled.
        When a pool refuses the credentials or a permission, every consumer stops and
        the :class:`~streambroker.PoolAuthenticationError` is raised.
        ``handle_signals`` (default: when called in the main thread) installs the
        SIGTERM and SIGINT handlers; a second signal acts as it did before (SIGINT
        raises :class:`KeyboardInterrupt`), for when a handler hangs.
        """
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        previous: dict[int, Any] = {}
        received: list[int] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            # Only note it: taking a lock here could deadlock with the interrupted code.
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            received.append(signum)

        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, on_signal)
        try:
            self.start()
            last = self.counts.snapshot()
            summary_at = time.monotonic() + self.summary_interval
            while not self._stopping.is_set():
                if received:
                    _log_signal(received[0])
                    self.stop()
                    break
                if time.monotonic() >= summary_at:
                    last = _log_summary(self.summary_interval, last, self.counts.snapshot())
                    try:
                        _warn_held_back(self._broker.stats(*self._watched))
                    except BrokerError as exc:
                        _warn_held_back(exc)
                    summary_at += self.summary_interval
                self._stopping.wait(min(_SIGNAL_POLL, max(0.0, summary_at - time.monotonic())))
            self.join()
        finally:
            self.stop()
            for sig, handler in previous.items():
                if signal.getsignal(sig) is on_signal:
                    signal.signal(sig, handler)
        return _log_stopped(self.counts.snapshot())

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.join()

    # -- one consumer's thread ----------------------------------------------------

    def _handler(self, slot: _Slot[Consumer]) -> Handler:
        return _recording(slot, self.counts)

    def _serve(self, slot: _Slot[Consumer]) -> None:
        handler = self._handler(slot)
        while not self._stopping.is_set():
            slot.handler_failed = False
            try:
                slot.consumer.consume(handler, slot.plan.handler.count, handle_signals=False)
            except Exception as exc:
                fatal = _fatal(slot, exc)
                if fatal is not None:
                    with self._lock:
                        self._error = self._error or fatal
                    self.stop()
                    return  # leaving would be refused too
                self._stopping.wait(_failed(slot, exc))
        try:
            left: list[str] | BrokerError = slot.consumer.leave()
        except BrokerError as exc:
            left = exc
        _report_leaving(slot, left)


def _recording(slot: _Slot[Any], counts: HandledCounts) -> Handler:
    """The slot's handler, counting what it handled and noting when it raised.

    A coroutine function stays one (awaited); a plain function stays plain, so an
    asyncio consumer runs it in a worker thread, off the event loop.
    """
    function = slot.plan.handler.function
    if inspect.iscoroutinefunction(function):

        async def handle_async(events: list[Event]) -> None:
            started = time.monotonic()
            try:
                await function(events)
            except BaseException:
                slot.handler_failed = True
                raise
            _handled(slot, counts, events, started)

        return handle_async

    def handle(events: list[Event]) -> object:
        started = time.monotonic()
        try:
            result = function(events)
        except BaseException:
            slot.handler_failed = True
            raise
        _handled(slot, counts, events, started)
        return result

    return handle


def _handled(slot: _Slot[Any], counts: HandledCounts, events: list[Event], started: float) -> None:
    """Account for a batch the handler of ``slot`` handled."""
    slot.failures = 0
    counts.add(slot.plan.group, len(events))
    if log.isEnabledFor(logging.DEBUG):
        streams = dict.fromkeys(event.stream for event in events)
        log.debug(
            "consumer %s of group %s handled %s of %s in %.3f s",
            slot.plan.name,
            slot.plan.group,
            counted(len(events), "event"),
            ", ".join(streams),
            time.monotonic() - started,
            extra=_fields(slot),
        )


def _fatal(slot: _Slot[Any], exc: Exception) -> PoolAuthenticationError | None:
    """``exc`` when it stops the whole worker: the consumer's pool refused the credentials
    or a permission (a handler's own errors never do)."""
    if isinstance(exc, PoolAuthenticationError) and not slot.handler_failed:
        return exc
    return None


def _failed(slot: _Slot[Any], exc: Exception) -> float:
    """Log why the consumer of ``slot`` stopped; returns the delay before it restarts."""
    slot.failures += 1
    delay = restart_delay(slot.failures)
    name, group = slot.plan.name, slot.plan.group
    if slot.handler_failed:
        log.error(
            "consumer %s of group %s: the handler raised %s; the events it did not "
            "acknowledge stay pending and come back; starting again in %.1f s",
            name,
            group,
            type(exc).__name__,
            delay,
            exc_info=exc,
            extra=_fields(slot),
        )
    else:
        log.error(
            "consumer %s of group %s failed: %s; starting again in %.1f s",
            name,
            group,
            exc,
            delay,
            exc_info=None if isinstance(exc, BrokerError) else exc,
            extra=_fields(slot),
        )
    return delay


def _report_leaving(slot: _Slot[Any], left: list[str] | BrokerError) -> None:
    """Log how the stopped consumer of ``slot`` left its group (:meth:`Consumer.leave`)."""
    name, group = slot.plan.name, slot.plan.group
    if isinstance(left, BrokerError):
        log.warning(
            "consumer %s of group %s could not leave the group: %s",
            name,
            group,
            left,
            extra=_fields(slot),
        )
    elif left:
        log.info(
            "consumer %s of group %s stays in the group: it holds pending events of %s, "
            "which a live consumer takes over after retry_after",
            name,
            group,
            ", ".join(left),
            extra=_fields(slot),
        )
    else:
        log.debug("consumer %s left group %s", name, group, extra=_fields(slot))


def _fields(slot: _Slot[Any]) -> dict[str, str]:
    """The fields of a log line about the consumer of ``slot`` (see :mod:`.logs`)."""
    return {"group": slot.plan.group, "consumer": slot.plan.name}


class AsyncWorker:
    """Runs the handlers registered on an :class:`~streambroker.AsyncBroker` as tasks.

    The same settings and behaviour as :class:`Worker`; handlers may be coroutine
    functions (awaited) or plain functions (run in worker threads).
    """

    def __init__(
        self,
        broker: AsyncBroker,
        *,
        groups: Iterable[str] = (),
        consumers: int = 1,
        name_prefix: str | None = None,
        summary_interval: float = SUMMARY_INTERVAL,
    ) -> None:
        plans = plan_consumers(
            broker.handlers, groups=groups, consumers=consumers, name_prefix=name_prefix
        )
        self._slots = [
            _Slot(plan, broker.consumer(plan.group, plan.name, **plan.handler.options))
            for plan in plans
        ]
        self.summary_interval = _positive_interval(summary_interval)
        self._per_group = consumers
        self._broker = broker
        self._watched = _watched(broker, self._slots)
        self.counts = HandledCounts(dict.fromkeys(plan.group for plan in plans))
        self._stopping = asyncio.Event()
        self._error: PoolAuthenticationError | None = None

    @property
    def error(self) -> PoolAuthenticationError | None:
        """What stopped the worker, if anything did (see :attr:`Worker.error`)."""
        return self._error

    def readiness(self) -> str | None:
        """See :meth:`Worker.readiness`; safe to call from another thread."""
        return _readiness(self._slots, self._stopping.is_set())

    async def stop(self) -> None:
        """Ask every consumer to stop once its batch in hand is handled."""
        self._stopping.set()
        for slot in self._slots:
            await slot.consumer.stop()

    @contextlib.asynccontextmanager
    async def running(self, grace: float = 10.0) -> AsyncIterator[AsyncWorker]:
        """Run the worker in a task while the block runs, e.g. a web app's lifespan.

        On leaving, the consumers stop gracefully: the batch in hand is handled and
        acknowledged, and they leave their groups. After ``grace`` seconds the ones
        still running are cancelled (their unacknowledged events stay pending, and are
        delivered again). Raises the :attr:`error` that stopped the worker, if one did.
        """
        grace = _positive_interval(grace, "grace")
        task = asyncio.create_task(self.run(handle_signals=False))
        try:
            yield self
        finally:
            await self.stop()
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                log.warning("worker still running %g s after stop: cancelling it", grace)
                task.cancel()
                await asyncio.wait({task})
            if not task.cancelled():
                task.result()

    async def run(self, handle_signals: bool | None = None) -> dict[str, int]:
        """Run until :meth:`stop`, SIGTERM or SIGINT; returns the counts per group.

        Raises the :attr:`error` that stopped every consumer, if one did.
        """
        loop = asyncio.get_running_loop()
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        stopping: set[asyncio.Task[None]] = set()  # kept, so that no stop is collected early

        def on_signal(signum: int) -> None:
            _log_signal(signum)
            task = asyncio.ensure_future(self.stop())
            stopping.add(task)
            task.add_done_callback(stopping.discard)

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        tasks = [asyncio.create_task(self._serve(slot)) for slot in self._slots]
        _log_started(self._slots, self._per_group)
        try:
            last = self.counts.snapshot()
            while not self._stopping.is_set():
                await sleep(self.summary_interval, self._stopping)
                if self._stopping.is_set():
                    break
                last = _log_summary(self.summary_interval, last, self.counts.snapshot())
                try:
                    _warn_held_back(await self._broker.stats(*self._watched))
                except BrokerError as exc:
                    _warn_held_back(exc)
            await asyncio.gather(*tasks)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._error is not None:
            raise self._error
        return _log_stopped(self.counts.snapshot())

    async def _serve(self, slot: _Slot[AsyncConsumer]) -> None:
        handle = _recording(slot, self.counts)
        while not self._stopping.is_set():
            slot.handler_failed = False
            try:
                await slot.consumer.consume(handle, slot.plan.handler.count, handle_signals=False)
            except Exception as exc:
                fatal = _fatal(slot, exc)
                if fatal is not None:
                    self._error = self._error or fatal
                    await self.stop()
                    return  # leaving would be refused too
                await sleep(_failed(slot, exc), self._stopping)
        try:
            left: list[str] | BrokerError = await slot.consumer.leave()
        except BrokerError as exc:
            left = exc
        _report_leaving(slot, left)
