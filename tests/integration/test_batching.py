"""Batching and admission control over real gRPC: an expert host (and a router) on 127.0.0.1 port 0,
called concurrently from this thread with grpc futures.

The host's first compute round is held (tests/fakes.py) until the test releases it: calls
made meanwhile wait in the host's queue, so what merges, and what is refused, is deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest
import torch

from moemesh.deploy.local import EmbeddedMesh, LoopThread, MeshConfig
from moemesh.experts.ffn import ExpertBank
from moemesh.experts.weights import open_source, preset_config
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.protos import wire
from moemesh.protos.spec import Segment
from moemesh.services.admission import HostLimits, RouterLimits
from moemesh.services.bootstrap import ServerConfig
from moemesh.services.launch import (
    ExpertHost,
    ExpertHostConfig,
    RouterConfig,
    start_expert_host,
    start_router,
)
from tests.fakes import HeldRounds
from tests.references import assert_matches_reference

pytestmark = pytest.mark.integration

MODEL = "tiny-mixtral"  # 2 MoE layers, 8 experts, top-2, hidden 64
H = 64
ALL_EXPERTS = tuple((layer, e) for layer in (0, 1) for e in range(8))
EXACT = {"rtol": 0.0, "atol": 1e-6}


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread("test-batching")
    yield thread
    thread.stop()


@pytest.fixture
def serve(loop, monkeypatch):
    """serve(limits=..., server=...) -> (host, held, stub): a host over all experts of MODEL whose
    first round is held; everything is released and stopped after the test."""
    started: list[tuple[ExpertHost, HeldRounds, grpc.Channel]] = []
    source = open_source(MODEL)

    def make(limits: HostLimits | None = None, server: ServerConfig | None = None, hold: bool = True):
        bank = ExpertBank.from_source(source, ALL_EXPERTS, "cpu", torch.float32)
        held = HeldRounds(bank, hold_first=hold)
        monkeypatch.setattr(bank, "compute_many", held)
        config = ExpertHostConfig(
            MODEL,
            "host-0",
            ALL_EXPERTS,
            "cpu",
            server=server or ServerConfig(),
            limits=limits or HostLimits(),
        )
        host = loop.call(start_expert_host(config, bank=bank))
        channel = grpc.insecure_channel(host.address)
        started.append((host, held, channel))
        return host, held, pb_grpc.ExpertStub(channel)

    yield make
    for host, held, channel in started:
        held.release.set()
        channel.close()
        loop.call(host.stop(0.5), timeout=30)


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def _out(reply) -> torch.Tensor:
    return wire.decode_tensor(reply.rows, "rows", rank=2)


def _hold_first_round(host: ExpertHost, held: HeldRounds, stub):
    first = stub.Compute.future(wire.encode_compute([Segment(0, 0, 0, 2)], _rows(2, 99)))
    _until(held.entered.is_set, "the first round started")
    return first


def _requests(count: int) -> list[tuple[list[Segment], torch.Tensor]]:
    """Requests of varied sizes; several use the same experts, as concurrent routers' batches do."""
    out = []
    for i in range(count):
        n = 3 + i % 4
        segments = [Segment(i % 2, (i * 3) % 8, 0, n - 1), Segment(0, 5, n - 1, 1)]
        out.append((segments, _rows(n, i)))
    return out


def test_concurrent_compute_calls_merge_and_equal_solo_results(serve):
    host, held, stub = serve()
    requests = _requests(8)
    first = _hold_first_round(host, held, stub)
    calls = [stub.Compute.future(wire.encode_compute(*r)) for r in requests]
    _until(lambda: host.servicer.batcher.waiting == len(requests), "every call queued")
    held.release.set()
    first.result(timeout=60)
    replies = [c.result(timeout=60) for c in calls]
    assert held.sizes()[1:] == [[int(rows.shape[0]) for _, rows in requests]]  # one merged round
    for (segments, rows), reply in zip(requests, replies):
        torch.testing.assert_close(_out(reply), held.inner([(segments, rows)])[0], **EXACT)
    assert (host.servicer.queue.rows, host.servicer.queue.requests) == (0, 0)


def test_full_host_queue_is_resource_exhausted_at_once(serve):
    host, held, stub = serve(HostLimits(max_queue_rows=6, max_request_rows=6, max_queue_requests=8))
    first = _hold_first_round(host, held, stub)  # 2 rows
    waiting = stub.Compute.future(wire.encode_compute([Segment(0, 1, 0, 3)], _rows(3, 1)))
    _until(lambda: host.servicer.batcher.waiting == 1, "second call queued")
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(wire.encode_compute([Segment(0, 1, 0, 2)], _rows(2, 2)), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        "expert host host-0: queue full (5 of 6 rows queued, 2 more asked); retry in" in info.value.details()
    )
    pushback = dict(info.value.trailing_metadata())[wire.RETRY_PUSHBACK_KEY]
    assert int(pushback) >= 1  # when to come back, for clients with a retry policy
    held.release.set()
    first.result(timeout=60)
    torch.testing.assert_close(
        _out(waiting.result(timeout=60)), held.inner([([Segment(0, 1, 0, 3)], _rows(3, 1))])[0], **EXACT
    )
    # Room again once answered.
    assert list(
        stub.Compute(wire.encode_compute([Segment(0, 1, 0, 2)], _rows(2, 2)), timeout=60).rows.shape
    ) == [2, H]


def test_segment_and_row_limits_reject_before_compute(serve):
    host, held, stub = serve(HostLimits(max_segments=4, max_request_rows=16), hold=False)
    many = [Segment(0, e, e, 1) for e in range(5)]
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(wire.encode_compute(many, _rows(5, 0)), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "a request of 5 segments exceeds the limit of 4 segments per request" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(wire.encode_compute([Segment(0, 1, 0, 17)], _rows(17, 0)), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "a request of 17 rows exceeds the limit of 16 rows per request" in info.value.details()
    assert held.rounds == []  # compute never ran
    assert (host.servicer.queue.rows, host.servicer.queue.requests) == (0, 0)


def test_a_cancelled_call_leaves_its_batch_mates_exact(serve):
    host, held, stub = serve()
    mates = _requests(4)
    first = _hold_first_round(host, held, stub)
    calls = [stub.Compute.future(wire.encode_compute(*r)) for r in mates[:2]]
    gone = stub.Compute.future(wire.encode_compute([Segment(0, 4, 0, 9)], _rows(9, 7)))
    calls += [stub.Compute.future(wire.encode_compute(*r)) for r in mates[2:]]
    _until(lambda: host.servicer.batcher.waiting == 5, "five calls queued")
    gone.cancel()
    _until(lambda: host.servicer.batcher.waiting == 4, "the host saw the cancellation")
    held.release.set()
    first.result(timeout=60)
    replies = [c.result(timeout=60) for c in calls]
    assert held.sizes()[1:] == [[int(rows.shape[0]) for _, rows in mates]]  # the cancelled call dropped
    for (segments, rows), reply in zip(mates, replies):
        torch.testing.assert_close(_out(reply), held.inner([(segments, rows)])[0], **EXACT)
    _until(lambda: host.servicer.queue.requests == 0, "every call gave its room back")
    assert host.servicer.queue.rows == 0


def test_max_concurrent_rpcs_reaches_grpc(serve):
    host, held, stub = serve(server=ServerConfig(max_concurrent_rpcs=1))
    first = _hold_first_round(host, held, stub)
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(wire.encode_compute([Segment(0, 1, 0, 1)], _rows(1, 0)), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    held.release.set()
    first.result(timeout=60)


def test_full_router_is_resource_exhausted_at_once_then_exact(loop, serve):
    host, held, _ = serve()
    limits = RouterLimits(max_inflight_tokens=64, max_inflight_requests=1)
    router = loop.call(start_router(RouterConfig(MODEL, (host.address,), limits=limits)))
    channel = grpc.insecure_channel(router.address)
    try:
        stub = pb_grpc.RouterStub(channel)
        source, config = open_source(MODEL), preset_config(MODEL)

        def forward(hidden: torch.Tensor, **kwargs):
            request = pb.ForwardRequest(layer=0, hidden=wire.encode_tensor(hidden), return_routing=True)
            return stub.Forward.future(request, timeout=60, **kwargs)

        hidden = _rows(12, 0)
        first = forward(hidden)
        _until(held.entered.is_set, "the first forward reached the host")
        for extra, message in [
            (_rows(4, 1), "router: at capacity (1 of 1 requests in flight); retry in"),
            (_rows(65, 2), "router: a request of 65 tokens exceeds the limit of 64 tokens in flight"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                forward(extra).result()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert message in info.value.details()
        held.release.set()
        for h, reply in [(hidden, first.result()), (_rows(4, 1), forward(_rows(4, 1)).result())]:
            out = wire.decode_tensor(reply.hidden, "hidden", rank=2)
            assert_matches_reference(source, config, 0, h, out, wire.decode_routing(reply.routing))
        assert (router.servicer.in_flight.rows, router.servicer.in_flight.requests) == (0, 0)
    finally:
        channel.close()
        loop.call(router.stop(0.5), timeout=30)


def test_mesh_config_limits_reach_every_server_and_traffic_stays_exact():
    host_limits = HostLimits(max_queue_rows=512, max_request_rows=256, max_batch_rows=8, max_segments=16)
    router_limits = RouterLimits(max_inflight_tokens=128, max_inflight_requests=8)
    config = MeshConfig(
        MODEL, num_hosts=2, device="cpu", host_limits=host_limits, router_limits=router_limits
    )
    source, model_config = open_source(MODEL), preset_config(MODEL)
    with EmbeddedMesh(config) as mesh:
        assert [h.servicer.limits for h in mesh.hosts] == [host_limits, host_limits]
        assert mesh.router.servicer.limits == router_limits
        channel = grpc.insecure_channel(mesh.address)
        try:
            stub = pb_grpc.RouterStub(channel)
            hiddens = [_rows(t, seed) for seed, t in enumerate([1, 16, 40, 64])]
            calls = [
                stub.Forward.future(
                    pb.ForwardRequest(layer=1, hidden=wire.encode_tensor(h), return_routing=True), timeout=60
                )
                for h in hiddens
            ]
            for hidden, call in zip(hiddens, calls):
                reply = call.result()
                out = wire.decode_tensor(reply.hidden, "hidden", rank=2)
                assert_matches_reference(
                    source, model_config, 1, hidden, out, wire.decode_routing(reply.routing)
                )
        finally:
            channel.close()
