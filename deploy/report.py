"""Human-readable tables and bars for the CLI (topology, load per expert, routing of a few tokens)."""

from __future__ import annotations

import torch

from moemesh.client.client import Topology

BAR = "█"


def print_topology(topology: Topology) -> None:
    print(f"model {topology.model}")
    for ls in topology.layers:
        shared = f", {ls.shared_experts} shared" if ls.shared_experts else ""
        print(
            f"  layer {ls.layer}: {ls.num_experts} experts{shared}, top-{ls.top_k} {ls.family}, hidden {ls.hidden_size}"
        )
    print(f"  {'host':10s} {'address':22s} {'device':8s} {'dtype':9s} experts")
    for h in topology.hosts:
        print(f"  {h.host_id:10s} {h.address:22s} {h.device:8s} {h.dtype:9s} {len(h.experts)}")


def load_bars(tokens_per_expert: torch.Tensor, width: int = 40) -> list[str]:
    """One line per expert: index, count, a bar scaled to the busiest expert."""
    counts = tokens_per_expert.tolist()
    top = max(max(counts), 1)
    return [f"  expert {e:3d} {c:6d} {BAR * round(width * c / top)}" for e, c in enumerate(counts)]


def balance(tokens_per_expert: torch.Tensor) -> float:
    """max / mean tokens per expert (1.0 = perfectly balanced)."""
    t = tokens_per_expert.to(torch.float64)
    return float(t.max() / t.mean()) if t.sum() > 0 else float("nan")
