"""Every server: health, reflection, graceful stop; and the CLI's local meshes."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moemesh.client import Client, UnavailableError
from moemesh.deploy.local import EmbeddedMesh, MeshConfig, ProcessMesh
from moemesh.experts.weights import open_source
from tests.references import dense_reference

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
        with Client(mesh.address) as client:
            with pytest.raises(UnavailableError, match=r"no live replica for layer 0 expert \d"):
                client.forward(torch.randn(64, 64), layer=0)
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
    expected = dense_reference(source, layer, hidden, routing.experts, routing.weights)
    assert (out.double() - expected).abs().max().item() <= 1e-5
    assert all(p.poll() is not None for p in processes)
