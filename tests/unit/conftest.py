"""Unit tests run without a network and without Ray; a guard makes every attempt fail loudly.

While tests/unit runs, these raise `NetworkInUnitTest`:

- connect / connect_ex / bind on an AF_INET or AF_INET6 socket (AF_UNIX stays allowed: asyncio's
  event loops wake themselves through a Unix socketpair);
- gRPC channels and servers, sync and asyncio (gRPC's C core opens its sockets outside Python's
  `socket` module, so the socket guard alone would not see them);
- `ray.init`.

Every attempt is also recorded, and the test fails at teardown even if the code under test caught
the error. A test that needs any of these belongs in tests/integration.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import grpc
import grpc.aio
import pytest
import ray

_INET = (socket.AF_INET, socket.AF_INET6)
_SOCKET_METHODS = ("connect", "connect_ex", "bind")
_GRPC_FACTORIES = (
    (grpc, "grpc", ("insecure_channel", "secure_channel", "server")),
    (grpc.aio, "grpc.aio", ("insecure_channel", "secure_channel", "server")),
)


class NetworkInUnitTest(RuntimeError):
    """A unit test tried to open an inet socket, a gRPC channel or server, or to start Ray."""


class NetworkGuard:
    """Refuses network and Ray use and remembers each attempt (`take` hands them over)."""

    error = NetworkInUnitTest

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, what: str) -> None:
        self.attempts.append(what)
        raise NetworkInUnitTest(
            f"{what}: unit tests may not open sockets, gRPC channels or servers, or start Ray; "
            "move this test to tests/integration"
        )

    def take(self) -> list[str]:
        """The attempts recorded so far, forgotten here (for tests of the guard itself)."""
        taken, self.attempts = self.attempts, []
        return taken

    def _socket_method(self, name: str) -> Callable:
        original = getattr(socket.socket, name)

        def guarded(sock: socket.socket, *args, **kwargs):
            if sock.family in _INET:
                self.refuse(f"socket.{name}{args!r}")
            return original(sock, *args, **kwargs)

        return guarded

    def _refuser(self, name: str) -> Callable:
        def refused(*args, **kwargs):
            self.refuse(f"{name}{args!r}")

        return refused

    def install(self, patch: pytest.MonkeyPatch) -> None:
        for name in _SOCKET_METHODS:
            patch.setattr(socket.socket, name, self._socket_method(name))
        for module, prefix, names in _GRPC_FACTORIES:
            for name in names:
                patch.setattr(module, name, self._refuser(f"{prefix}.{name}"))
        patch.setattr(ray, "init", self._refuser("ray.init"))


# Package scope: set up before any module- or class-scoped fixture of tests/unit (so a fixture that
# starts a server is refused too), and undone when tests/unit is done, so that integration tests in
# the same pytest run keep their network.
@pytest.fixture(scope="package", autouse=True)
def _no_network_guard() -> Iterator[NetworkGuard]:
    guard = NetworkGuard()
    with pytest.MonkeyPatch.context() as patch:
        guard.install(patch)
        yield guard


@pytest.fixture(autouse=True)
def _no_network_attempts(_no_network_guard: NetworkGuard) -> Iterator[None]:
    yield
    attempts = _no_network_guard.take()
    if attempts:
        pytest.fail(f"unit test tried to use the network or Ray (caught or not): {attempts}", pytrace=False)


@pytest.fixture
def network_guard(_no_network_guard: NetworkGuard) -> NetworkGuard:
    """The guard, for tests that prove it works."""
    return _no_network_guard
