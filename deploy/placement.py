"""Which host serves which experts.

`contiguous_placement` splits every layer's experts into contiguous blocks, one block per host, so
that a forward touches each host with one request per layer. Placement that weighs device speed,
memory and expert load belongs here too.
"""

from __future__ import annotations

from moemesh.experts.model import ModelSpec

ExpertKey = tuple[int, int]


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


def format_experts(experts: tuple[ExpertKey, ...]) -> str:
    """[(0,0),(0,1),(0,2),(1,0)] -> "0:0-2,1:0" (the CLI's --experts syntax)."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in experts:
        by_layer.setdefault(layer, []).append(expert)
    parts = []
    for layer, ids in sorted(by_layer.items()):
        runs: list[list[int]] = []
        for e in sorted(ids):
            if runs and e == runs[-1][1] + 1:
                runs[-1][1] = e
            else:
                runs.append([e, e])
        parts.append(f"{layer}:" + "+".join(f"{a}-{b}" if b != a else f"{a}" for a, b in runs))
    return ",".join(parts)


def parse_experts(text: str) -> tuple[ExpertKey, ...]:
    """Inverse of format_experts: "0:0-2+5,1:0" -> ((0,0),(0,1),(0,2),(0,5),(1,0))."""
    out: list[ExpertKey] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer_text, sep, ranges = part.partition(":")
        if not sep or not layer_text.strip().isdigit():
            raise ValueError(f"--experts: expected LAYER:FIRST-LAST[+...], got {part!r}")
        layer = int(layer_text)
        for r in ranges.split("+"):
            lo, _, hi = r.partition("-")
            if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
                raise ValueError(f"--experts: bad expert range {r!r} in {part!r}")
            first, last = int(lo), int(hi) if hi else int(lo)
            if last < first:
                raise ValueError(f"--experts: empty range {r!r} in {part!r}")
            out.extend((layer, e) for e in range(first, last + 1))
    if not out:
        raise ValueError("--experts: no experts given")
    return tuple(out)
