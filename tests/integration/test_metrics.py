"""Prometheus metrics of a real mesh: token counters equal the routing decision, rejected requests
move the error counters, and `/metrics` serves it all over HTTP."""

from __future__ import annotations

import time
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from moemesh.client import Client, InvalidArgumentError
from moemesh.deploy.local import EmbeddedMesh, MeshConfig
from moemesh.services.metrics import Metrics
from moemesh.services.telemetry import Telemetry

pytestmark = pytest.mark.integration

MODEL = "tiny-mixtral"  # 8 experts, top-2, hidden 64
H, E = 64, 8


@pytest.fixture(scope="module")
def mesh():
    metrics = Metrics(CollectorRegistry())
    server = metrics.serve("127.0.0.1", 0)
    try:
        with EmbeddedMesh(
            MeshConfig(MODEL, num_hosts=3, device="cpu"), telemetry=Telemetry(metrics=metrics)
        ) as m:
            with Client(m.address) as client:
                yield m, client, metrics, server
    finally:
        server.close()


def _value(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def _routed(metrics: Metrics) -> list[float]:
    return [_value(metrics, "moemesh_tokens_routed_total", layer="0", expert=str(e)) for e in range(E)]


def _rpcs(metrics: Metrics, service: str, method: str, code: str) -> float:
    return _value(metrics, "moemesh_rpc_requests_total", service=service, method=method, code=code)


def test_token_counters_equal_the_routing_decision(mesh):
    m, client, metrics, _ = mesh
    before = _routed(metrics)
    forwards = _rpcs(metrics, "moemesh.v1.Router", "Forward", "OK")
    computes = _value(metrics, "moemesh_queue_wait_seconds_count")
    rows_before = _value(metrics, "moemesh_compute_batch_rows_sum")

    _, routing = client.forward(torch.randn(40, H), layer=0, return_routing=True)

    decided = torch.bincount(routing.experts[routing.experts >= 0], minlength=E).tolist()
    assert [a - b for a, b in zip(_routed(metrics), before)] == decided
    assert sum(decided) == 40 * 2
    assert _rpcs(metrics, "moemesh.v1.Router", "Forward", "OK") == forwards + 1
    used = {e for e in range(E) if decided[e]}
    hosts_used = sum(1 for h in m.hosts if used & {e for _, e in h.servicer.bank.experts})
    assert _value(metrics, "moemesh_queue_wait_seconds_count") == computes + hosts_used
    assert _value(metrics, "moemesh_compute_batch_rows_sum") == rows_before + 40 * 2
    assert _value(metrics, "moemesh_queue_depth") == 0  # nothing left in flight
    ratio = _value(metrics, "moemesh_load_balance_ratio", layer="0")
    assert 1.0 <= ratio <= E


def test_a_rejected_request_moves_the_error_counter(mesh):
    _, client, metrics, _ = mesh
    rejected = _rpcs(metrics, "moemesh.v1.Router", "Forward", "INVALID_ARGUMENT")
    ok = _rpcs(metrics, "moemesh.v1.Router", "Forward", "OK")
    with pytest.raises(InvalidArgumentError, match="hidden size"):
        client.forward(torch.randn(4, H + 1), layer=0)
    # An abort sends the status before the handler unwinds: the server may count it just after.
    deadline = time.monotonic() + 10
    while _rpcs(metrics, "moemesh.v1.Router", "Forward", "INVALID_ARGUMENT") == rejected:
        assert time.monotonic() < deadline, "the rejected request was never counted"
        time.sleep(0.01)
    assert _rpcs(metrics, "moemesh.v1.Router", "Forward", "INVALID_ARGUMENT") == rejected + 1
    assert _rpcs(metrics, "moemesh.v1.Router", "Forward", "OK") == ok


def test_metrics_endpoint_serves_them(mesh):
    m, client, metrics, server = mesh
    client.forward(torch.randn(16, H), layer=0)
    with urllib.request.urlopen(server.url, timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def scraped(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    for e in range(E):
        labels = {"layer": "0", "expert": str(e)}
        assert scraped("moemesh_tokens_routed_total", **labels) == _value(
            metrics, "moemesh_tokens_routed_total", **labels
        )
    assert (
        scraped("moemesh_rpc_requests_total", service="moemesh.v1.Expert", method="Compute", code="OK") >= 1
    )
    assert scraped("moemesh_wire_bytes_total", direction="received") > 16 * H * 4
    assert scraped("moemesh_wire_bytes_total", direction="sent") > 16 * H * 4
    # CPU hosts report the expert weights they hold (the three hosts share this process).
    assert scraped("moemesh_device_memory_bytes", device="cpu") == sum(
        h.servicer.bank.nbytes for h in m.hosts
    )
    assert any(name == "moemesh_rpc_duration_seconds_bucket" for name, _ in samples)
