"""Which host serves which experts.

`contiguous_placement` splits every layer's experts into contiguous blocks, one block per host, so
that a forward touches each host with one request per layer. Placement that weighs device speed,
memory and expert load belongs here too.
"""

from __future__ import annotations

from moemesh.protos.spec import ExpertKey, ModelSpec
from moemesh.protos.spec import format_experts as format_experts  # TEMP: planner split in progress


def contiguous_placement(spec: ModelSpec, num_hosts: int) -> list[tuple[ExpertKey, ...]]:
    """num_hosts lists of (layer, expert); every expert of every MoE layer exactly once.

    With E experts and N hosts, host i gets experts [i*E//N, (i+1)*E//N) of every layer.
    """
    if num_hosts < 1:
        raise ValueError(f"num_hosts must be >= 1, got {num_hosts}")
    hosts: list[list[ExpertKey]] = [[] for _ in range(num_hosts)]
    for layer in spec.layers:
        if num_hosts > layer.num_experts:
            raise ValueError(
                f"num_hosts {num_hosts} exceeds the {layer.num_experts} experts of layer {layer.layer}"
            )
        for i in range(num_hosts):
            lo, hi = i * layer.num_experts // num_hosts, (i + 1) * layer.num_experts // num_hosts
            hosts[i].extend((layer.layer, e) for e in range(lo, hi))
    return [tuple(h) for h in hosts]
