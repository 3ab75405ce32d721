"""Continuous batching on the router (router/batching.py): merged requests give their solo results,
keep their own policies, and one request's bad input, cancellation or deadline spares the others."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moemesh.experts.ffn import ExpertBank
from moemesh.experts.weights import open_source
from moemesh.protos.spec import InvalidArgument, InvalidRouting, Routing, RoutingMode, RoutingPolicy
from moemesh.router.batching import BatchingConfig, ForwardBatcher
from moemesh.router.dispatch import RoutingTable
from moemesh.router.pipeline import DeadlineExceeded, LayerRequest, SparseMoE
from moemesh.services.launch import build_layers
from moemesh.services.transport import InProcessTransport

MODEL, LAYER, HIDDEN = "tiny-mixtral", 0, 64


class Gated:
    """An in-process transport whose calls wait until `open` is set; counts calls and rows."""

    def __init__(self, inner: InProcessTransport):
        self.inner = inner
        self.open = asyncio.Event()
        self.calls = 0
        self.rows = 0

    async def compute(self, host, segments, rows, timeout):
        self.calls += 1
        self.rows += int(rows.shape[0])
        await self.open.wait()
        return await self.inner.compute(host, segments, rows, timeout)


@pytest.fixture(scope="module")
def source():
    return open_source(MODEL)


@pytest.fixture(scope="module")
def banks(source):
    keys = source.spec.expert_keys()
    half = len(keys) // 2
    return {
        "h0": ExpertBank.from_source(source, keys[:half], "cpu", torch.float32),
        "h1": ExpertBank.from_source(source, keys[half:], "cpu", torch.float32),
    }


def _moe(source, banks, transport) -> SparseMoE:
    table = RoutingTable({key: [host] for host, bank in banks.items() for key in bank.experts})
    return SparseMoE(build_layers(source), table, transport)


def _hidden(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


POLICIES = [None, RoutingPolicy(top_k=3), RoutingPolicy(RoutingMode.TOP_P, top_p=0.6, max_k=4), None]


def _solo(source, banks, requests):
    """Each request alone, through the plain pipeline."""

    async def go():
        transport = InProcessTransport(banks)
        moe = _moe(source, banks, transport)
        try:
            return [await moe.forward(LAYER, h, p) for h, p in requests]
        finally:
            moe.close()
            await transport.close()

    return asyncio.run(go())


ONE_AT_A_TIME = BatchingConfig(max_inflight=1)


def _request(r) -> tuple[LayerRequest, float | None]:
    """(request, timeout) from a LayerRequest, or from (hidden, policy) or (hidden, policy, timeout)."""
    if isinstance(r, LayerRequest):
        return r, None
    return LayerRequest(r[0], r[1]), r[2] if len(r) == 3 else None


def _merged(source, banks, requests, act=None, config=ONE_AT_A_TIME):
    """The first request starts alone and holds its hosts; the rest queue and run as one batch.
    `act(tasks)` runs while they wait (e.g. cancels one). Returns (outcomes, transport)."""

    async def go():
        transport = Gated(InProcessTransport(banks))
        moe = _moe(source, banks, transport)
        batcher = ForwardBatcher(moe, config)
        try:
            first = asyncio.ensure_future(batcher.forward(LAYER, LayerRequest(_hidden(2, 99))))
            await asyncio.sleep(0.01)  # the first batch is dispatched and waits at the gate
            tasks = [asyncio.ensure_future(batcher.forward(LAYER, *_request(r))) for r in requests]
            await asyncio.sleep(0.01)
            if act is not None:
                await act(tasks)
            transport.open.set()
            await first
            return await asyncio.gather(*tasks, return_exceptions=True), transport
        finally:
            moe.close()
            await transport.inner.close()

    return asyncio.run(go())


def test_merged_results_equal_solo_results_with_their_own_policies(source, banks):
    requests = [(_hidden(t, seed), p) for seed, (t, p) in enumerate(zip((5, 1, 17, 8), POLICIES))]
    solo = _solo(source, banks, requests)
    merged, transport = _merged(source, banks, requests)
    for alone, together in zip(solo, merged):
        assert together.batch_requests == len(requests)  # the four really ran as one
        assert torch.equal(together.routing.experts, alone.routing.experts)
        torch.testing.assert_close(together.routing.weights, alone.routing.weights, rtol=0, atol=1e-6)
        torch.testing.assert_close(together.hidden, alone.hidden, rtol=0, atol=1e-6)
    # one call per host for the lone first request, one per host for the merged batch
    assert transport.calls <= 2 * len(banks)


def test_dispatch_and_forward_requests_merge_alike(source, banks):
    """Requests with their own routing (Router.Dispatch) join the same batch as gated ones."""
    own = Routing(
        torch.tensor([[0, -1], [7, 3], [-1, -1]]), torch.tensor([[1.0, 9.0], [0.5, 0.25], [2.0, 2.0]])
    )
    bad = Routing(torch.tensor([[8]]), torch.tensor([[1.0]]))  # expert 8 of 8
    requests = [
        LayerRequest(_hidden(5, 0)),
        LayerRequest(_hidden(3, 1), routing=own),
        LayerRequest(_hidden(1, 2), routing=bad),
        LayerRequest(_hidden(4, 3), RoutingPolicy(top_k=3)),
    ]

    async def alone():
        transport = InProcessTransport(banks)
        moe = _moe(source, banks, transport)
        try:
            return [(await moe.forward_batch(LAYER, [r]))[0] for r in requests]
        finally:
            moe.close()
            await transport.close()

    solo = asyncio.run(alone())
    merged, _ = _merged(source, banks, requests)
    assert isinstance(merged[2], InvalidArgument) and merged[2].field == "routing.experts.data"
    for i in (0, 1, 3):
        assert merged[i].batch_requests == 3  # ran together; the bad one failed alone
        torch.testing.assert_close(merged[i].hidden, solo[i].hidden, rtol=1e-5, atol=1e-6)
    assert torch.equal(merged[1].hidden[2], torch.zeros(HIDDEN))  # no used slot


def test_bad_input_fails_only_its_own_request(source, banks):
    nan = _hidden(4, 1)
    nan[2, 5] = float("nan")
    requests = [(_hidden(6, 0), None), (nan, None), (_hidden(3, 2), None)]
    solo = _solo(source, banks, [requests[0], requests[2]])
    merged, _ = _merged(source, banks, requests)
    assert isinstance(merged[1], InvalidArgument) and "token 2" in str(merged[1])
    torch.testing.assert_close(merged[0].hidden, solo[0].hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[2].hidden, solo[1].hidden, rtol=0, atol=1e-6)


def test_a_bad_policy_is_refused_before_queueing(source, banks):
    async def go():
        transport = InProcessTransport(banks)
        batcher = ForwardBatcher(_moe(source, banks, transport))
        with pytest.raises(InvalidRouting, match="routing.top_k"):
            await batcher.forward(LAYER, LayerRequest(_hidden(2, 0), RoutingPolicy(top_k=99)))
        assert not any(batcher._waiting.values())
        await transport.close()

    asyncio.run(go())


def test_a_cancelled_request_is_dropped_and_its_neighbours_stay_exact(source, banks):
    requests = [(_hidden(6, 0), None), (_hidden(40, 1), None), (_hidden(3, 2), None)]
    solo = _solo(source, banks, [requests[0], requests[2]])

    async def cancel_second(tasks):
        tasks[1].cancel()
        await asyncio.sleep(0)

    merged, transport = _merged(source, banks, requests, act=cancel_second)
    assert isinstance(merged[1], asyncio.CancelledError)
    torch.testing.assert_close(merged[0].hidden, solo[0].hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[2].hidden, solo[1].hidden, rtol=0, atol=1e-6)
    assert merged[0].batch_requests == 2  # the cancelled one was never computed
    assert transport.rows == 2 * 2 + (6 + 3) * 2  # top-2 rows: the first request and the two left


def test_a_request_past_its_deadline_fails_alone(source, banks):
    requests = [(_hidden(6, 0), None, None), (_hidden(5, 1), None, 0.001), (_hidden(3, 2), None, None)]
    solo = _solo(source, banks, [requests[0][:2], requests[2][:2]])

    async def wait_past_deadline(tasks):
        await asyncio.wait_for(asyncio.shield(asyncio.gather(tasks[1], return_exceptions=True)), 5)

    merged, _ = _merged(source, banks, requests, act=wait_past_deadline)
    assert isinstance(merged[1], DeadlineExceeded)
    torch.testing.assert_close(merged[0].hidden, solo[0].hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[2].hidden, solo[1].hidden, rtol=0, atol=1e-6)


def test_token_cap_splits_batches(source, banks):
    requests = [(_hidden(6, s), None) for s in range(4)]
    merged, _ = _merged(source, banks, requests, config=BatchingConfig(max_inflight=1, max_batch_tokens=12))
    assert [r.batch_requests for r in merged] == [2, 2, 2, 2]


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        BatchingConfig(max_batch_tokens=0)


def test_window_holds_only_while_the_layer_has_company(source, banks):
    """With a collection window, a lone client is never held; after a batch of three, a request
    waits (up to the window) until as many are waiting, then starts at once."""

    async def go():
        transport = Gated(InProcessTransport(banks))
        transport.open.set()
        moe = _moe(source, banks, transport)
        batcher = ForwardBatcher(moe, BatchingConfig(max_inflight=1, window_s=1.0))
        try:
            await batcher.forward(LAYER, LayerRequest(_hidden(3, 0)))  # alone: not held
            trio = [
                asyncio.ensure_future(batcher.forward(LAYER, LayerRequest(_hidden(2, s)))) for s in (1, 2, 3)
            ]
            merged = await asyncio.gather(*trio)  # the first starts alone, the next two merge
            calls = transport.calls
            held = asyncio.ensure_future(batcher.forward(LAYER, LayerRequest(_hidden(2, 4))))
            await asyncio.sleep(0)
            assert transport.calls == calls  # held: the last batch merged two, one waits
            second = asyncio.ensure_future(batcher.forward(LAYER, LayerRequest(_hidden(2, 5))))
            both = await asyncio.wait_for(asyncio.gather(held, second), 0.9)  # not at the window's end
            return merged, both
        finally:
            moe.close()
            await transport.inner.close()

    merged, both = asyncio.run(go())
    assert [r.batch_requests for r in merged] == [1, 2, 2]
    assert [r.batch_requests for r in both] == [2, 2]
