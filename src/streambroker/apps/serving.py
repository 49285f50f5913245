"""A small HTTP server for operators: ``/metrics``, ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process runs; ``/readyz`` 200 once ``ready()``
says so (returns None), else 503 with its one-line reason; ``/metrics`` the
Prometheus exposition. It runs in a daemon thread beside the worker or exporter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import InvalidArgumentError

__all__ = ["OpsServer", "ReadyCheck"]

log = logging.getLogger("streambroker")

#: Why the process is not ready yet, or None when it is.
ReadyCheck = Callable[[], str | None]


class OpsServer:
    """Serves the three endpoints on ``host:port`` (port 0: a free one) until closed."""

    def __init__(
        self,
        exposition: Callable[[], bytes],
        ready: ReadyCheck,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        handler = _handler(exposition, ready)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="streambroker-metrics", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The host and port it listens on."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> OpsServer:
        """Start serving in a daemon thread."""
        self._thread.start()
        host, port = self.address
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d", host, port)
        return self

    def close(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()


def _handler(exposition: Callable[[], bytes], ready: ReadyCheck) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == "/metrics":
                self._reply(200, exposition(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                reason = ready()
                if reason is None:
                    self._reply(200, b"ready\n")
                else:
                    self._reply(503, f"not ready: {reason}\n".encode())
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics server: " + format, *args)

    return Handler
