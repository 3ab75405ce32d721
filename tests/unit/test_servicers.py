"""RouterServicer and ExpertServicer called directly (no server, no socket), wired as launch.py
wires them but over InProcessTransport, and compared with a plain reference written here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pytest
import torch
import torch.nn.functional as F

from moemesh.experts.device import torch_executor
from moemesh.experts.ffn import ExpertBank, UnknownExpert
from moemesh.experts.weights import open_source
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import wire
from moemesh.protos.spec import InvalidRouting, Segment
from moemesh.router.dispatch import RoutingTable
from moemesh.router.pipeline import DeadlineExceeded, SparseMoE
from moemesh.router.replicas import LeastLoadedReplica
from moemesh.services.errors import status_of
from moemesh.services.expert_service import ExpertServicer
from moemesh.services.launch import build_layers
from moemesh.services.router_service import RouterServicer
from moemesh.services.transport import InProcessTransport
from tests.fakes import Context

MODEL = "tiny-mixtral"  # 2 MoE layers, 8 experts, top-2 softmax, hidden 64
HIDDEN = 64


@dataclass
class Mesh:
    router: RouterServicer
    experts: dict[str, ExpertServicer]


@pytest.fixture(scope="module")
def source():
    return open_source(MODEL)


@pytest.fixture(scope="module")
def mesh(source):
    # h0 holds experts 0-3 of both layers, h1 experts 4-7: every forward needs both hosts.
    held = {"h0": range(0, 4), "h1": range(4, 8)}
    banks = {
        host: ExpertBank.from_source(
            source, [(layer, e) for layer in (0, 1) for e in es], "cpu", torch.float32
        )
        for host, es in held.items()
    }
    experts = {host: ExpertServicer(host, bank, MODEL) for host, bank in banks.items()}

    # What start_router does once the hosts answered Info.
    async def describe():
        return [
            wire.decode_info(await s.Info(pb.InfoRequest(), Context()), f"inproc:{h}")
            for h, s in experts.items()
        ]

    hosts = asyncio.run(describe())
    transport = InProcessTransport(banks)
    moe = SparseMoE(
        build_layers(source),
        RoutingTable.from_hosts(hosts),
        transport,
        LeastLoadedReplica({h.host_id: h.relative_speed for h in hosts}),
        executor=torch_executor(2, "test-router"),
    )
    yield Mesh(RouterServicer(moe, source.spec, hosts), experts)
    moe.close()
    asyncio.run(transport.close())
    for servicer in experts.values():
        servicer.close()


def _hidden(tokens: int = 12, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _ffn64(source, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert on one row, float64: down(silu(gate x) * (up x))."""
    w = source.expert(layer, expert).to(dtype=torch.float64)
    return w.down @ (F.silu(w.gate @ x) * (w.up @ x))


def reference(source, layer: int, hidden: torch.Tensor, k: int = 2):
    """Softmax top-k with renormalised weights, then a per-token loop over the chosen experts.

    hidden: [T, H] -> (out [T, H] float64, experts [T, k], weights [T, k] float64)
    """
    x = hidden.to(torch.float64)
    probs = torch.softmax(x @ source.gate(layer).weight.to(torch.float64).T, dim=-1)  # [T, E]
    weights, experts = probs.topk(k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(experts[t].tolist(), weights[t].tolist()):
            out[t] += w * _ffn64(source, layer, e, x[t])
    return out, experts, weights


def _forward(mesh, layer=0, hidden=None, **fields) -> pb.ForwardResponse:
    request = pb.ForwardRequest(layer=layer, hidden=wire.encode_tensor(hidden), **fields)
    return asyncio.run(mesh.router.Forward(request, Context()))


def test_reference_matches_the_preset(source):
    gate = source.spec.layer(0).gate  # what `reference` assumes
    assert (gate.num_experts, gate.top_k, gate.score_function.value, gate.norm_topk_prob) == (
        8,
        2,
        "softmax",
        True,
    )
    assert source.spec.layer(0).activation == "silu" and source.spec.layer(0).hidden_size == HIDDEN


@pytest.mark.parametrize("layer", [0, 1])
def test_forward_equals_reference(mesh, source, layer):
    hidden = _hidden(seed=layer)
    reply = _forward(mesh, layer, hidden, return_routing=True)
    out = wire.decode_tensor(reply.hidden, "hidden", rank=2)
    expected, experts, weights = reference(source, layer, hidden)
    torch.testing.assert_close(out, expected.to(torch.float32), rtol=1e-4, atol=1e-5)
    routing = wire.decode_routing(reply.routing)
    assert torch.equal(routing.experts, experts)
    torch.testing.assert_close(routing.weights, weights.to(torch.float32))


def test_forward_keeps_the_request_dtype_and_omits_routing_unless_asked(mesh, source):
    reply = _forward(mesh, 0, _hidden(4, dtype=torch.bfloat16))
    assert not reply.HasField("routing")
    out = wire.decode_tensor(reply.hidden, "hidden", rank=2)
    assert out.dtype == torch.bfloat16 and out.shape == (4, HIDDEN)
    expected, _, _ = reference(source, 0, _hidden(4, dtype=torch.bfloat16))
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.02)


def test_route_returns_the_forward_routing_and_honours_an_override(mesh, source):
    hidden = _hidden(seed=3)
    route = asyncio.run(
        mesh.router.Route(pb.RouteRequest(layer=1, hidden=wire.encode_tensor(hidden)), Context())
    )
    forward = _forward(mesh, 1, hidden, return_routing=True)
    assert route.routing == forward.routing
    _, experts, weights = reference(source, 1, hidden, k=3)
    request = pb.RouteRequest(
        layer=1,
        hidden=wire.encode_tensor(hidden),
        routing=pb.RoutingOverride(mode=pb.ROUTING_MODE_TOP_K, top_k=3),
    )
    routing = wire.decode_routing(asyncio.run(mesh.router.Route(request, Context())).routing)
    assert torch.equal(routing.experts, experts)
    torch.testing.assert_close(routing.weights, weights.to(torch.float32))


def test_get_topology_lists_layers_hosts_and_load(mesh):
    def topology():
        return wire.decode_topology(asyncio.run(mesh.router.GetTopology(pb.GetTopologyRequest(), Context())))

    before = topology()
    assert before.model == MODEL
    assert [(x.layer, x.num_experts, x.hidden_size, x.intermediate_size, x.top_k, x.family, x.shared_experts)
            for x in before.layers] == [(layer, 8, 64, 128, 2, "mixtral", 0) for layer in (0, 1)]  # fmt: skip
    assert [(h.host_id, h.address, h.device, h.dtype, h.healthy) for h in before.hosts] == [
        ("h0", "inproc:h0", "cpu", "float32", True),
        ("h1", "inproc:h1", "cpu", "float32", True),
    ]
    assert before.hosts[1].experts == tuple((layer, e) for layer in (0, 1) for e in range(4, 8))
    _forward(mesh, 0, _hidden(5))
    after = topology()
    routed = [b - a for a, b in zip(before.layer(0).tokens_routed, after.layer(0).tokens_routed)]
    assert sum(routed) == 5 * 2 and after.layer(1).tokens_routed == before.layer(1).tokens_routed
    mesh.router.moe.health.mark_down("h1")
    try:
        assert [h.healthy for h in topology().hosts] == [True, False]
    finally:
        mesh.router.moe.health.mark_up("h1")


def _nan_at(token: int) -> torch.Tensor:
    hidden = _hidden(4)
    hidden[token, 7] = float("nan") if token % 2 else float("inf")
    return hidden


@pytest.mark.parametrize("method", ["Forward", "Route"])
@pytest.mark.parametrize(
    "fields, error, field, message",
    [
        ({"layer": 5, "hidden": _hidden(2)}, wire.InvalidArgument, "layer", r"unknown MoE layer 5; expected one of \[0, 1\]"),
        ({}, wire.InvalidArgument, "hidden", "required"),
        ({"hidden": _hidden(2)[:, :32]}, wire.InvalidArgument, "hidden.shape", "expected hidden size 64 for layer 0, got 32"),
        ({"hidden": _hidden(0)}, wire.InvalidArgument, "hidden.shape", "at least 1 token"),
        ({"hidden": _hidden(2)[None]}, wire.InvalidArgument, "hidden.shape", "expected 2 dimensions"),
        ({"hidden": torch.zeros(2, HIDDEN, dtype=torch.int32)}, wire.InvalidArgument, "hidden.dtype", "got DTYPE_INT32"),
        ({"hidden": _nan_at(3)}, wire.InvalidArgument, "hidden.data", "token 3 has NaN or Inf"),
        ({"hidden": _nan_at(2)}, wire.InvalidArgument, "hidden.data", "token 2 has NaN or Inf"),
        ({"hidden": _hidden(2), "routing": pb.RoutingOverride(mode=9)}, wire.InvalidArgument, "routing.mode", "unknown"),
        ({"hidden": _hidden(2), "routing": pb.RoutingOverride(top_k=9)}, InvalidRouting, "routing.top_k", "1..8"),
    ],
)  # fmt: skip
def test_bad_router_requests_raise_domain_errors_naming_the_field(
    mesh, method, fields, error, field, message
):
    if "hidden" in fields:
        fields = {**fields, "hidden": wire.encode_tensor(fields["hidden"])}
    request = getattr(pb, f"{method}Request")(**fields)
    with pytest.raises(error, match=message) as info:
        asyncio.run(getattr(mesh.router, method)(request, Context()))
    assert info.value.field == field
    assert status_of(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT


# -- Dispatch: the caller's routing ------------------------------------------------------------------


def _dispatch(mesh, hidden, experts, weights, layer=0) -> torch.Tensor:
    routing = pb.Routing(experts=wire.encode_tensor(experts), weights=wire.encode_tensor(weights))
    request = pb.DispatchRequest(layer=layer, hidden=wire.encode_tensor(hidden), routing=routing)
    reply = asyncio.run(mesh.router.Dispatch(request, Context()))
    return wire.decode_tensor(reply.hidden, "hidden", rank=2)


@pytest.mark.parametrize("layer", [0, 1])
def test_dispatch_equals_the_per_token_loop_on_the_callers_routing(mesh, source, layer):
    hidden = _hidden(seed=10 + layer)
    experts = torch.tensor([[5, -1, 0], [-1, -1, -1], [7, 1, 2]] * 4, dtype=torch.int32)
    weights = torch.tensor([[0.5, 3.0, 0.25], [1.0, 1.0, 1.0], [1.5, -0.5, 0.125]] * 4)
    out = _dispatch(mesh, hidden, experts, weights, layer)
    expected = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for e, w in zip(experts[t].tolist(), weights[t].tolist()):
            if e >= 0:
                expected[t] += w * _ffn64(source, layer, e, hidden[t].double())
    assert (out.double() - expected).abs().max().item() <= 1e-5
    # the gate's own routing gives Forward's output (tiny-mixtral has no shared experts)
    _, experts, weights = reference(source, layer, hidden)
    forward = wire.decode_tensor(_forward(mesh, layer, hidden).hidden, "hidden")
    dispatched = _dispatch(mesh, hidden, experts.to(torch.int32), weights.float(), layer)
    torch.testing.assert_close(dispatched, forward, rtol=0, atol=1e-6)


def test_dispatch_keeps_the_request_dtype(mesh):
    out = _dispatch(
        mesh,
        _hidden(3, dtype=torch.bfloat16),
        torch.tensor([[1], [2], [3]], dtype=torch.int32),
        torch.ones(3, 1),
    )
    assert out.dtype == torch.bfloat16 and out.shape == (3, HIDDEN)


def _routing_of(experts, weights) -> pb.Routing:
    return pb.Routing(experts=wire.encode_tensor(experts), weights=wire.encode_tensor(weights))


_IDS = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
_W = torch.ones(2, 2)


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"layer": 5, "hidden": _hidden(2), "routing": _routing_of(_IDS, _W)}, "layer", r"unknown MoE layer 5; expected one of \[0, 1\]"),
        ({"routing": _routing_of(_IDS, _W)}, "hidden", "required"),
        ({"hidden": _hidden(2)}, "routing", "required: experts int32"),
        ({"hidden": _hidden(2)[:, :32], "routing": _routing_of(_IDS, _W)}, "hidden.shape", "expected hidden size 64"),
        ({"hidden": _nan_at(1)[:2], "routing": _routing_of(_IDS, _W)}, "hidden.data", "token 1 has NaN or Inf"),
        ({"hidden": _hidden(2), "routing": _routing_of(_IDS.float(), _W)}, "routing.experts.dtype", "expected one of DTYPE_INT32, got DTYPE_FLOAT32"),
        ({"hidden": _hidden(2), "routing": _routing_of(_IDS, _W.half())}, "routing.weights.dtype", "expected one of DTYPE_FLOAT32"),
        ({"hidden": _hidden(2), "routing": _routing_of(_IDS[0], _W[0])}, "routing.experts.shape", "expected 2 dimensions"),
        ({"hidden": _hidden(2), "routing": _routing_of(_IDS, _W[:, :1])}, "routing.weights.shape", r"expected the shape of routing.experts \[2, 2\]"),
        ({"hidden": _hidden(3), "routing": _routing_of(_IDS, _W)}, "routing.experts.shape", r"expected 3 tokens \(the first dimension of hidden\), got 2"),
        ({"hidden": _hidden(2), "routing": _routing_of(_IDS + 6, _W)}, "routing.experts.data", r"expected expert ids in \[-1, 8\) \(-1 = unused slot\); token 1 slot 0 has 8"),
        ({"hidden": _hidden(2), "routing": _routing_of(_IDS - 3, _W)}, "routing.experts.data", "token 0 slot 0 has -3"),
        ({"hidden": _hidden(2), "routing": _routing_of(_IDS, _W.masked_fill(_IDS == 3, float("inf")))}, "routing.weights.data", "expected finite values; token 1 slot 1 has inf"),
        ({"hidden": _hidden(2), "routing": pb.Routing(experts=pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2, 2], data=b"\0" * 12), weights=wire.encode_tensor(_W))}, "routing.experts.data", "expected 16 bytes"),
    ],
)  # fmt: skip
def test_bad_dispatch_requests_raise_invalid_argument_naming_the_field(mesh, fields, field, message):
    if "hidden" in fields:
        fields = {**fields, "hidden": wire.encode_tensor(fields["hidden"])}
    routed = mesh.router.moe.tokens_routed[0].clone()
    with pytest.raises(wire.InvalidArgument, match=message) as info:
        asyncio.run(mesh.router.Dispatch(pb.DispatchRequest(**fields), Context()))
    assert info.value.field == field
    assert status_of(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert torch.equal(mesh.router.moe.tokens_routed[0], routed)  # nothing half-applied


def test_forward_past_its_deadline_is_deadline_exceeded(mesh):
    request = pb.ForwardRequest(layer=0, hidden=wire.encode_tensor(_hidden(2)))
    with pytest.raises(DeadlineExceeded) as info:
        asyncio.run(mesh.router.Forward(request, Context(remaining=0.0)))
    assert status_of(info.value)[0] == grpc.StatusCode.DEADLINE_EXCEEDED


# -- the expert host ---------------------------------------------------------------------------------


def _compute(servicer: ExpertServicer, segments, rows: torch.Tensor) -> torch.Tensor:
    request = (
        wire.encode_compute(segments, rows) if segments else pb.ComputeRequest(rows=wire.encode_tensor(rows))
    )
    reply = asyncio.run(servicer.Compute(request, Context()))
    return wire.decode_tensor(reply.rows, "rows", rank=2)


def test_expert_compute_equals_reference_and_leaves_uncovered_rows_zero(mesh, source):
    h1 = mesh.experts["h1"]
    rows, served = _hidden(6, seed=7), h1.rows_served
    segments = [Segment(0, 5, 0, 2), Segment(1, 4, 3, 3)]  # row 2 is not covered
    out = _compute(h1, segments, rows)
    expected = torch.zeros(6, HIDDEN, dtype=torch.float64)
    for s in segments:
        for r in range(s.start, s.start + s.count):
            expected[r] = _ffn64(source, s.layer, s.expert, rows[r].double())
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-5)
    assert torch.equal(out[2], torch.zeros(HIDDEN)) and h1.rows_served == served + 5


def test_expert_info(mesh):
    info = wire.decode_info(asyncio.run(mesh.experts["h0"].Info(pb.InfoRequest(), Context())), "a:1")
    assert (info.host_id, info.model, info.device, info.dtype, info.relative_speed) == (
        "h0",
        MODEL,
        "cpu",
        "float32",
        1.0,
    )
    assert info.experts == tuple((layer, e) for layer in (0, 1) for e in range(4))


@pytest.mark.parametrize(
    "segments, rows, error, field, message",
    [
        ([], _hidden(2), wire.InvalidArgument, "segments", "at least one segment"),
        ([Segment(0, 1, 0, 0)], _hidden(2), wire.InvalidArgument, "segments[0].row_count", ">= 1"),
        ([Segment(0, 1, 1, 2)], _hidden(2), wire.InvalidArgument, "segments[0]", "exceed the 2 rows"),
        ([Segment(0, 1, 0, 2), Segment(0, 2, 1, 1)], _hidden(2), wire.InvalidArgument, "request", "segments overlap"),
        ([Segment(0, 1, 0, 1)], _hidden(2)[:, :32], wire.InvalidArgument, "request", "hidden size 32"),
        ([Segment(0, 1, 0, 1)], _hidden(2)[0], wire.InvalidArgument, "rows.shape", "expected 2 dimensions"),
        ([Segment(0, 6, 0, 1)], _hidden(2), UnknownExpert, None, "layer 0 expert 6 is not held .* experts 0-3"),
        ([Segment(0, 1, 0, 1), Segment(2, 0, 1, 1)], _hidden(2), UnknownExpert, None, "layer 2 expert 0"),
    ],
)  # fmt: skip
def test_bad_compute_requests_raise_domain_errors(mesh, segments, rows, error, field, message):
    h0 = mesh.experts["h0"]
    served = h0.rows_served
    with pytest.raises(error, match=message) as info:
        _compute(h0, segments, rows)
    assert getattr(info.value, "field", None) == field
    assert status_of(info.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert h0.rows_served == served  # nothing computed


def test_a_shape_its_data_cannot_fill_is_invalid_not_over_capacity(mesh):
    # Admission reads the shape before decoding; a fuzzed shape claimed 9,000 tokens (over the
    # router's 8,192 in flight) with 1 KiB of data and was told to split itself (RESOURCE_EXHAUSTED).
    claim = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[9000, HIDDEN], data=b"\0" * 1024)
    with pytest.raises(wire.InvalidArgument) as info:
        asyncio.run(mesh.router.Forward(pb.ForwardRequest(layer=0, hidden=claim), Context()))
    assert info.value.field == "hidden.data"
    assert mesh.router.in_flight.rows == 0
    rows = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[10**6, HIDDEN], data=b"\0" * 1024)
    request = pb.ComputeRequest(segments=wire.encode_segments([Segment(0, 1, 0, 1)]), rows=rows)
    with pytest.raises(wire.InvalidArgument) as info:
        asyncio.run(mesh.experts["h0"].Compute(request, Context()))
    assert info.value.field == "rows.data"
