"""What every placement plan must satisfy, shared by the planner tests (no Ray, no network)."""

from __future__ import annotations

import pytest
import torch

from moemesh.deploy.cluster import ClusterSpec, load_cluster
from moemesh.deploy.plan import PlacementPlan, expert_bytes
from moemesh.protos.spec import ModelSpec

MIXTRAL_64 = "synthetic:layers=1,experts=64,hidden=4096,intermediate=14336"
# Tolerance for "not worse": the two makespans are sums of the same floats in different orders.
REL = 1e-9


def mixed_cluster() -> ClusterSpec:
    return load_cluster("mixed-gpu")


def skewed_counts(spec: ModelSpec, seed: int = 0, power: float = 4.0) -> torch.Tensor:
    """[moe_layers, experts] token counts with a few hot experts (Zipf-like)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(len(spec.layers), spec.layers[0].num_experts, generator=gen) ** power * 1000


def check_plan(plan: PlacementPlan, spec: ModelSpec, dtype_bytes: int = 2) -> None:
    """What every plan must satisfy: placed, within memory, one copy per device, loads add up."""
    size = {ls.layer: expert_bytes(ls, dtype_bytes) for ls in spec.layers}
    for dev in plan.devices:
        assert len(set(dev.experts)) == len(dev.experts), f"{dev.slot.label} hosts an expert twice"
        assert dev.memory_used == sum(size[layer] for layer, _ in dev.experts)
        assert dev.memory_used <= dev.slot.memory_bytes, f"{dev.slot.label} over its memory"
        assert all(s >= 0 for s in dev.served)
    for ls in spec.layers:
        for e in range(ls.num_experts):
            copies = plan.replicas(ls.layer, e)
            assert copies, f"expert {ls.layer}:{e} not placed"
            assert len({s.label for s in copies}) == len(copies)
            served = sum(
                dev.served[dev.experts.index((ls.layer, e))]
                for dev in plan.devices
                if (ls.layer, e) in dev.experts
            )
            assert served == pytest.approx(plan.load.share(ls.layer, e), rel=1e-9, abs=1e-12)
    assert plan.total_load == pytest.approx(len(spec.layers))
