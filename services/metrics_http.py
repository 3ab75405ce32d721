"""The `/metrics` HTTP endpoint: prometheus_client's WSGI app on a thread-per-connection server
that an idle or slow client cannot hold forever.

- A connection must deliver its whole request within `idle_timeout_s` of being accepted (a
  silent client and one trickling a byte at a time are both cut off), and a reply waits at most
  `idle_timeout_s` on a client that does not read. Its thread then ends and the socket is closed.
- At most `max_connections` connections are served at once (a thread each); the next ones get
  `503 Service Unavailable` straight away and are closed, so the accept loop never waits.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

# A scraper sends its request at once; Prometheus's own scrape timeout defaults to 10 s.
DEFAULT_IDLE_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 16
_BUSY_REPLY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass
class MetricsServer:
    """The HTTP server behind `/metrics`; `close()` stops it."""

    host: str
    port: int
    _httpd: _MetricsHTTPServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_registry(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> MetricsServer:
    """Serve `registry` at `/metrics` on a daemon thread; port 0 binds any free port.
    Raises OSError when the address cannot be bound."""
    if not (idle_timeout_s > 0 and max_connections >= 1):
        raise ValueError(
            f"need idle_timeout_s > 0 and max_connections >= 1: {idle_timeout_s}, {max_connections}"
        )
    httpd = _MetricsHTTPServer((host, port), idle_timeout_s, max_connections)
    httpd.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(host, httpd.server_port, httpd, thread)


class _MetricsHTTPServer(ThreadingWSGIServer):
    """prometheus_client's thread-per-connection WSGI server with at most `max_connections`
    threads, whose connections give up on their client after `idle_timeout_s`."""

    def __init__(self, address: tuple[str, int], idle_timeout_s: float, max_connections: int) -> None:
        host, port = address
        # What prometheus_client's own server does: bind "::1" or "::" as IPv6, the rest as given.
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        self.address_family = infos[0][0]
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _MetricsHandler)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            # Full: say so without waiting on this client (a fresh socket's send buffer is empty),
            # and take what it sent already: closing on unread bytes would reset the connection
            # and could lose the 503 on its way.
            request.setblocking(False)
            with contextlib.suppress(OSError):
                request.send(_BUSY_REPLY)
                request.recv(65536)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        # A client that timed out or went away is routine, not a traceback on stderr.
        log.debug("metrics connection from %s ended", client_address, exc_info=True)


class _ClientStream(io.RawIOBase):
    """A client socket as the handler's files: reads end `idle_timeout_s` after the connection
    was accepted, in all; each write waits at most `idle_timeout_s`."""

    def __init__(self, sock: socket.socket, idle_timeout_s: float) -> None:
        self._sock = sock
        self._timeout_s = idle_timeout_s
        self._deadline = time.monotonic() + idle_timeout_s

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete request within {self._timeout_s:g} s")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)

    def write(self, data) -> int:
        self._sock.settimeout(self._timeout_s)
        self._sock.sendall(data)
        return len(data)


class _MetricsHandler(WSGIRequestHandler):
    """One HTTP request per connection, read and written through `_ClientStream`; no access log."""

    def setup(self) -> None:
        self.connection = self.request
        stream = _ClientStream(self.request, self.server.idle_timeout_s)
        self.rfile = io.BufferedReader(stream)
        self.wfile = stream

    def log_message(self, format: str, *args) -> None:
        pass
