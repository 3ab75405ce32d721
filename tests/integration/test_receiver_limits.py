"""The OTLP receiver's limits over real gRPC on 127.0.0.1 port 0: the span store stays within its
bounds however much is exported (and counts what it dropped), one request holding more spans than
the store keeps is taken in chunks, and a request over the message limit is refused with
RESOURCE_EXHAUSTED while the receiver keeps serving."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from moemesh.deploy.traces.receiver import DEFAULT_MAX_MESSAGE_BYTES, ReceiverThread
from moemesh.deploy.traces.records import StoreLimits, TraceStore

pytestmark = pytest.mark.integration

SPANS_PER_TRACE = 4


def export(first: int, count: int, name: str = "Compute") -> trace_service_pb2.ExportTraceServiceRequest:
    """Spans first .. first+count-1, SPANS_PER_TRACE to a trace, from one resource."""
    spans = [
        trace_pb2.Span(
            trace_id=(i // SPANS_PER_TRACE).to_bytes(16, "big"),
            span_id=(i + 1).to_bytes(8, "big"),
            name=name,
            start_time_unix_nano=i,
            end_time_unix_nano=i + 1,
        )
        for i in range(first, first + count)
    ]
    resource = resource_pb2.Resource(
        attributes=[common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value="x"))]
    )
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(resource=resource, scope_spans=[trace_pb2.ScopeSpans(spans=spans)])
        ]
    )


@pytest.fixture
def receiver():
    store = TraceStore(StoreLimits(max_spans=1000, max_bytes=8 * 1024 * 1024))
    with ReceiverThread(store=store) as rx, grpc.insecure_channel(f"127.0.0.1:{rx.port}") as channel:
        yield store, trace_service_pb2_grpc.TraceServiceStub(channel)


def test_exports_beyond_the_bound_keep_the_latest_traces_and_count_the_rest(receiver):
    store, stub = receiver
    total = 20_000
    for first in range(0, total, 500):
        stub.Export(export(first, 500), timeout=10)
        assert len(store) <= store.limits.max_spans
        assert store.size_bytes <= store.limits.max_bytes
    kept = len(store)
    assert kept == store.limits.max_spans
    assert store.dropped_spans == total - kept
    assert store.dropped_traces == store.dropped_spans // SPANS_PER_TRACE
    newest = {s.span_id for s in store.all_spans()}
    assert newest == {(i + 1).to_bytes(8, "big").hex() for i in range(total - kept, total)}


def test_one_request_with_more_spans_than_the_store_keeps(receiver):
    store, stub = receiver
    stub.Export(export(0, 5000), timeout=10)
    assert len(store) == store.limits.max_spans
    assert store.dropped_spans == 4000
    assert min(s.start_ns for s in store.all_spans()) == 4000


def test_a_request_over_the_message_limit_is_refused_and_the_next_one_served():
    store = TraceStore()
    with (
        ReceiverThread(store=store) as rx,
        grpc.insecure_channel(
            f"127.0.0.1:{rx.port}", options=[("grpc.max_send_message_length", -1)]
        ) as channel,
    ):
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        big = export(0, 10, name="x" * DEFAULT_MAX_MESSAGE_BYTES)
        with pytest.raises(grpc.RpcError) as err:
            stub.Export(big, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(store) == 0
        stub.Export(export(0, 8), timeout=10)
        assert len(store) == 8
