"""Router.Dispatch over real gRPC (router + 3 expert hosts on 127.0.0.1, port 0): the caller's own
routing through the SDK, sync and asyncio, equals the transformers experts module of the layer (the
`experts(hidden, top_k_index, top_k_weights)` interface, loaded with the preset's weights), and bad
routing is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from moemesh.client import AsyncClient, Client, InvalidArgumentError, RoutingMode, RoutingPolicy
from moemesh.deploy.local import EmbeddedMesh, MeshConfig
from moemesh.experts.weights import open_source, preset_config
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.protos import wire
from tests.references import transformers_block

pytestmark = pytest.mark.integration

PRESETS = ["tiny-mixtral", "tiny-deepseek-v3"]  # DeepSeek-V3: shared experts stay with the caller


@pytest.fixture(scope="module", params=PRESETS)
def mesh(request):
    with EmbeddedMesh(MeshConfig(request.param, num_hosts=3, device="cpu")) as m:
        yield request.param, m


def _hidden(width: int, tokens: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


def _experts_module(preset: str, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(router, experts) of the layer's transformers MoE block, with the preset's weights."""
    block = transformers_block(open_source(preset), preset_config(preset), layer)
    return block.gate, block.experts


def _transformers_experts(experts: torch.nn.Module, hidden, index, weights) -> torch.Tensor:
    """The experts interface on [T, H] and [T, K]; an unused slot (-1) becomes expert 0 with weight
    0, which adds nothing (transformers' eager experts take no -1)."""
    unused = index < 0
    with torch.no_grad():
        return experts(hidden, index.clamp(min=0).long(), weights.masked_fill(unused, 0.0))


def test_sync_dispatch_with_the_transformers_routers_routing_equals_its_experts(mesh):
    preset, m = mesh
    with Client(m.address) as client:
        for ls in open_source(preset).spec.layers:
            router, experts = _experts_module(preset, ls.layer)
            hidden = _hidden(ls.hidden_size, seed=ls.layer)
            with torch.no_grad():
                _, top_k_weights, top_k_index = router(hidden)
            out = client.dispatch(hidden, ls.layer, top_k_index, top_k_weights)  # int64, float32
            expected = _transformers_experts(experts, hidden, top_k_index, top_k_weights)
            assert out.shape == hidden.shape and out.dtype == torch.float32
            assert (out - expected).abs().max().item() <= 1e-5


def test_async_dispatch_with_routing_from_route_equals_the_transformers_experts(mesh):
    preset, m = mesh
    ls = open_source(preset).spec.layers[-1]
    _, experts = _experts_module(preset, ls.layer)
    batches = [_hidden(ls.hidden_size, tokens=8 + i, seed=10 + i) for i in range(4)]
    policies = [None, RoutingPolicy(RoutingMode.TOP_P, top_p=0.3, max_k=3)] * 2  # top-p: -1 slots

    async def run():
        async with AsyncClient(m.address) as client:
            routings = [await client.route(h, ls.layer, p) for h, p in zip(batches, policies)]
            outs = await asyncio.gather(
                *(client.dispatch(h, ls.layer, r.experts, r.weights) for h, r in zip(batches, routings))
            )
            return routings, outs

    routings, outs = asyncio.run(run())
    assert all(bool((r.experts < 0).any()) for r in routings[1::2])
    for hidden, routing, out in zip(batches, routings, outs):
        expected = _transformers_experts(experts, hidden, routing.experts, routing.weights)
        assert (out - expected).abs().max().item() <= 1e-5


def test_dispatch_adds_no_shared_experts_where_forward_does(mesh):
    preset, m = mesh
    ls = open_source(preset).spec.layers[0]
    hidden = _hidden(ls.hidden_size, seed=5)
    with Client(m.address) as client:
        forward, routing = client.forward(hidden, ls.layer, return_routing=True)
        dispatched = client.dispatch(hidden, ls.layer, routing.experts, routing.weights)
    if ls.shared_intermediate_size:
        assert (forward - dispatched).abs().max().item() > 1e-3  # Forward's shared experts
    else:
        assert (forward - dispatched).abs().max().item() <= 1e-6


def test_bad_dispatch_is_invalid_argument_naming_the_field(mesh):
    preset, m = mesh
    ls = open_source(preset).spec.layers[0]
    hidden = _hidden(ls.hidden_size, tokens=2, seed=6)
    ids = torch.tensor([[0, 1], [2, 3]])
    ones = torch.ones(2, 2)
    cases = [
        (
            ids + ls.num_experts - 3,
            ones,
            "routing.experts.data",
            f"expected expert ids in [-1, {ls.num_experts})",
        ),
        (ids - 3, ones, "routing.experts.data", "token 0 slot 0 has -3"),
        (ids[:1], ones[:1], "routing.experts.shape", "expected 2 tokens"),
        (ids, ones[:, :1], "routing.weights.shape", "expected the shape of routing.experts [2, 2]"),
        (ids[0], ones[0], "routing.experts.shape", "expected 2 dimensions"),
        (ids, ones.masked_fill(ids == 2, float("nan")), "routing.weights.data", "token 1 slot 0 has nan"),
    ]
    with Client(m.address) as client:
        for experts, weights, field, message in cases:
            with pytest.raises(InvalidArgumentError) as info:
                client.dispatch(hidden, ls.layer, experts, weights)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert f"{field}: " in info.value.details and message in info.value.details, info.value.details
            assert isinstance(info.value.__cause__, grpc.RpcError)
        with pytest.raises(InvalidArgumentError, match="hidden.shape: expected hidden size"):
            client.dispatch(hidden[:, :3], ls.layer, ids, ones)
        # still served, and exact, right after
        out = client.dispatch(hidden, ls.layer, ids, ones)
        _, experts = _experts_module(preset, ls.layer)
        assert (out - _transformers_experts(experts, hidden, ids, ones)).abs().max().item() <= 1e-5

    # what the SDK cannot send: straight from the stub
    channel = grpc.insecure_channel(m.address)
    try:
        stub = pb_grpc.RouterStub(channel)
        raw = {
            "routing: required": pb.DispatchRequest(layer=ls.layer, hidden=wire.encode_tensor(hidden)),
            "routing.experts.dtype: expected one of DTYPE_INT32": pb.DispatchRequest(
                layer=ls.layer,
                hidden=wire.encode_tensor(hidden),
                routing=pb.Routing(experts=wire.encode_tensor(ones), weights=wire.encode_tensor(ones)),
            ),
        }
        for message, request in raw.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.Dispatch(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()
    finally:
        channel.close()
