"""One forward is one trace: SDK → router → gate/plan/dispatch/combine → one call per expert host →
that host's server span → queue wait and compute; in one process and across processes. Also:
`moemesh trace` renders what the receiver recorded, and with no endpoint nothing is traced."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moemesh.client import Client, InvalidArgumentError
from moemesh.deploy import cli
from moemesh.deploy.local import EmbeddedMesh, MeshConfig, ProcessMesh
from moemesh.deploy.traces.receiver import ReceiverThread
from moemesh.deploy.traces.records import load_jsonl
from moemesh.deploy.traces.view import waterfall
from moemesh.protos.spec import Segment
from moemesh.router.pipeline import HostUnavailable
from moemesh.services.bootstrap import ServerConfig, start_server
from moemesh.services.telemetry import Telemetry
from moemesh.services.transport import GrpcTransport

pytestmark = pytest.mark.integration

MODEL = "tiny-mixtral"  # 8 experts, top-2, hidden 64
H, K = 64, 2
FORWARD, COMPUTE = "moemesh.v1.Router/Forward", "moemesh.v1.Expert/Compute"
STAGES = ("moemesh.gate", "moemesh.plan", "moemesh.dispatch", "moemesh.combine")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Span:
    """What the tree checks need, from an SDK span or a received SpanRecord alike."""

    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str | None
    attributes: dict[str, Any]
    service: str
    start_ns: int
    end_ns: int


def _from_sdk(s) -> Span:
    return Span(
        s.name,
        s.kind.name,
        f"{s.context.trace_id:032x}",
        f"{s.context.span_id:016x}",
        f"{s.parent.span_id:016x}" if s.parent is not None else None,
        dict(s.attributes),
        str(s.resource.attributes.get("service.name", "")),
        s.start_time,
        s.end_time,
    )


def _from_record(r) -> Span:
    return Span(
        r.name,
        r.kind,
        r.trace_id,
        r.span_id,
        r.parent_span_id,
        dict(r.attributes),
        r.service_name,
        r.start_ns,
        r.end_ns,
    )


def check_forward_tree(spans: list[Span], tokens: int, routing) -> dict[str, list[Span]]:
    """Assert the whole tree of one forward, every parent link and the key attributes.
    Returns the spans by name."""
    assert len({s.trace_id for s in spans}) == 1, "one forward must be one trace"
    by_id = {s.span_id: s for s in spans}
    named: dict[str, list[Span]] = {}
    for s in spans:
        named.setdefault(s.name, []).append(s)

    def parent(s: Span) -> Span:
        assert s.parent_id in by_id, f"{s.name}: parent {s.parent_id} is not in the trace"
        return by_id[s.parent_id]

    (sdk,) = [s for s in named[FORWARD] if s.kind == "CLIENT"]
    (router,) = [s for s in named[FORWARD] if s.kind == "SERVER"]
    assert sdk.parent_id is None
    assert parent(router) is sdk
    assert sdk.attributes["moemesh.tokens"] == tokens and sdk.attributes["moemesh.layer"] == 0
    assert sdk.attributes["moemesh.routing.policy"] == "default"
    for span in (sdk, router):
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "moemesh.v1.Router"
        assert span.attributes["rpc.method"] == "Forward"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.attributes["server.port"] > 0

    stages = {name: named[name] for name in STAGES}
    assert all(len(v) == 1 for v in stages.values()), {k: len(v) for k, v in stages.items()}
    gate, plan, dispatch, combine = (stages[name][0] for name in STAGES)
    for stage in (gate, plan, dispatch, combine):
        assert parent(stage) is router
        assert stage.attributes["moemesh.layer"] == 0
    assert gate.attributes["moemesh.tokens"] == tokens

    # Tokens per expert: the routing decision, and tokens × k in all.
    per_expert = list(plan.attributes["moemesh.tokens_per_expert"])
    expected = torch.bincount(routing.experts[routing.experts >= 0], minlength=8).tolist()
    assert per_expert == expected
    assert sum(per_expert) == tokens * K
    assert plan.attributes["moemesh.experts_activated"] == sum(1 for n in per_expert if n)
    hosts = list(plan.attributes["moemesh.hosts"])
    rows_per_host = dict(zip(hosts, plan.attributes["moemesh.rows_per_host"]))
    assert list(dispatch.attributes["moemesh.hosts"]) == hosts
    assert dispatch.attributes["moemesh.retries"] == 0
    assert list(dispatch.attributes["moemesh.failed_hosts"]) == []

    # One client span per host under dispatch; that host's server span under it; then its queue
    # wait and compute.
    calls = [s for s in named[COMPUTE] if s.kind == "CLIENT"]
    served = [s for s in named[COMPUTE] if s.kind == "SERVER"]
    assert sorted(c.attributes["moemesh.host"] for c in calls) == sorted(hosts)
    assert len(served) == len(hosts)
    for call in calls:
        host = call.attributes["moemesh.host"]
        assert parent(call) is dispatch
        assert call.attributes["moemesh.rows"] == rows_per_host[host]
        assert call.attributes["moemesh.retry"] is False
        assert call.attributes["rpc.grpc.status_code"] == 0
        assert call.attributes["moemesh.bytes_sent"] > rows_per_host[host] * H * 4
        assert call.attributes["moemesh.bytes_received"] > rows_per_host[host] * H * 4
    for server in served:
        call = parent(server)
        assert call.kind == "CLIENT" and call.name == COMPUTE
        assert server.attributes["moemesh.host"] == call.attributes["moemesh.host"]
        assert server.attributes["server.port"] == call.attributes["server.port"]
        children = [s for s in spans if s.parent_id == server.span_id]
        (queue,) = [s for s in children if s.name == "moemesh.queue_wait"]
        (compute,) = [s for s in children if s.name == "moemesh.compute"]
        assert queue.end_ns == compute.start_ns  # the wait ends when the executor starts the work
        assert compute.attributes["moemesh.device"] == "cpu"
        assert compute.attributes["moemesh.dtype"] == "float32"
        assert compute.attributes["moemesh.rows"] == call.attributes["moemesh.rows"]
        assert list(compute.attributes["moemesh.experts"]) == list(call.attributes["moemesh.experts"])
    assert len(spans) == 2 + len(STAGES) + 4 * len(hosts), sorted(s.name for s in spans)
    return named


@pytest.fixture(scope="module")
def traced_mesh():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "moemesh-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with EmbeddedMesh(
            MeshConfig(MODEL, num_hosts=3, device="cpu"), telemetry=Telemetry(provider)
        ) as mesh:
            with Client(mesh.address, tracer_provider=provider) as client:
                yield client, exporter
    finally:
        provider.shutdown()


def test_one_forward_is_one_span_tree(traced_mesh):
    client, exporter = traced_mesh
    exporter.clear()
    hidden = torch.randn(48, H)
    _, routing = client.forward(hidden, layer=0, return_routing=True)
    spans = [_from_sdk(s) for s in exporter.get_finished_spans()]
    check_forward_tree(spans, 48, routing)


def test_a_rejected_forward_is_traced_with_its_status(traced_mesh):
    client, exporter = traced_mesh
    exporter.clear()
    with pytest.raises(InvalidArgumentError):
        client.forward(torch.randn(4, H + 1), layer=0)
    # An abort sends the status before the handler unwinds: the server span may end just after.
    deadline = time.monotonic() + 10
    while len(exporter.get_finished_spans()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    spans = [_from_sdk(s) for s in exporter.get_finished_spans()]
    assert sorted((s.name, s.kind) for s in spans) == [(FORWARD, "CLIENT"), (FORWARD, "SERVER")]
    server = next(s for s in exporter.get_finished_spans() if s.kind.name == "SERVER")
    client_span = next(s for s in exporter.get_finished_spans() if s.kind.name == "CLIENT")
    assert server.attributes["rpc.grpc.status_code"] == 3 == client_span.attributes["rpc.grpc.status_code"]
    # RPC conventions: INVALID_ARGUMENT is the caller's error, not the server's.
    assert server.status.status_code.name == "UNSET"
    assert client_span.status.status_code.name == "ERROR"


def test_a_call_to_a_host_that_is_gone_is_a_client_span_with_the_rpc_status():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    async def call_a_gone_host() -> str:
        server = await start_server(ServerConfig(port=0), [])
        address = server.address
        await server.stop(0)  # bound on port 0 and stopped: nothing listens there any more
        transport = GrpcTransport({"gone": address}, telemetry=Telemetry(provider))
        try:
            with tracer.start_as_current_span("dispatch"), pytest.raises(HostUnavailable):
                await transport.compute("gone", [Segment(0, 3, 0, 2)], torch.zeros(2, H), timeout=10)
        finally:
            await transport.close()
        return address

    try:
        address = asyncio.run(call_a_gone_host())
    finally:
        provider.shutdown()
    dispatch, call = (
        next(s for s in exporter.get_finished_spans() if s.name == name) for name in ("dispatch", COMPUTE)
    )
    assert call.kind.name == "CLIENT" and call.parent.span_id == dispatch.context.span_id
    host, port = address.rsplit(":", 1)
    assert call.attributes["rpc.system"] == "grpc"
    assert (call.attributes["rpc.service"], call.attributes["rpc.method"]) == ("moemesh.v1.Expert", "Compute")
    assert (call.attributes["server.address"], call.attributes["server.port"]) == (host, int(port))
    assert call.attributes["moemesh.host"] == "gone" and call.attributes["moemesh.rows"] == 2
    assert list(call.attributes["moemesh.experts"]) == [3] and call.attributes["moemesh.retry"] is False
    assert call.attributes["rpc.grpc.status_code"] == 14  # UNAVAILABLE
    assert call.status.status_code.name == "ERROR"


def test_trace_across_processes_and_moemesh_trace_show(tmp_path):
    jsonl = tmp_path / "spans.jsonl"
    with ReceiverThread(jsonl_path=jsonl) as receiver:
        mine = InMemorySpanExporter()  # to learn the trace id
        provider = TracerProvider(resource=Resource.create({"service.name": "moemesh-test-client"}))
        provider.add_span_processor(SimpleSpanProcessor(mine))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint)))
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "5",
        }
        try:
            with (
                ProcessMesh(MeshConfig(MODEL, num_hosts=2, device="cpu", env=env)) as mesh,
                Client(mesh.address, tracer_provider=provider) as client,
            ):
                _, routing = client.forward(torch.randn(32, H), layer=0, return_routing=True)
                (sdk,) = mine.get_finished_spans()
                trace_id = f"{sdk.context.trace_id:032x}"
                (plan,) = receiver.store.wait_for(
                    lambda s: s.trace_id == trace_id and s.name == "moemesh.plan", timeout=30
                )
                expected = 2 + len(STAGES) + 4 * len(plan.attributes["moemesh.hosts"])
                records = receiver.store.wait_for(trace_id, count=expected, timeout=30)
        finally:
            provider.shutdown()

    spans = [_from_record(r) for r in records]
    named = check_forward_tree(spans, 32, routing)
    # No process started a trace of its own: every server span received belongs to this forward.
    servers = [r for r in receiver.store.all_spans() if r.kind == "SERVER" and r.name in (FORWARD, COMPUTE)]
    assert len(servers) == 1 + len(named[COMPUTE]) // 2
    assert {r.trace_id for r in servers} == {trace_id}
    # Each process names itself: client, router, expert hosts (with their host id).
    by_service: dict[str, set[str]] = {}
    for s in spans:
        by_service.setdefault(s.service, set()).add(f"{s.name}/{s.kind}")
    assert by_service == {
        "moemesh-test-client": {f"{FORWARD}/CLIENT"},
        "moemesh-router": {f"{FORWARD}/SERVER", *(f"{n}/INTERNAL" for n in STAGES), f"{COMPUTE}/CLIENT"},
        "moemesh-expert": {f"{COMPUTE}/SERVER", "moemesh.queue_wait/INTERNAL", "moemesh.compute/INTERNAL"},
    }
    for r in records:
        if r.service_name == "moemesh-expert" and r.kind == "SERVER":
            assert r.attributes["moemesh.host"] == r.resource["moemesh.host"]

    # `moemesh trace` shows what the receiver recorded: a waterfall and a PNG timeline.
    store = load_jsonl(jsonl)
    text = waterfall(store.spans(trace_id))
    lines = text.splitlines()
    assert lines[0].startswith(f"trace {trace_id}") and f"{expected} spans" in lines[0]
    assert len(lines) == 2 + expected
    for name in (FORWARD, COMPUTE, *STAGES, "moemesh.queue_wait", "moemesh.compute"):
        assert any(line.lstrip().startswith(name) for line in lines[2:]), name
    assert any("moemesh-expert@host-0" in line for line in lines)
    png = tmp_path / "trace.png"
    assert cli.main(["trace", "show", "--file", str(jsonl), trace_id[:10], "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert cli.main(["trace", "list", "--file", str(jsonl)]) == 0
    assert cli.main(["trace", "show", "--file", str(jsonl), "0" * 32]) == 1  # no such trace


_NOTHING_TRACED = """
import json, threading, torch
from opentelemetry import trace
from moemesh.client import Client
from moemesh.deploy.local import EmbeddedMesh, MeshConfig
from moemesh.services.telemetry import Telemetry, configure_tracing

provider = configure_tracing("moemesh-test")
with EmbeddedMesh(MeshConfig("tiny-mixtral", num_hosts=2, device="cpu")) as mesh, Client(mesh.address) as c:
    c.forward(torch.randn(8, 64), layer=0)
    threads = sorted(t.name for t in threading.enumerate())
    probe = Telemetry().tracer().start_span("probe")
print(json.dumps({
    "provider": provider is not None,
    "global": type(trace.get_tracer_provider()).__name__,
    "recording": probe.is_recording(),
    "threads": threads,
}))
"""

_TRACING_ON = """
import json, threading
from moemesh.services.telemetry import configure_tracing
provider = configure_tracing("moemesh-test")
print(json.dumps({"provider": type(provider).__name__, "threads": sorted(t.name for t in threading.enumerate())}))
provider.shutdown()
"""


def _run(script: str, **extra_env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra_env)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _exporter_threads(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("OtelBatch") or "otel" in n.lower()]


def test_tracing_disabled_records_nothing_and_starts_no_exporter_thread():
    off = _run(_NOTHING_TRACED)
    assert off["provider"] is False
    assert off["global"] == "ProxyTracerProvider"  # the API's no-op: no SDK provider installed
    assert off["recording"] is False
    assert _exporter_threads(off["threads"]) == []
    assert any(n.startswith("moemesh-") for n in off["threads"])  # the list is the real one

    # The same check sees the exporter's thread when an endpoint is configured.
    on = _run(_TRACING_ON, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert on["provider"] == "TracerProvider"
    assert _exporter_threads(on["threads"])


_WITHOUT_OTEL = """
import json, sys
# As if the `otel` extra were not installed: the OpenTelemetry API and its gRPC instrumentation
# are base dependencies; the SDK, the OTLP exporter and prometheus_client are the extra.
for name in ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.proto", "prometheus_client"):
    sys.modules[name] = None
import torch
from moemesh.client import Client
from moemesh.deploy.local import EmbeddedMesh, MeshConfig
from moemesh.services.telemetry import configure_tracing

provider = configure_tracing("moemesh-test")
with EmbeddedMesh(MeshConfig("tiny-mixtral", num_hosts=2, device="cpu")) as mesh, Client(mesh.address) as c:
    out = c.forward(torch.randn(8, 64), layer=0)
print(json.dumps({"provider": provider is not None, "shape": list(out.shape)}))
"""


def test_the_mesh_works_without_the_otel_extra():
    # An endpoint is set, yet without the OpenTelemetry SDK tracing stays off and nothing fails.
    result = _run(_WITHOUT_OTEL, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert result == {"provider": False, "shape": [8, 64]}
