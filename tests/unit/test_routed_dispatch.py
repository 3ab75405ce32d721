"""Routed dispatch (the caller's own routing, Router.Dispatch) through the one pipeline: equal to a
dense per-token loop written here, no shared experts, merged with gated requests without changing
anyone's result, and every bad routing refused alone with the field it concerns."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from moemesh.experts.ffn import ExpertBank
from moemesh.experts.weights import open_source
from moemesh.protos.spec import InvalidArgument, Routing, RoutingMode, RoutingPolicy
from moemesh.router.dispatch import RoutingTable, check_routing
from moemesh.router.pipeline import LayerRequest, SparseMoE
from moemesh.services.launch import build_layers
from moemesh.services.transport import InProcessTransport

PRESETS = ["tiny-mixtral", "tiny-deepseek-v3"]  # without and with shared experts


@pytest.fixture(scope="module", params=PRESETS)
def source(request):
    return open_source(request.param)


def _run(source, work):
    """`await work(moe, layer, hidden_size)` on a pipeline over two in-process hosts (the experts
    split between them), for the source's first MoE layer."""

    async def go():
        keys = source.spec.expert_keys()
        banks = {
            "h0": ExpertBank.from_source(source, keys[::2], "cpu", torch.float32),
            "h1": ExpertBank.from_source(source, keys[1::2], "cpu", torch.float32),
        }
        transport = InProcessTransport(banks)
        table = RoutingTable({key: [host] for host, bank in banks.items() for key in bank.experts})
        moe = SparseMoE(build_layers(source), table, transport)
        try:
            ls = source.spec.layers[0]
            return await work(moe, ls.layer, ls.hidden_size)
        finally:
            moe.close()
            await transport.close()

    return asyncio.run(go())


def _dense(source, layer: int, hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor):
    """The routed experts alone, token by token, slot by slot, in float64:
    out[t] = sum over slots with experts[t, k] >= 0 of weights[t, k] * down(act(gate x) * (up x))."""
    act = {"silu": F.silu, "gelu": F.gelu}[source.spec.layer(layer).activation]
    x = hidden.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(experts[t].tolist(), weights[t].tolist()):
            if e >= 0:
                f = source.expert(layer, e).to(dtype=torch.float64)
                out[t] += w * (f.down @ (act(f.gate @ x[t]) * (f.up @ x[t])))
    return out


def _random_routing(tokens: int, num_experts: int, k: int, seed: int) -> Routing:
    """Per token 0..k distinct experts in random slots, -1 in the others (with junk weights there,
    which must be ignored); token 0 uses no slot at all."""
    gen = torch.Generator().manual_seed(seed)
    experts = torch.full((tokens, k), -1, dtype=torch.int64)
    for t in range(tokens):
        used = 0 if t == 0 else int(torch.randint(1, k + 1, (1,), generator=gen))
        slots = torch.randperm(k, generator=gen)[:used]
        experts[t, slots] = torch.randperm(num_experts, generator=gen)[:used]
    weights = torch.rand(tokens, k, generator=gen) * 2 - 0.5
    return Routing(experts, weights)


def _hidden(tokens: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


def test_dispatch_equals_the_dense_per_token_loop_without_shared_experts(source):
    async def work(moe, layer, width):
        hidden = _hidden(37, width, seed=1)
        routing = _random_routing(37, moe.layers[layer].num_experts, k=4, seed=2)
        result = (await moe.forward_batch(layer, [LayerRequest(hidden, routing=routing)]))[0]
        return hidden, routing, result, layer

    hidden, routing, result, layer = _run(source, work)
    assert (routing.experts < 0).any() and (routing.experts >= 0).any()
    expected = _dense(source, layer, hidden, routing.experts, routing.weights)
    assert result.hidden.dtype == torch.float32 and result.hidden.shape == hidden.shape
    assert (result.hidden.double() - expected).abs().max().item() <= 1e-5
    assert torch.equal(result.hidden[0], torch.zeros(hidden.shape[1]))  # no used slot: zeros
    assert torch.equal(result.routing.experts, routing.experts)


def test_dispatch_with_no_slots_gives_zeros(source):
    async def work(moe, layer, width):
        empty = Routing(torch.zeros(3, 0, dtype=torch.int32), torch.zeros(3, 0))
        return (await moe.forward_batch(layer, [LayerRequest(_hidden(3, width, 0), routing=empty)]))[0]

    assert torch.equal(_run(source, work).hidden, torch.zeros(3, source.spec.layers[0].hidden_size))


def test_dispatch_of_the_gates_own_routing_is_forward_less_the_shared_experts(source):
    async def work(moe, layer, width):
        hidden = _hidden(9, width, seed=3)
        forward = await moe.forward(layer, hidden)
        dispatched = await moe.forward_batch(layer, [LayerRequest(hidden, routing=forward.routing)])
        shared = moe.layers[layer].shared
        return forward.hidden, dispatched[0].hidden, None if shared is None else shared(hidden)

    forward, dispatched, shared = _run(source, work)
    if shared is None:
        torch.testing.assert_close(dispatched, forward, rtol=0, atol=1e-6)
    else:
        assert shared.abs().max() > 1e-3  # the check below could not miss them
        torch.testing.assert_close(dispatched + shared, forward, rtol=0, atol=1e-5)


def test_dispatch_and_forward_merged_in_one_batch_each_give_their_solo_result(source):
    async def work(moe, layer, width):
        num_experts = moe.layers[layer].num_experts
        requests = [
            LayerRequest(_hidden(6, width, 10)),
            LayerRequest(_hidden(5, width, 11), routing=_random_routing(5, num_experts, k=3, seed=12)),
            LayerRequest(_hidden(4, width, 13), RoutingPolicy(RoutingMode.TOP_P, top_p=0.6, max_k=3)),
            LayerRequest(_hidden(7, width, 14), routing=_random_routing(7, num_experts, k=1, seed=15)),
        ]
        merged = await moe.forward_batch(layer, requests)
        solo = [(await moe.forward_batch(layer, [r]))[0] for r in requests]
        return merged, solo

    merged, solo = _run(source, work)
    for together, alone in zip(merged, solo):
        assert together.batch_requests == 4 and alone.batch_requests == 1
        assert torch.equal(together.routing.experts, alone.routing.experts)
        # equal up to float summation order (a token's hosts may add up in another order)
        torch.testing.assert_close(together.hidden, alone.hidden, rtol=1e-5, atol=1e-6)


def test_a_bad_dispatch_fails_only_itself_when_merged(source):
    async def work(moe, layer, width):
        num_experts = moe.layers[layer].num_experts
        good = _random_routing(4, num_experts, k=2, seed=20)
        out_of_range = Routing(good.experts.clone(), good.weights)
        out_of_range.experts[2, 1] = num_experts
        nan_hidden = _hidden(4, width, 21)
        nan_hidden[3, 0] = float("nan")
        requests = [
            LayerRequest(_hidden(6, width, 22)),
            LayerRequest(_hidden(4, width, 23), routing=out_of_range),
            LayerRequest(_hidden(4, width, 24), routing=good),
            LayerRequest(nan_hidden, routing=good),
            LayerRequest(_hidden(3, width, 25), routing=good),  # 3 tokens, routing for 4
        ]
        merged = await moe.forward_batch(layer, requests)
        solo = [(await moe.forward_batch(layer, [requests[i]]))[0] for i in (0, 2)]
        return merged, solo, num_experts

    merged, solo, num_experts = _run(source, work)
    assert isinstance(merged[1], InvalidArgument) and merged[1].field == "routing.experts.data"
    assert f"expected expert ids in [-1, {num_experts})" in str(merged[1]) and "token 2 slot 1" in str(
        merged[1]
    )
    assert isinstance(merged[3], InvalidArgument) and merged[3].field == "hidden.data"
    assert isinstance(merged[4], InvalidArgument) and merged[4].field == "routing.experts.shape"
    for together, alone in zip((merged[0], merged[2]), solo):
        assert together.batch_requests == 2
        torch.testing.assert_close(together.hidden, alone.hidden, rtol=1e-5, atol=1e-6)


# -- check_routing: every rule, each naming its field ------------------------------------------------

I32, E = torch.int32, 8


def _ids(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=I32)


@pytest.mark.parametrize(
    "experts, weights, field, message",
    [
        (torch.zeros(2, 2), torch.zeros(2, 2), "routing.experts.dtype", "expected an integer dtype"),
        (torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2), "routing.experts.dtype", "got torch.bool"),
        (_ids([0, 1], [2, 3]), torch.ones(2, 2, dtype=I32), "routing.weights.dtype", "expected a float dtype"),
        (_ids(0, 1), torch.zeros(2), "routing.experts.shape", r"expected 2 dimensions \[tokens, K\], got \[2\]"),
        (torch.zeros(2, 2, 1, dtype=I32), torch.zeros(2, 2, 1), "routing.experts.shape", "expected 2 dimensions"),
        (_ids([0, 1], [2, 3]), torch.zeros(2, 3), "routing.weights.shape", r"expected the shape of routing.experts \[2, 2\], got \[2, 3\]"),
        (_ids([0, 1]), torch.zeros(1, 2), "routing.experts.shape", "expected 2 tokens .*hidden.*got 1"),
        (_ids([0, 1], [2, E]), torch.zeros(2, 2), "routing.experts.data", r"ids in \[-1, 8\) .*token 1 slot 1 has 8"),
        (_ids([-2, 1], [2, 3]), torch.zeros(2, 2), "routing.experts.data", "token 0 slot 0 has -2"),
        (_ids([0, 1], [2, 3]), torch.tensor([[0.5, 0.5], [float("nan"), 1.0]]), "routing.weights.data", "expected finite values; token 1 slot 0 has nan"),
        (_ids([0, -1], [2, 3]), torch.tensor([[0.5, float("-inf")], [1.0, 1.0]]), "routing.weights.data", "token 0 slot 1 has -inf"),
    ],
)  # fmt: skip
def test_check_routing_rejections_name_the_field(experts, weights, field, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        check_routing(Routing(experts, weights), 2, E)
    assert info.value.field == field


def test_check_routing_accepts_any_int_and_float_dtype_and_unused_tokens():
    routing = Routing(_ids([-1, -1], [7, 0]).to(torch.int16), torch.tensor([[0.0, 0.0], [0.25, 0.75]]).half())
    checked = check_routing(routing, 2, E)
    assert checked.experts.dtype == torch.int64 and checked.weights.dtype == torch.float32
    assert checked.experts.tolist() == [[-1, -1], [7, 0]] and checked.weights.tolist()[1] == [0.25, 0.75]
    assert check_routing(Routing(torch.zeros(2, 0, dtype=I32), torch.zeros(2, 0)), 2, E).experts.shape == (
        2,
        0,
    )
