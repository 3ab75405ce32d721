"""Replica choice by speed and outstanding work; host health cooldown."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moemesh.protos.spec import GateConfig, Routing
from moemesh.router.dispatch import NoReplica, RoutingTable, plan
from moemesh.router.pipeline import HostUnavailable, MoELayer, SparseMoE
from moemesh.router.replicas import HostHealth, LeastLoadedReplica


def test_faster_replica_takes_more_rows_and_reservations_spread_load():
    chooser = LeastLoadedReplica({"fast": 4.0, "slow": 1.0})
    picks = [chooser.choose(0, e, ["slow", "fast"], rows=10) for e in range(10)]
    # finish-time balance: fast gets about 4x the rows of slow
    assert picks.count("fast") == 8 and picks.count("slow") == 2
    assert chooser.outstanding("fast") == 80 and chooser.outstanding("slow") == 20
    for host in picks:
        chooser.release(host, 10)
    assert chooser.outstanding("fast") == chooser.outstanding("slow") == 0


def test_outstanding_work_steers_away_from_a_busy_replica():
    chooser = LeastLoadedReplica()
    assert chooser.choose(0, 0, ["a", "b"], rows=100) == "a"  # tie: table order
    assert chooser.choose(0, 1, ["a", "b"], rows=10) == "b"  # a is busy
    chooser.release("a", 100)
    assert chooser.choose(0, 2, ["a", "b"], rows=10) == "a"


def test_plan_releases_its_reservations_when_an_expert_has_no_replica():
    chooser = LeastLoadedReplica()
    table = RoutingTable({(0, 0): ["a"], (0, 1): ["b"]})
    routing = Routing(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(NoReplica, match="layer 0 expert 1"):
        plan(routing, 0, 2, table, chooser, excluded=frozenset({"b"}))
    assert chooser.outstanding("a") == 0


def test_host_health_cooldown_and_mark_up():
    now = [0.0]
    health = HostHealth(cooldown_s=2.0, clock=lambda: now[0])
    health.mark_down("a")
    assert health.down() == {"a"}
    now[0] = 1.9
    assert health.is_down("a")
    now[0] = 2.1
    assert not health.is_down("a")  # tried again after the cooldown
    health.mark_down("a")
    health.mark_up("a")  # re-registered
    assert health.down() == frozenset()


class _Transport:
    def __init__(self, down):
        self.down = set(down)
        self.calls = []

    async def compute(self, host, segments, rows, timeout):
        self.calls.append(host)
        if host in self.down:
            raise HostUnavailable(host)
        return rows.clone()


def test_a_failed_host_is_skipped_by_later_forwards_and_rows_are_released():
    transport = _Transport(down={"a"})
    table = RoutingTable({(0, e): ["a", "b"] for e in range(4)})
    layer = MoELayer(0, 8, GateConfig(num_experts=4, top_k=2), torch.randn(4, 8))
    moe = SparseMoE({0: layer}, table, transport)
    try:
        first = asyncio.run(moe.forward(0, torch.randn(16, 8)))
        assert first.failed_hosts == ("a",)
        transport.calls.clear()
        second = asyncio.run(moe.forward(0, torch.randn(16, 8)))
        assert second.failed_hosts == () and transport.calls == ["b"]
        assert moe.chooser.outstanding("a") == moe.chooser.outstanding("b") == 0
        assert int(moe.tokens_routed[0].sum()) == 2 * 16 * 2
    finally:
        moe.close()
