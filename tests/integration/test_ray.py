"""The mesh on a real local Ray instance, with custom resources standing for mixed device types.

The tests of this module share one deployment and run in order: deploy → forward → failover of a
replicated host → a dead host whose experts have no other live replica.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from moemesh.client import AsyncClient, Client, UnavailableError  # noqa: E402
from moemesh.deploy.ray_mesh import RayMesh, RayMeshConfig, find_router, start_local_ray  # noqa: E402
from moemesh.deploy.traces.receiver import ReceiverThread  # noqa: E402
from moemesh.experts.weights import open_source, preset_config  # noqa: E402
from tests.references import assert_matches_reference  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = "tiny-mixtral"
H = 64
# Simulated cluster: one H100 and two A100s (compute stays on the CPU).
RESOURCES = {"device:H100": 1, "device:A100-80G": 2}


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=4, resources=RESOURCES)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def receiver(local_ray):
    """An OTLP receiver the actors export their spans to (they get the OTEL_* env from the deployer)."""
    with ReceiverThread() as r:
        yield r


@pytest.fixture(scope="module")
def mesh(local_ray, receiver):
    # replicas=16: every one of the 16 experts gets a second copy on another device.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    config = RayMeshConfig(MODEL, device="cpu", replicas=16, max_restarts=3, health_interval_s=1.0, env=env)
    m = RayMesh(config).start()
    try:
        yield m
    finally:
        m.close()


def _check(source, hidden, out, routing):
    """The mesh's routing and output equal the references, whose routing comes from the transformers
    router, not from the mesh."""
    assert_matches_reference(source, preset_config(MODEL), 0, hidden, out, routing)


def test_deploy_places_by_speed_and_results_equal_reference(mesh):
    source = open_source(MODEL)
    assert find_router() == mesh.address  # clients find the router by its Ray name
    with Client(mesh.address) as client:
        topo = client.topology()
        hidden = torch.randn(32, H, generator=torch.Generator().manual_seed(0))
        out, routing = client.forward(hidden, layer=0, return_routing=True)
    _check(source, hidden, out, routing)
    speeds = sorted(round(h.relative_speed, 3) for h in topo.hosts)
    assert len(topo.hosts) == 3 and speeds[-1] == 1.0 and speeds[0] < 1.0  # H100 vs A100s
    copies = {}
    for h in topo.hosts:
        for key in h.experts:
            copies[key] = copies.get(key, 0) + 1
    assert set(copies.values()) == {2} and len(copies) == 16  # every expert on two devices
    # The fastest device holds the most experts: placement follows speed.
    fastest = max(topo.hosts, key=lambda h: h.relative_speed)
    assert len(fastest.experts) == max(len(h.experts) for h in topo.hosts)


def test_one_trace_across_the_ray_actors(mesh, receiver):
    mine = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "ray-test-client"}))
    provider.add_span_processor(SimpleSpanProcessor(mine))
    try:
        with Client(mesh.address, tracer_provider=provider) as client:
            client.forward(torch.randn(32, H), layer=0)
        (sdk,) = mine.get_finished_spans()
    finally:
        provider.shutdown()
    trace_id = f"{sdk.context.trace_id:032x}"
    (plan,) = receiver.store.wait_for(
        lambda s: s.trace_id == trace_id and s.name == "moemesh.plan", timeout=60
    )
    hosts = len(plan.attributes["moemesh.hosts"])
    # router: server span + 4 stages + one client span per host; each host: server, queue_wait, compute
    spans = receiver.store.wait_for(trace_id, count=1 + 4 + hosts + 3 * hosts, timeout=60)
    ids = {s.span_id for s in spans} | {f"{sdk.context.span_id:016x}"}
    assert all(s.parent_span_id in ids for s in spans)  # every parent link resolves inside the trace
    services = {s.service_name for s in spans}
    assert services == {"moemesh-router", "moemesh-expert"}
    assert {s.resource.get("moemesh.host") for s in spans if s.service_name == "moemesh-expert"} <= {
        f"host-{i}" for i in range(3)
    }


def test_failover_zero_errors_and_restarted_host_serves_again(mesh, receiver):
    source = open_source(MODEL)
    victim = mesh.host(1)
    before = ray.get(victim.describe.remote())
    results, errors = [], []  # results: (hidden, out, routing), checked once the stream is done

    def stream():
        with Client(mesh.address, timeout=30) as client:
            for i in range(200):
                hidden = torch.randn(16, H, generator=torch.Generator().manual_seed(100 + i))
                try:
                    out, routing = client.forward(hidden, layer=0, return_routing=True)
                    results.append((hidden, out, routing))
                except Exception as err:  # counted, then asserted to be none
                    errors.append(repr(err))

    worker = threading.Thread(target=stream)
    worker.start()
    while len(results) < 30 and worker.is_alive():
        time.sleep(0.01)
    ray.kill(victim, no_restart=False)  # Ray restarts it
    worker.join(timeout=300)
    assert errors == []
    assert len(results) == 200
    for hidden, out, routing in results:
        _check(source, hidden, out, routing)

    # Zero errors because the router re-sent the dead host's rows to other replicas: its dispatch
    # spans say so (a forward that never met the dead host would show no retry).
    (retried, *_) = receiver.store.wait_for(
        lambda s: (
            s.name == "moemesh.dispatch"
            and s.attributes.get("moemesh.retries", 0) >= 1
            and before["host_id"] in s.attributes.get("moemesh.failed_hosts", ())
        ),
        timeout=60,
    )
    assert retried.service_name == "moemesh-router"

    # The restarted actor reloads its experts, re-registers on a new port, and gets traffic again.
    deadline = time.monotonic() + 120
    after = None
    while time.monotonic() < deadline:
        try:
            after = ray.get(victim.describe.remote(), timeout=10)
            break
        except Exception:
            time.sleep(0.5)
    assert after is not None and after["pid"] != before["pid"]
    with Client(mesh.address) as client:
        hosts = {h.host_id: h for h in client.topology().hosts}
    assert hosts[after["host_id"]].address == after["address"] and hosts[after["host_id"]].healthy

    async def burst():
        async with AsyncClient(mesh.address) as client:
            batch = [torch.randn(64, H) for _ in range(8)]
            return await asyncio.gather(
                *(client.forward(b, layer=0, return_routing=True) for b in batch)
            ), batch

    outs, batch = asyncio.run(burst())
    for hidden, (out, routing) in zip(batch, outs):
        _check(source, hidden, out, routing)
    assert ray.get(victim.describe.remote())["rows_served"] > 0


def test_no_live_replica_is_unavailable_naming_layer_and_expert(mesh):
    # Both hosts of expert (0, 0) die for good.
    with Client(mesh.address) as client:
        holders = [h.host_id for h in client.topology().hosts if (0, 0) in h.experts]
    assert len(holders) == 2
    for host_id in holders:
        ray.kill(mesh.host(int(host_id.split("-")[1])), no_restart=True)
    # A long deadline: UNAVAILABLE (not DEADLINE_EXCEEDED) proves the router answered at once
    # instead of waiting for a replica to come back.
    with Client(mesh.address, timeout=120) as client:
        with pytest.raises(UnavailableError, match=r"no live replica for layer \d+ expert \d+") as info:
            client.forward(torch.randn(256, H), layer=0)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert info.value.__cause__.code() == grpc.StatusCode.UNAVAILABLE
