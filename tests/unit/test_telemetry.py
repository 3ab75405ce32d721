"""Telemetry without a network: the pipeline's stage spans (across its executor threads), the retry
flag a transport sees, routing metrics, NVML gauges from a stand-in library, and the dashboard."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from moemesh.protos.spec import describe
from moemesh.router.dispatch import RoutingTable
from moemesh.router.gating import GateConfig, RoutingMode, RoutingPolicy
from moemesh.router.pipeline import DISPATCH_RETRY, HostUnavailable, MoELayer, SparseMoE
from moemesh.services import telemetry
from moemesh.services.metrics import Metrics, _NvmlCollector
from moemesh.services.telemetry import PipelineTelemetry, Telemetry

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "dashboards" / "moemesh.json"


@pytest.fixture
def spans():
    """A tracer provider of this test only (the global one is never set in the test process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


class _Transport:
    """Echoes rows; hosts in `down` are unreachable. Records (host, DISPATCH_RETRY) per call."""

    def __init__(self, down=()):
        self.down = set(down)
        self.calls: list[tuple[str, bool]] = []

    async def compute(self, host, segments, rows, timeout):
        self.calls.append((host, DISPATCH_RETRY.get()))
        if host in self.down:
            raise HostUnavailable(host)
        return rows.clone()


def _moe(transport, replicas, observer, num_experts=4, top_k=2, hidden=8) -> SparseMoE:
    table = RoutingTable({(0, e): hosts for e, hosts in replicas(num_experts).items()})
    gate = MoELayer(
        0, hidden, GateConfig(num_experts=num_experts, top_k=top_k), torch.randn(num_experts, hidden)
    )
    return SparseMoE({0: gate}, table, transport, observer=observer)


def test_stage_spans_are_children_of_the_callers_span_across_executor_threads(spans):
    provider, exporter = spans
    metrics = Metrics(CollectorRegistry())
    transport = _Transport()
    moe = _moe(
        transport,
        lambda n: {e: ["h0" if e < n // 2 else "h1"] for e in range(n)},
        PipelineTelemetry(Telemetry(provider, metrics)),
    )
    tracer = provider.get_tracer("test")

    async def forward():
        with tracer.start_as_current_span("caller"):
            return await moe.forward(0, torch.randn(10, 8))

    try:
        result = asyncio.run(forward())
    finally:
        moe.close()

    by_name = {s.name: s for s in exporter.get_finished_spans()}
    caller = by_name["caller"]
    for stage in ("gate", "plan", "dispatch", "combine"):
        span = by_name[f"moemesh.{stage}"]
        assert span.parent is not None and span.parent.span_id == caller.context.span_id, stage
        assert span.context.trace_id == caller.context.trace_id
        assert span.attributes["moemesh.layer"] == 0
    gate, plan = by_name["moemesh.gate"].attributes, by_name["moemesh.plan"].attributes
    assert gate["moemesh.tokens"] == 10 and gate["moemesh.routing.policy"] == "default"
    per_expert = list(plan["moemesh.tokens_per_expert"])
    assert sum(per_expert) == 10 * 2  # tokens × k
    assert per_expert == result.plan.tokens_per_expert.tolist()
    assert plan["moemesh.experts_activated"] == sum(1 for n in per_expert if n)
    assert sorted(plan["moemesh.hosts"]) == sorted({h for h, _ in transport.calls})
    # The same plan drives the metrics.
    for expert, count in enumerate(per_expert):
        routed = metrics.registry.get_sample_value(
            "moemesh_tokens_routed_total", {"layer": "0", "expert": str(expert)}
        )
        assert routed == count
    assert metrics.registry.get_sample_value("moemesh_forward_tokens_total", {"layer": "0"}) == 10


def test_dispatch_span_reports_retries_and_the_retried_calls_are_flagged(spans):
    provider, exporter = spans
    transport = _Transport(down={"a"})
    moe = _moe(transport, lambda n: {e: ["a", "b"] for e in range(n)}, PipelineTelemetry(Telemetry(provider)))
    try:
        result = asyncio.run(moe.forward(0, torch.randn(12, 8)))
    finally:
        moe.close()
    assert result.failed_hosts == ("a",)
    # First tries are not flagged (whichever replica the chooser spread them to); re-sends are.
    assert ("a", False) in transport.calls and ("a", True) not in transport.calls
    assert sum(retry for _, retry in transport.calls) == result.retries >= 1
    (dispatch,) = [s for s in exporter.get_finished_spans() if s.name == "moemesh.dispatch"]
    assert dispatch.attributes["moemesh.retries"] == result.retries >= 1
    assert list(dispatch.attributes["moemesh.failed_hosts"]) == ["a"]


def test_a_failing_stage_span_records_the_error(spans):
    provider, exporter = spans
    transport = _Transport(down={"a"})
    moe = _moe(transport, lambda n: {e: ["a"] for e in range(n)}, PipelineTelemetry(Telemetry(provider)))
    try:
        with pytest.raises(LookupError, match="no live replica"):
            asyncio.run(moe.forward(0, torch.randn(4, 8)))
    finally:
        moe.close()
    (dispatch,) = [s for s in exporter.get_finished_spans() if s.name == "moemesh.dispatch"]
    assert dispatch.status.status_code == StatusCode.ERROR
    assert list(dispatch.attributes["moemesh.failed_hosts"]) == ["a"]


def test_describe_policy():
    assert describe(None) == "default"
    policy = RoutingPolicy(RoutingMode.TOP_P, top_p=0.9, max_k=4)
    assert describe(policy) == "top_p(top_p=0.9,max_k=4)"


def test_no_endpoint_means_no_tracer_provider(monkeypatch):
    for name in telemetry.OTLP_ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert telemetry.configure_tracing("moemesh-test") is None
    assert telemetry.otlp_endpoint({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4317"}) == "http://h:4317"
    assert telemetry.otlp_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}) is None


# -- metrics -----------------------------------------------------------------------------------------


def test_load_balance_ratio_is_max_over_mean_of_the_window():
    metrics = Metrics(CollectorRegistry(), balance_window=2)

    def ratio():
        return metrics.registry.get_sample_value("moemesh_load_balance_ratio", {"layer": "1"})

    metrics.observe_routing(1, 4, [4, 4, 0, 0])  # mean 2, max 4
    assert ratio() == pytest.approx(2.0)
    metrics.observe_routing(1, 4, [0, 0, 4, 4])  # window [4,4,4,4]: even
    assert ratio() == pytest.approx(1.0)
    metrics.observe_routing(1, 4, [0, 0, 0, 8])  # window drops the first: [0,0,4,12], mean 4
    assert ratio() == pytest.approx(3.0)
    # Every expert has a series from the first forward on, unused ones at 0.
    assert (
        metrics.registry.get_sample_value("moemesh_tokens_routed_total", {"layer": "1", "expert": "0"}) == 4
    )
    assert (
        metrics.registry.get_sample_value("moemesh_tokens_routed_total", {"layer": "1", "expert": "3"}) == 12
    )


class _FakeNvml:
    NVML_TEMPERATURE_GPU = 0

    class _Rates:
        gpu = 37

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle}".encode()

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 60 + handle

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self._Rates()


def test_gpu_gauges_come_from_nvml_and_are_absent_without_it():
    registry = CollectorRegistry()
    registry.register(_NvmlCollector.open(_FakeNvml()))
    temp = registry.get_sample_value("moemesh_gpu_temperature_celsius", {"gpu": "1", "uuid": "GPU-1"})
    util = registry.get_sample_value("moemesh_gpu_utilization_ratio", {"gpu": "0", "uuid": "GPU-0"})
    assert temp == 61.0 and util == pytest.approx(0.37)

    class _NoDriver(_FakeNvml):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    assert _NvmlCollector.open(_NoDriver()) is None


def test_cpu_device_memory_reports_the_weights_held():
    metrics = Metrics(CollectorRegistry())
    metrics.track_device(torch.device("cpu"), lambda: 12345)
    assert metrics.registry.get_sample_value("moemesh_device_memory_bytes", {"device": "cpu"}) == 12345


def test_two_metrics_objects_do_not_share_anything():
    a, b = Metrics(), Metrics()
    a.observe_rpc("moemesh.v1.Router", "Forward", "OK", 0.01)
    labels = {"service": "moemesh.v1.Router", "method": "Forward", "code": "OK"}
    assert a.registry.get_sample_value("moemesh_rpc_requests_total", labels) == 1
    assert b.registry.get_sample_value("moemesh_rpc_requests_total", labels) is None


# -- the Grafana dashboard -----------------------------------------------------------------------------


def _queries(node) -> list[str]:
    """Every PromQL string in a dashboard: panel target `expr`s and template variable queries."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition", "query") and isinstance(value, str):
                if node.get("type") != "datasource":  # its `query` names a plugin, not PromQL
                    found.append(value)
            else:
                found.extend(_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_queries(item))
    return found


def test_dashboard_queries_only_metrics_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    referenced = {name for q in queries for name in re.findall(r"\bmoemesh_[a-z0-9_]+", q)}
    exposed = Metrics(CollectorRegistry()).exposed_names()
    assert referenced and referenced <= exposed, sorted(referenced - exposed)
    # What the dashboard is for: throughput, latency percentiles, per-expert load and balance.
    assert {
        "moemesh_forward_tokens_total",
        "moemesh_tokens_routed_total",
        "moemesh_rpc_duration_seconds_bucket",
        "moemesh_load_balance_ratio",
        "moemesh_queue_wait_seconds_bucket",
        "moemesh_wire_bytes_total",
        "moemesh_device_memory_bytes",
        "moemesh_gpu_temperature_celsius",
        "moemesh_gpu_utilization_ratio",
    } <= referenced
    assert any(q.startswith("histogram_quantile(0.99") for q in queries)
    assert "heatmap" in {p["type"] for p in dashboard["panels"]}
    assert {v["type"] for v in dashboard["templating"]["list"]} >= {"datasource"}


def test_no_rpc_interceptor_when_tracing_is_off():
    # No provider given and none installed globally (this test process never installs one):
    # channels and servers get no span interceptors at all, not no-op ones.
    from moemesh.client.tracing import client_spans, tracing_on

    assert not tracing_on() and not Telemetry().tracing
    assert client_spans("127.0.0.1:1") == [] and Telemetry().client_interceptors("127.0.0.1:1") == []
    provider = TracerProvider()
    assert tracing_on(provider) and Telemetry(provider).tracing
    assert len(Telemetry(provider).client_interceptors("127.0.0.1:1")) >= 2
