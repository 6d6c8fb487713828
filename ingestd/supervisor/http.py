"""The supervisor's HTTP endpoints: /metrics, /livez (and its older name /healthz), /readyz.

The server lives in the supervisor, so it must not be able to hurt it: at most
:data:`MAX_CONNECTIONS` connections are served at once (one more is closed at once),
each must send its request within :data:`READ_TIMEOUT` seconds, and each request's
work is bounded (a request line and headers of bounded size, GET only, no body read).
It speaks plain HTTP and asks no password: bind it to the loopback (the default) or a
private network, and put a TLS proxy with authentication in front to expose it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from ingestd import logs, metrics

log = logs.get("http")
MAX_CONNECTIONS = 16
READ_TIMEOUT = 5.0  # seconds a client has to send its request, and to take the answer
BACKLOG = 64


class _BoundedServer(ThreadingHTTPServer):
    """A thread a connection, but only :data:`MAX_CONNECTIONS` at once."""

    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, *args: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed, not queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve(addr: str, alive: Callable[[], bool],
          readiness: Callable[[], tuple[bool, dict[str, str]]],
          detail: Callable[[], dict[str, Any]] = dict) -> _BoundedServer:
    """Start the server on a daemon thread and return it. /readyz's body: ``ready`` and
    ``workers`` (each failing worker and why); ``/readyz?verbose`` adds ``detail`` (every
    slot's pid, state and restarts)."""
    host, _, port = addr.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT  # the socket's: a half-sent request is dropped

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/metrics":
                registry = CollectorRegistry()  # fresh per scrape, as multiprocess mode wants
                MultiProcessCollector(registry)
                with metrics.files_lock:
                    body = generate_latest(registry)
                self._send(200, body, CONTENT_TYPE_LATEST)
            elif path in ("/livez", "/healthz"):  # Kubernetes deprecated /healthz for /livez
                ok = alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"supervisor loop stalled\n")
            elif path == "/readyz":
                ok, problems = readiness()
                doc: dict[str, Any] = {"ready": ok, "workers": problems}
                if "verbose" in parse_qs(query, keep_blank_values=True):  # as Kubernetes
                    doc["detail"] = detail()
                body = orjson.dumps(doc)
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = _BoundedServer((host or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("serving /metrics /livez /healthz /readyz on %s", addr)
    return server
