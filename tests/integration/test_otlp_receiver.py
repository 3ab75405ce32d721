"""The OTLP receiver against the real OpenTelemetry SDK exporter over gRPC on 127.0.0.1 port 0.

Two tracer providers with different `service.name` resources stand in for two processes (a
client and a router); the trace context crosses between them only as a W3C `traceparent`
carrier, as it does in gRPC metadata.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from moemesh.deploy.traces.receiver import ReceiverThread, start_receiver
from moemesh.deploy.traces.records import load_jsonl
from moemesh.deploy.traces.view import span_tree, waterfall

pytestmark = pytest.mark.integration

PROPAGATOR = TraceContextTextMapPropagator()


def _provider(service: str, port: int, batch: bool = False) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=10)
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return provider


def _client_and_router_spans(client: TracerProvider, router: TracerProvider) -> str:
    """client: forward (CLIENT) → router: Forward (SERVER) → gate, dispatch (ERROR); returns the
    trace id in hex. Context crosses the "process" boundary only through the carrier dict."""
    client_tracer = client.get_tracer("moemesh.client")
    router_tracer = router.get_tracer("moemesh.services")
    with client_tracer.start_as_current_span(
        "moemesh.v1.Router/Forward",
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "moemesh.layer": 0, "moemesh.tokens": 48},
    ) as call:
        trace_id = format(call.get_span_context().trace_id, "032x")
        metadata: dict[str, str] = {}
        PROPAGATOR.inject(metadata)
        # "The router process": it sees only the metadata, not the client's context objects.
        remote = PROPAGATOR.extract(metadata)
        with router_tracer.start_as_current_span(
            "moemesh.v1.Router/Forward",
            context=remote,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "moemesh.host": "router-0"},
        ):
            with router_tracer.start_as_current_span(
                "moemesh.gate", attributes={"moemesh.experts": [1, 3, 5], "moemesh.balance": 1.25}
            ):
                pass
            with router_tracer.start_as_current_span("moemesh.dispatch") as dispatch:
                dispatch.add_event("retry", {"moemesh.replica": 1})
                dispatch.set_status(Status(StatusCode.ERROR, "no replica alive for layer 0 expert 3"))
    return trace_id


def test_spans_of_two_services_arrive_as_one_trace_with_parent_links(tmp_path):
    jsonl = tmp_path / "spans.jsonl"

    async def scenario():
        server, port, store = await start_receiver("127.0.0.1", 0, jsonl_path=jsonl)
        client = router = None
        try:
            assert port > 0
            client = _provider("moemesh-client", port)
            router = _provider("moemesh-router", port)
            # The SDK exporter blocks its caller until the receiver replies: run it off the loop
            # that serves the receiver.
            trace_id = await asyncio.to_thread(_client_and_router_spans, client, router)
            spans = await store.wait_for_async(trace_id, count=4, timeout=20)
            return trace_id, spans, store
        finally:
            for provider in (client, router):
                if provider is not None:
                    await asyncio.to_thread(provider.shutdown)
            await server.stop(0.5)

    trace_id, spans, store = asyncio.run(scenario())

    assert {s.trace_id for s in spans} == {trace_id}
    assert [t.trace_id for t in store.traces()] == [trace_id]
    by_key = {(s.service_name, s.kind, s.name): s for s in spans}
    call = by_key[("moemesh-client", "CLIENT", "moemesh.v1.Router/Forward")]
    served = by_key[("moemesh-router", "SERVER", "moemesh.v1.Router/Forward")]
    gate = by_key[("moemesh-router", "INTERNAL", "moemesh.gate")]
    dispatch = by_key[("moemesh-router", "INTERNAL", "moemesh.dispatch")]
    assert call.parent_span_id is None
    assert served.parent_span_id == call.span_id
    assert gate.parent_span_id == served.span_id
    assert dispatch.parent_span_id == served.span_id

    assert call.attributes == {"rpc.system": "grpc", "moemesh.layer": 0, "moemesh.tokens": 48}
    assert gate.attributes == {"moemesh.experts": (1, 3, 5), "moemesh.balance": 1.25}
    assert served.attributes["moemesh.host"] == "router-0"
    assert served.resource["service.name"] == "moemesh-router"
    assert served.scope == "moemesh.services"
    assert dispatch.status_code == "ERROR"
    assert dispatch.status_message == "no replica alive for layer 0 expert 3"
    assert [(e.name, e.attributes) for e in dispatch.events] == [("retry", {"moemesh.replica": 1})]
    assert all(s.end_ns >= s.start_ns > 0 for s in spans)

    # The tree the waterfall draws follows those links.
    assert [(r.span.name, r.depth) for r in span_tree(spans)] == [
        ("moemesh.v1.Router/Forward", 0),
        ("moemesh.v1.Router/Forward", 1),
        ("moemesh.gate", 2),
        ("moemesh.dispatch", 2),
    ]
    assert "moemesh-router@router-0" in waterfall(spans)

    # Every span was appended to the .jsonl file, and it reads back equal.
    loaded = load_jsonl(jsonl)
    assert loaded.spans(trace_id) == store.spans(trace_id)


def test_receiver_thread_takes_batched_exports_of_several_traces(tmp_path):
    provider = None
    with ReceiverThread(jsonl_path=tmp_path / "spans.jsonl") as rx:
        try:
            assert rx.endpoint == f"http://127.0.0.1:{rx.port}"
            provider = _provider("moemesh-expert", rx.port, batch=True)
            tracer = provider.get_tracer("moemesh.experts")
            for request in range(3):
                with tracer.start_as_current_span(
                    "moemesh.v1.ExpertHost/Compute", attributes={"req": request}
                ):
                    for expert in range(10):
                        with tracer.start_as_current_span(
                            "moemesh.expert", attributes={"moemesh.expert": expert}
                        ):
                            pass
            assert provider.force_flush(20_000)
            rx.store.wait_for(count=33, timeout=20)
        finally:
            if provider is not None:
                provider.shutdown()

    traces = rx.store.traces()
    assert len(traces) == 3
    assert all(t.span_count == 11 and t.has_root for t in traces)
    assert all(t.root_name == "moemesh.v1.ExpertHost/Compute" for t in traces)
    assert all(t.services == ("moemesh-expert",) for t in traces)
    for t in traces:
        spans = rx.store.spans(t.trace_id)
        (root,) = [s for s in spans if s.parent_span_id is None]
        assert sorted(s.attributes["moemesh.expert"] for s in spans if s is not root) == list(range(10))
        assert all(s.parent_span_id == root.span_id for s in spans if s is not root)
    assert len(load_jsonl(tmp_path / "spans.jsonl")) == 33


def test_receiver_serves_health():
    async def scenario():
        server, port, _ = await start_receiver()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(
                        service="opentelemetry.proto.collector.trace.v1.TraceService"
                    ),
                    timeout=10,
                )
            return reply.status
        finally:
            await server.stop(0.5)

    assert asyncio.run(scenario()) == health_pb2.HealthCheckResponse.SERVING
