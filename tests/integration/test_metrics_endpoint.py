"""The `/metrics` endpoint against idle and slow clients, over real sockets on 127.0.0.1 port 0:
an idle connection is closed by the server after its timeout, connections over the cap are
turned away at once, and the endpoint answers again once the idle ones are gone."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from moemesh.services.metrics import Metrics, MetricsServer

pytestmark = pytest.mark.integration

IDLE_S = 1.0
CAP = 4
WAIT_S = 10.0  # generous: what the behaviour may take on a loaded machine, not a latency target


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    metrics = Metrics(CollectorRegistry())
    metrics.forward_tokens.labels("0").inc(7)
    server = metrics.serve("127.0.0.1", 0, idle_timeout_s=IDLE_S, max_connections=CAP)
    try:
        yield server
    finally:
        server.close()


def _connect(server: MetricsServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (b"" at once: closed, nothing said)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _scrape(server: MetricsServer) -> str | None:
    """The /metrics page, or None when the server turned the connection away."""
    try:
        with urllib.request.urlopen(server.url, timeout=WAIT_S) as reply:
            return reply.read().decode()
    except urllib.error.HTTPError as err:
        assert err.code == 503
    except (ConnectionError, urllib.error.URLError):
        pass
    return None


def test_an_idle_connection_is_closed_by_the_server(server):
    with _connect(server) as idle:
        assert _read_all(idle) == b""  # EOF from the server, not our timeout


def test_a_client_trickling_its_request_is_cut_off_too(server):
    with _connect(server) as slow:
        deadline = time.monotonic() + WAIT_S
        with pytest.raises(OSError):  # EPIPE / ECONNRESET once the server has closed
            while time.monotonic() < deadline:
                slow.sendall(b"G")
                time.sleep(IDLE_S / 5)
        assert time.monotonic() < deadline


def test_over_the_cap_is_turned_away_and_served_again_once_idle_clients_are_gone(server):
    idle = [_connect(server) for _ in range(CAP)]
    try:
        with _connect(server) as extra:
            assert _read_all(extra).startswith(b"HTTP/1.0 503")
        # Bounded attempts: the idle connections time out after IDLE_S, then a scrape is served.
        page = None
        for _ in range(int(WAIT_S / (IDLE_S / 5))):
            page = _scrape(server)
            if page is not None:
                break
            time.sleep(IDLE_S / 5)
        assert page is not None and 'moemesh_forward_tokens_total{layer="0"} 7.0' in page
        for sock in idle:
            assert _read_all(sock) == b""
    finally:
        for sock in idle:
            sock.close()


def test_scrapes_are_served_one_after_another(server):
    pages = [_scrape(server) for _ in range(3 * CAP)]  # each connection's slot is given back
    assert all(p is not None and "moemesh_forward_tokens_total" in p for p in pages)
