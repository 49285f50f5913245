"""A web dashboard for operators: live figures of the streams, their groups and
consumers, the recent events of a stream, and a group's dead letters to replay.

Needs Starlette, uvicorn and Jinja2 (``pip install 'streambroker[dashboard]'``);
``streambroker dashboard --port PORT`` serves it. One :class:`AsyncBroker` serves
every request on the server's event loop; the statistics are read at most once per
second (:class:`Figures`) however many browsers poll them, and the last minute of
readings gives the rates.

Every value from the server or an event is shown as text: HTML-escaped by the
templates (or set as text by the page's script), with the characters a terminal
could act on escaped as the command line escapes them.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

try:
    import uvicorn
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "streambroker's dashboard needs starlette, uvicorn and jinja2: "
        "pip install 'streambroker[dashboard]'"
    ) from exc

from ..async_broker import AsyncBroker
from ..config.registry import ValidatedRegistry
from ..core.stats import GroupStats, StreamStats
from ..errors import BrokerError, InvalidArgumentError, UnknownGroupError, UnknownStreamError
from .text import counted, duration, event_record, safe, stats_rates

__all__ = ["Figures", "create_app", "serve"]

log = logging.getLogger("streambroker.apps.dashboard")

_FILES = Path(__file__).parent / "_dashboard"
#: The cookie that keeps the token once given in ``?token=``.
TOKEN_COOKIE = "streambroker_dashboard_token"
#: Recent events shown for a stream, dead letters shown for a group.
EVENTS_SHOWN = 20
LETTERS_SHOWN = 100
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")

Sample = tuple[float, list[StreamStats]]


class Figures:
    """The statistics of every registered stream as the page shows them, read through
    ``broker`` at most once per ``min_interval`` seconds whatever the number of
    readers; the readings of the last ``window`` seconds give the rates."""

    def __init__(
        self, broker: AsyncBroker, min_interval: float = 1.0, window: float = 60.0
    ) -> None:
        self._broker = broker
        self._min_interval = min_interval
        self._window = window
        self._lock = asyncio.Lock()
        self._samples: deque[Sample] = deque()
        self._view: dict[str, Any] = {}
        self._read_at = -float("inf")
        #: How many times the statistics were read from the servers.
        self.reads = 0

    async def view(self) -> dict[str, Any]:
        """The figures as JSON-compatible values (see :func:`figures_view`), read afresh
        unless the last reading is recent enough; when the reading fails, its error in
        ``error`` (and no streams) until the next one."""
        async with self._lock:
            if time.monotonic() - self._read_at >= self._min_interval:
                self.reads += 1
                try:
                    stats = await self._broker.stats()
                except BrokerError as exc:
                    self._view = {"error": safe(exc), "span": 0, "streams": [], "alerts": []}
                else:
                    self._samples.append((time.monotonic(), stats))
                    newest = self._samples[-1][0]
                    while newest - self._samples[0][0] > self._window:
                        self._samples.popleft()
                    self._view = figures_view(list(self._samples))
                self._read_at = time.monotonic()
            return self._view


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(part, safe="") for part in parts)


def _steps(samples: Sequence[Sample]) -> list[dict[str | tuple[str, str], float]]:
    """The rates between each two successive readings."""
    return [
        stats_rates(before, after, max(t1 - t0, 1e-3))
        for (t0, before), (t1, after) in itertools.pairwise(samples)
    ]


def _held(group: GroupStats) -> tuple[int, float | None]:
    """The events ``group`` holds back, and the age of the oldest of them."""
    ages = [a for a in (group.oldest_unread_age, group.lowest_pending_age) if a is not None]
    return group.lag + group.pending, max(ages, default=None)


def _stopped(group: GroupStats) -> bool:
    """Whether ``group`` holds events back with no live consumer: its consumers all
    stopped or crashed (a worker's consumers leave their group when they stop)."""
    return not any(consumer.alive for consumer in group.consumers) and _held(group)[0] > 0


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def figures_view(samples: Sequence[Sample]) -> dict[str, Any]:
    """What the page shows of the readings ``samples`` (oldest first): each stream of
    the newest with its groups and consumers, the rates over the span of the readings
    (published per second to each stream, acknowledged by each group) and their
    series, and an alert for each group whose consumers all stopped while it holds
    events back. Names are escaped (see the module), figures formatted."""
    (first_at, first), (last_at, last) = samples[0], samples[-1]
    rates = stats_rates(first, last, last_at - first_at) if len(samples) > 1 else {}
    steps = _steps(samples)

    def series(key: str | tuple[str, str]) -> list[float]:
        return [round(step.get(key, 0.0), 3) for step in steps]

    streams, alerts = [], []
    for stream in last:
        groups = []
        for group in stream.groups:
            live = sum(consumer.alive for consumer in group.consumers)
            held, age = _held(group)
            name = safe(group.group)
            if _stopped(group):
                alerts.append(
                    {
                        "stream": safe(stream.stream),
                        "group": name,
                        "held": held,
                        "age": duration(age),
                        "message": safe(
                            f"Consumer group {group.group} of stream {stream.stream} has no "
                            f"live consumer and holds back {counted(held, 'event')}, the "
                            f"oldest for {duration(age)}"
                        ),
                    }
                )
            groups.append(
                {
                    "group": name,
                    "url": _path("streams", stream.stream, "groups", group.group),
                    "lag": group.lag,
                    "lag_seconds": duration(group.oldest_unread_age),
                    "pending": group.pending,
                    "pending_age": duration(group.lowest_pending_age),
                    "dead_letters": group.dead_letters,
                    "live": live,
                    "stale": len(group.consumers) - live,
                    "stopped": _stopped(group),
                    "acked_per_s": _rate(rates.get((stream.stream, group.group))),
                    "acked_series": series((stream.stream, group.group)),
                    "consumers": [
                        {
                            "name": safe(consumer.name),
                            "pending": consumer.pending,
                            "idle": duration(consumer.idle),
                            "alive": consumer.alive,
                        }
                        for consumer in group.consumers
                    ],
                }
            )
        streams.append(
            {
                "stream": safe(stream.stream),
                "pool": safe(stream.pool),
                "url": _path("streams", stream.stream),
                "length": stream.length,
                "oldest": duration(stream.oldest_event_age),
                "published_per_s": _rate(rates.get(stream.stream)),
                "published_series": series(stream.stream),
                "groups": groups,
                "orphan_groups": [safe(name) for name in stream.orphan_groups],
            }
        )
    span = round(last_at - first_at)
    return {"error": None, "span": span, "streams": streams, "alerts": alerts}


# -- the web application -------------------------------------------------------------


def _templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_FILES / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    env.filters["shown"] = safe
    env.filters["path"] = lambda parts: _path(*parts)
    return env


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class _Guard(BaseHTTPMiddleware):
    """Checks the token (when one is set) and, on a loopback address, the Host header
    (a page of another site that rebinds its name to this address gets nothing)."""

    def __init__(self, app: Any, token: str | None, loopback_only: bool) -> None:
        super().__init__(app)
        self._token = token
        self._loopback_only = loopback_only

    @staticmethod
    def _authorized(request: Request, token: str) -> bool:
        bearer = request.headers.get("authorization", "")
        given = [
            bearer[7:] if bearer[:7].lower() == "bearer " else "",
            request.cookies.get(TOKEN_COOKIE, ""),
        ]
        return any(hmac.compare_digest(value.encode(), token.encode()) for value in given)

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if self._loopback_only and request.url.hostname not in _LOOPBACK_NAMES:
            return _plain(400, "this dashboard answers on its loopback address only")
        if self._token is not None:
            given = request.query_params.get("token")
            if given is not None:
                if not hmac.compare_digest(given.encode(), self._token.encode()):
                    return _plain(401, "wrong token")
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
                response: Response = RedirectResponse(target, status_code=303)
                response.set_cookie(
                    TOKEN_COOKIE, self._token, httponly=True, samesite="strict", path="/"
                )
                return response
            if not self._authorized(request, self._token):
                return _plain(
                    401,
                    "this dashboard needs its token: open it once with ?token=TOKEN "
                    "(then kept in a cookie), or send Authorization: Bearer TOKEN",
                )
        response = await call_next(request)
        response.headers.update(_SECURITY_HEADERS)
        return response


def _plain(status: int, text: str) -> Response:
    return Response(f"{status}: {text}\n", status, media_type="text/plain; charset=utf-8")


def create_app(
    registry: ValidatedRegistry,
    *,
    token: str | None = None,
    loopback_only: bool = True,
    min_interval: float = 1.0,
) -> Starlette:
    """The dashboard of ``registry``'s streams as an ASGI application; with ``token``,
    every request must carry it (see :func:`serve`). ``loopback_only``: answer only
    requests addressed to a loopback name (``127.0.0.1``, ``localhost``, ``[::1]``)."""
    env = _templates()
    csrf = secrets.token_urlsafe(24)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        broker = registry.async_broker()
        state["broker"], state["figures"] = broker, Figures(broker, min_interval)
        try:
            yield
        finally:
            await broker.close()

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(csrf=csrf, **context)
        return HTMLResponse(html, status)

    def failed(request: Request, exc: BrokerError) -> HTMLResponse:
        if isinstance(exc, UnknownStreamError | UnknownGroupError):
            status = 404
        else:
            status = 400 if isinstance(exc, InvalidArgumentError) else 502
        return page(request, "error.html", status, error=exc)

    async def overview(request: Request) -> Response:
        return page(request, "index.html")

    async def figures(request: Request) -> Response:
        return JSONResponse(await state["figures"].view())

    async def events(request: Request) -> Response:
        stream = request.path_params["stream"]
        try:
            latest = await state["broker"].latest(stream, EVENTS_SHOWN)
        except BrokerError as exc:
            return failed(request, exc)
        records = [event_record(event) for event in reversed(latest)]
        return page(request, "stream.html", stream=stream, events=records, dumps=_dumps)

    async def letters(request: Request) -> Response:
        stream, group = request.path_params["stream"], request.path_params["group"]
        try:
            found = await state["broker"].dead_letters(stream, group, LETTERS_SHOWN)
        except BrokerError as exc:
            return failed(request, exc)
        rows = [(letter, event_record(letter.event)) for letter in found]
        done = request.query_params.get("replayed", "")
        return page(
            request,
            "group.html",
            stream=stream,
            group=group,
            letters=rows,
            dumps=_dumps,
            replayed=int(done) if done.isdigit() else None,
            missing="missing" in request.query_params,
        )

    async def replay(request: Request) -> Response:
        stream, group = request.path_params["stream"], request.path_params["group"]
        form = parse_qs((await request.body()).decode(errors="replace"))
        refused = _forged(request, form, csrf)
        if refused:
            return _plain(403, refused)
        letter = (form.get("letter") or [""])[0]
        broker: AsyncBroker = state["broker"]
        try:
            if letter == "all":
                replayed = await broker.replay_dead_letters(stream, group)
            else:
                replayed = int(await broker.replay_dead_letter(stream, group, letter))
        except BrokerError as exc:
            return failed(request, exc)
        back = _path("streams", stream, "groups", group)
        query = f"replayed={replayed}" if replayed or letter == "all" else "missing=1"
        return RedirectResponse(f"{back}?{query}", status_code=303)

    return Starlette(
        routes=[
            Route("/", overview),
            Route("/api/figures", figures),
            Route("/streams/{stream}", events),
            Route("/streams/{stream}/groups/{group}", letters),
            Route("/streams/{stream}/groups/{group}/replay", replay, methods=["POST"]),
            Mount("/static", StaticFiles(directory=_FILES / "static"), name="static"),
        ],
        middleware=[Middleware(_Guard, token=token, loopback_only=loopback_only)],
        lifespan=lifespan,
    )


def _dumps(value: Any) -> str:
    return safe(json.dumps(value, ensure_ascii=False))


def _forged(request: Request, form: dict[str, list[str]], csrf: str) -> str | None:
    """Why a POST does not come from the dashboard's own page, or None when it does:
    its Origin (else Referer) must be this server, and its form must carry the
    page's CSRF value."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None or (origin != own and not origin.startswith(own + "/")):
        return "refused: this action must come from the dashboard's own page"
    given = (form.get("csrf") or [""])[0]
    if not hmac.compare_digest(given.encode(), csrf.encode()):
        return "refused: the page is out of date or not the dashboard's; reload it"
    return None


def serve(
    registry: ValidatedRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    announce: Callable[[str], object] = print,
) -> None:
    """Serve the dashboard on ``host:port`` (port 0: a free one) until SIGTERM or Ctrl-C;
    ``announce`` is given its address once it listens.

    With ``token``, each request must carry it: ``?token=TOKEN`` once (it is then kept
    in a cookie), or an ``Authorization: Bearer TOKEN`` header; else 401. A host other
    than a loopback address is logged as a warning.
    """
    loopback = _loopback(host)
    if not loopback:
        log.warning(
            "the dashboard on %s is open to other machines%s",
            host,
            "" if token else " without a token: anyone who reaches it may replay dead letters",
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        # Listening before the announcement: connections wait until the server takes them.
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InvalidArgumentError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
    bound_port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    app = create_app(registry, token=token, loopback_only=loopback)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    announce(f"http://{shown}:{bound_port}/")
    _Server(config).run(sockets=[sock])


class _Server(uvicorn.Server):
    """Ends gracefully on SIGTERM or Ctrl-C and returns, so that the command exits with 0
    as the exporter does (uvicorn would raise the signal again once stopped)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
