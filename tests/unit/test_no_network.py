"""The unit-test guard (tests/unit/conftest.py): inet sockets, gRPC and Ray fail loudly here."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import grpc.aio
import pytest
import ray


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["inet", "inet6"])
def test_inet_bind_and_connect_raise(network_guard, family):
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        with pytest.raises(network_guard.error, match="tests/integration"):
            sock.bind((host, 0))
        with pytest.raises(network_guard.error):
            sock.connect((host, 9))
        with pytest.raises(network_guard.error):
            sock.connect_ex((host, 9))
    assert len(network_guard.take()) == 3


def test_create_connection_raises(network_guard):
    with pytest.raises(network_guard.error):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    assert network_guard.take()


def test_grpc_channels_and_servers_raise(network_guard):
    for factory in (grpc.insecure_channel, grpc.aio.insecure_channel):
        with pytest.raises(network_guard.error, match="insecure_channel"):
            factory("127.0.0.1:9")
    with pytest.raises(network_guard.error, match=r"grpc\.server"):
        grpc.server(None)
    with pytest.raises(network_guard.error, match=r"grpc\.aio\.server"):
        grpc.aio.server()
    assert len(network_guard.take()) == 4


def test_ray_init_raises_and_ray_stays_down(network_guard):
    with pytest.raises(network_guard.error, match="ray.init"):
        ray.init(num_cpus=1)
    assert not ray.is_initialized()
    assert network_guard.take() == ["ray.init()"]


def test_a_caught_attempt_is_still_recorded(network_guard):
    # code under test that swallows the error must not hide the attempt
    with contextlib.suppress(Exception), socket.socket(socket.AF_INET) as sock:
        sock.bind(("127.0.0.1", 0))
    (attempt,) = network_guard.take()  # taken here, or the guard would fail this test at teardown
    assert attempt.startswith("socket.bind")


def test_unix_sockets_and_event_loops_still_work(network_guard):
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        a.sendall(b"x")
        assert b.recv(1) == b"x"
    assert asyncio.run(asyncio.sleep(0, result=7)) == 7
    assert network_guard.attempts == []
