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


def print_status(topology: Topology, router_address: str) -> None:
    """`moemesh status`: hosts, then one line per expert with its replicas and observed load."""
    print(f"model {topology.model}, router {router_address}")
    print(f"  {'host':10s} {'node':24s} {'device':8s} {'dtype':9s} {'speed':>6s} {'healthy':8s} address")
    for h in topology.hosts:
        print(
            f"  {h.host_id:10s} {h.node[:24]:24s} {h.device:8s} {h.dtype:9s} {h.relative_speed:6.3f} "
            f"{'yes' if h.healthy else 'NO':8s} {h.address}"
        )
    by_key: dict[tuple[int, int], list] = {}
    for h in topology.hosts:
        for key in h.experts:
            by_key.setdefault(key, []).append(h)
    print(f"\n  {'layer':>5s} {'expert':>6s} {'load':>8s}  replicas (host@node/device address)")
    for ls in topology.layers:
        for e in range(ls.num_experts):
            load = ls.tokens_routed[e] if e < len(ls.tokens_routed) else 0
            hosts = by_key.get((ls.layer, e), [])
            where = "  ".join(f"{h.host_id}@{h.node or '?'}/{h.device} {h.address}" for h in hosts) or "NONE"
            print(f"  {ls.layer:5d} {e:6d} {load:8d}  {where}")
