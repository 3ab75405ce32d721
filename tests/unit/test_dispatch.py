"""Plan, combine and the async pipeline against a fake in-memory transport (no sockets)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moemesh.protos.spec import GateConfig, Routing
from moemesh.router.dispatch import NoReplica, RoutingTable, combine, pack, plan, replan
from moemesh.router.pipeline import DeadlineExceeded, HostUnavailable, MoELayer, SparseMoE

E, H = 6, 4


def _routing() -> Routing:
    # 5 tokens, K=2, token 4 uses one slot only (dynamic routing leaves -1).
    experts = torch.tensor([[0, 3], [3, 5], [1, 0], [5, 2], [4, -1]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
    return Routing(experts, weights)


def _table() -> RoutingTable:
    # host a: experts 0-2, host b: experts 3-5; host c replicates 0 and 3.
    replicas = {(0, e): ["a"] if e < 3 else ["b"] for e in range(E)}
    replicas[(0, 0)] = ["a", "c"]
    replicas[(0, 3)] = ["b", "c"]
    return RoutingTable(replicas)


def test_plan_groups_rows_by_host_and_expert():
    routing = _routing()
    p = plan(routing, layer=0, num_experts=E, table=_table())
    assert sorted(b.host for b in p.batches) == ["a", "b"]
    assert p.tokens_per_expert.tolist() == [2, 1, 1, 2, 1, 2]
    rows = 0
    for batch in p.batches:
        start = 0
        for seg in batch.segments:
            assert seg.start == start and seg.count >= 1
            assert _table().replicas(0, seg.expert)[0] == batch.host
            # every row of the segment really was routed to this expert with this weight
            for r in range(seg.start, seg.start + seg.count):
                t = int(batch.token_index[r])
                slot = (routing.experts[t] == seg.expert).nonzero()
                assert slot.numel() == 1
                assert float(batch.weight[r]) == pytest.approx(float(routing.weights[t, slot[0, 0]]))
            start += seg.count
        assert start == batch.num_rows
        rows += batch.num_rows
    assert rows == int((routing.experts >= 0).sum())


def test_combine_equals_dense_weighted_sum():
    routing = _routing()
    hidden = torch.randn(5, H)
    p = plan(routing, 0, E, _table())
    out = torch.zeros(5, H)
    for batch in p.batches:
        rows = pack(hidden, batch)
        scale = torch.tensor([s.expert + 1.0 for s in batch.segments for _ in range(s.count)])
        combine(out, batch, rows * scale[:, None])  # fake expert e: x * (e + 1)
    expected = torch.zeros(5, H)
    for t in range(5):
        for e, w in zip(routing.experts[t].tolist(), routing.weights[t].tolist()):
            if e >= 0:
                expected[t] += w * (e + 1) * hidden[t]
    torch.testing.assert_close(out, expected)


def test_replan_moves_segments_to_replicas_and_keeps_rows():
    routing = Routing(
        torch.tensor([[0, 3], [3, 0], [3, 1]]), torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.5, 0.5]])
    )
    p = plan(routing, 0, E, _table())
    batch_b = next(b for b in p.batches if b.host == "b")  # expert 3 only
    moved = replan(batch_b, _table(), excluded=frozenset({"b"}))
    assert [b.host for b in moved] == ["c"]
    assert torch.equal(moved[0].token_index, batch_b.token_index)
    assert torch.equal(moved[0].weight, batch_b.weight)
    batch_a = next(b for b in p.batches if b.host == "a")  # experts 0 (replicated) and 1 (not)
    with pytest.raises(NoReplica, match="layer 0 expert 1"):
        replan(batch_a, _table(), excluded=frozenset({"a"}))


def test_plan_raises_no_replica_naming_layer_and_expert():
    with pytest.raises(NoReplica, match="layer 0 expert 1"):
        plan(_routing(), 0, E, _table(), excluded=frozenset({"a"}))


class FakeTransport:
    """Expert e of any layer computes x * (e + 1); hosts in `down` are unreachable.

    A host with a `delay` answers after that many seconds unless the call's timeout passes first,
    as a gRPC call with that deadline would (DeadlineExceeded). `timeouts` records each call's.
    """

    def __init__(self, down=(), delay=0.0):
        self.down = set(down)
        self.delay = delay
        self.calls: list[str] = []
        self.timeouts: list[float | None] = []

    async def compute(self, host, segments, rows, timeout):
        self.calls.append(host)
        self.timeouts.append(timeout)
        if self.delay:
            try:
                await asyncio.wait_for(asyncio.sleep(self.delay), timeout)
            except TimeoutError:
                raise DeadlineExceeded(f"host {host}: no answer within {timeout}s") from None
        if host in self.down:
            raise HostUnavailable(host, "down")
        out = torch.empty_like(rows)
        for s in segments:
            out[s.start : s.start + s.count] = rows[s.start : s.start + s.count] * (s.expert + 1)
        return out


def _moe(transport, shared=None) -> SparseMoE:
    gate = GateConfig(num_experts=E, top_k=2)
    weight = torch.randn(E, H, generator=torch.Generator().manual_seed(1))
    return SparseMoE({0: MoELayer(0, H, gate, weight, shared=shared)}, _table(), transport)


def _expected(moe: SparseMoE, hidden: torch.Tensor) -> torch.Tensor:
    routing = moe.gate(0, hidden)
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for e, w in zip(routing.experts[t].tolist(), routing.weights[t].tolist()):
            out[t] += w * (e + 1) * hidden[t]
    return out


def test_forward_one_call_per_host_and_exact():
    transport = FakeTransport()
    moe = _moe(transport, shared=lambda x: 2 * x)
    hidden = torch.randn(32, H, generator=torch.Generator().manual_seed(2))
    result = asyncio.run(moe.forward(0, hidden))
    torch.testing.assert_close(result.hidden, _expected(moe, hidden) + 2 * hidden)
    assert sorted(transport.calls) == sorted({b.host for b in result.plan.batches})
    assert result.retries == 0
    moe.close()


def test_forward_retries_failed_host_on_replica():
    # Route everything to experts 0 and 3 (both replicated on c) by a gate that prefers them.
    transport = FakeTransport(down={"a"})
    moe = _moe(transport)
    weight = torch.full((E, H), -5.0)
    weight[0] = weight[3] = 5.0
    moe.layers[0] = MoELayer(0, H, GateConfig(num_experts=E, top_k=2), weight)
    hidden = torch.rand(8, H) + 0.1
    result = asyncio.run(moe.forward(0, hidden))
    torch.testing.assert_close(result.hidden, _expected(moe, hidden))
    assert result.failed_hosts == ("a",) and result.retries == 1
    assert "c" in transport.calls
    moe.close()


def test_forward_without_live_replica_raises_no_replica():
    moe = _moe(FakeTransport(down={"a", "c"}))
    weight = torch.full((E, H), -5.0)
    weight[1] = weight[0] = 5.0
    moe.layers[0] = MoELayer(0, H, GateConfig(num_experts=E, top_k=2), weight)
    with pytest.raises(NoReplica, match="layer 0 expert [01]"):
        asyncio.run(moe.forward(0, torch.rand(4, H) + 0.1))
    moe.close()


def test_forward_passes_deadline():
    # Hosts that answer after 30 s and a 0.5 s deadline: the forward must fail with the deadline.
    # Without the caller's deadline on the expert calls it would succeed 30 s later.
    transport = FakeTransport(delay=30.0)
    moe = _moe(transport)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(moe.forward(0, torch.randn(4, H), timeout=0.5))
    assert transport.calls and len(transport.timeouts) == len(transport.calls)
    assert all(t is not None and 0 < t <= 0.5 for t in transport.timeouts), transport.timeouts
    moe.close()


def test_forward_past_its_deadline_calls_no_host():
    transport = FakeTransport()
    moe = _moe(transport)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(moe.forward(0, torch.randn(4, H), timeout=0.0))
    assert transport.calls == []
    moe.close()


def test_forward_without_deadline_gives_hosts_none():
    transport = FakeTransport()
    moe = _moe(transport)
    asyncio.run(moe.forward(0, torch.randn(4, H)))
    assert transport.timeouts and all(t is None for t in transport.timeouts)
    moe.close()


def test_swap_table_is_used_by_next_forward():
    transport = FakeTransport()
    moe = _moe(transport)
    moe.swap_table(RoutingTable({(0, e): ["z"] for e in range(E)}))
    asyncio.run(moe.forward(0, torch.randn(4, H)))
    assert set(transport.calls) == {"z"}
    moe.close()
