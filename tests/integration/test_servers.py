"""Every server: health, reflection, graceful stop, deadlines; and the CLI's local meshes."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moemesh.client import Client, DeadlineExceededError, UnavailableError
from moemesh.deploy.local import EmbeddedMesh, MeshConfig, ProcessMesh
from moemesh.experts.weights import open_source, preset_config
from moemesh.protos.spec import Segment
from moemesh.router.pipeline import DeadlineExceeded
from tests.references import assert_matches_reference

pytestmark = pytest.mark.integration


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status
        )


def _listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        return {s.name for reply in replies for s in reply.list_services_response.service}


def test_health_reflection_and_graceful_stop():
    mesh = EmbeddedMesh(MeshConfig("tiny-mixtral", num_hosts=2, device="cpu")).start()
    try:
        serving = health_pb2.HealthCheckResponse.SERVING
        assert _health(mesh.address) == serving
        assert _health(mesh.address, "moemesh.v1.Router") == serving
        assert _health(mesh.hosts[0].address, "moemesh.v1.Expert") == serving
        assert {"moemesh.v1.Router", "grpc.health.v1.Health"} <= _listed_services(mesh.address)
        assert "moemesh.v1.Expert" in _listed_services(mesh.hosts[1].address)

        # Stop one host: it refuses calls, and the router names what is now unreachable.
        host = mesh.hosts[0]
        mesh.call(host.server.stop(grace_s=2.0))
        with pytest.raises(grpc.RpcError) as info:
            _health(host.address, "moemesh.v1.Expert")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # A long deadline: UNAVAILABLE, not DEADLINE_EXCEEDED, proves the router answered at once.
        with Client(mesh.address, timeout=120) as client:
            with pytest.raises(UnavailableError, match=r"no live replica for layer 0 expert \d") as info:
                client.forward(torch.randn(64, 64), layer=0)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        mesh.close()


def test_process_mesh_serves_cli_processes():
    source = open_source("tiny-deepseek-v3")
    mesh = ProcessMesh(MeshConfig("tiny-deepseek-v3", num_hosts=3, device="cpu")).start()
    processes = [child.proc for child in mesh.children] + [mesh.router.proc]
    try:
        with Client(mesh.address) as c:
            assert len(c.topology().hosts) == 3
            layer = source.spec.layers[-1].layer
            hidden = torch.randn(16, source.spec.layers[0].hidden_size)
            out, routing = c.forward(hidden, layer=layer, return_routing=True)
    finally:
        mesh.close()
    assert_matches_reference(source, preset_config("tiny-deepseek-v3"), layer, hidden, out, routing)
    assert all(p.poll() is not None for p in processes)


class _HeldBank:
    """An expert host's bank whose computations wait for `release`: a host that does not answer."""

    def __init__(self, bank, release: threading.Event):
        self._bank, self._release = bank, release

    def __getattr__(self, name):
        return getattr(self._bank, name)

    def compute(self, segments, rows):
        self._release.wait(120)
        return self._bank.compute(segments, rows)

    def compute_many(self, requests, **kwargs):  # what an expert host's compute rounds call
        self._release.wait(120)
        return self._bank.compute_many(requests, **kwargs)


class _TimeoutRecorder:
    """The router's transport, recording the timeout the router gives each expert call."""

    def __init__(self, inner):
        self.inner = inner
        self.timeouts: list[float | None] = []

    async def compute(self, host, segments, rows, timeout):
        self.timeouts.append(timeout)
        return await self.inner.compute(host, segments, rows, timeout)


def test_slow_hosts_and_a_short_deadline_give_deadline_exceeded():
    """The caller's deadline reaches every expert call: the router gives it on (not None, never
    longer), and the transport holds its gRPC call to it. The hosts here never answer by themselves,
    so without the deadline the calls below would hang until the test releases the hosts."""
    release = threading.Event()
    mesh = EmbeddedMesh(MeshConfig("tiny-mixtral", num_hosts=2, device="cpu")).start()
    try:
        for host in mesh.hosts:
            host.servicer.bank = _HeldBank(host.servicer.bank, release)
        moe = mesh.router.servicer.moe
        transport = moe.transport
        moe.transport = recorder = _TimeoutRecorder(transport)

        with Client(mesh.address, timeout=2.0) as client:
            with pytest.raises(DeadlineExceededError) as info:
                client.forward(torch.randn(8, 64), layer=0)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert recorder.timeouts, "the router called no expert host"
        # the caller's 2 s, as the router received it (gRPC rounds the timeout header up slightly)
        assert all(t is not None and 0 < t <= 2.5 for t in recorder.timeouts), recorder.timeouts

        # The transport itself: a 0.5 s timeout on a host that does not answer is DEADLINE_EXCEEDED.
        host = mesh.hosts[0]
        layer, expert = host.servicer.bank.experts[0]
        call = transport.compute(
            host.servicer.host_id, [Segment(layer, expert, 0, 4)], torch.randn(4, 64), 0.5
        )
        with pytest.raises(DeadlineExceeded):
            mesh.call(call, timeout=30)
        assert not release.is_set()  # every answer above came from a deadline, none from a host
    finally:
        release.set()
        mesh.close()
