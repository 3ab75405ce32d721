"""Plain references, written independently of moemesh's compute path.

- `dense_reference`: every token, every chosen expert, a Python loop: the obvious definition.
- `transformers_block`: the transformers sparse MoE block of the family, loaded with the source's weights.
- `transformers_routing`: the family's transformers router with the source's gate: top-k routing.
- `naive_route`: the routing spec one token at a time in Python floats, for every policy (top-k,
  top-p, threshold, group limits), given scores and the gate's parameters.
- `reference_routing` / `assert_matches_reference`: the routing and output a mesh must give,
  computed from the checkpoint's transformers config and weights only (never from what the mesh
  returned), and the comparison of a mesh's answer with them.

Routings are compared as `choices`: one {expert: weight} per token, unused slots dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from moemesh.experts.weights import WeightSource
from tests import hf_configs


def _hf_config(config_dict: dict):
    """A transformers config from a config.json dict (transformers imported on first use)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**config_dict)


def _act(name: str):
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[name]


def dense_reference(
    source: WeightSource, layer: int, hidden: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """hidden [T, H], experts/weights [T, K] (the routing decision) -> [T, H] float64 accumulation."""
    spec = source.spec.layer(layer)
    act = _act(spec.activation)
    x = hidden.to(torch.float64)
    out = torch.zeros_like(x)
    cache = {}
    for t in range(x.shape[0]):
        for e, w in zip(experts[t].tolist(), weights[t].tolist()):
            if e < 0:
                continue
            if e not in cache:
                cache[e] = source.expert(layer, e).to(dtype=torch.float64)
            f = cache[e]
            h = act(f.gate @ x[t]) * (f.up @ x[t])
            out[t] += w * (f.down @ h)
    gate = source.gate(layer)
    if gate.shared is not None:
        s = gate.shared.to(dtype=torch.float64)
        shared = (act(x @ s.gate.T) * (x @ s.up.T)) @ s.down.T
        if gate.shared_gate is not None:
            shared = torch.sigmoid(x @ gate.shared_gate.to(torch.float64).T) * shared
        out += shared
    return out


def transformers_block(
    source: WeightSource, config_dict: dict, layer: int, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The transformers MoE block of `layer`, with the source's weights, in eval mode, in `dtype`.

    DeepSeek-V3's router runs in float32 whatever the model dtype (as in transformers), so its gate
    keeps the source's exact float32 weights.
    """
    family = source.spec.family
    spec = source.spec.layer(layer)
    block = hf_configs.moe_block(family, _hf_config(config_dict))
    gate = source.gate(layer)
    with torch.no_grad():
        block.gate.weight.copy_(gate.weight)
        if gate.correction_bias is not None:
            block.gate.e_score_correction_bias.copy_(gate.correction_bias)
        for e in range(spec.num_experts):
            w = source.expert(layer, e)
            block.experts.gate_up_proj[e].copy_(torch.cat([w.gate, w.up], dim=0))
            block.experts.down_proj[e].copy_(w.down)
        shared_module = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
        if gate.shared is not None:
            shared_module.gate_proj.weight.copy_(gate.shared.gate)
            shared_module.up_proj.weight.copy_(gate.shared.up)
            shared_module.down_proj.weight.copy_(gate.shared.down)
        if gate.shared_gate is not None:
            block.shared_expert_gate.weight.copy_(gate.shared_gate)
        block.to(dtype)
        if family == "deepseek_v3":
            block.gate.float()
            block.gate.weight.copy_(gate.weight)
            block.gate.e_score_correction_bias.copy_(gate.correction_bias)
    return block


# -- routing -------------------------------------------------------------------------------------

Choices = list[dict[int, float]]  # per token: {expert: combine weight}


def choices(experts: torch.Tensor, weights: torch.Tensor) -> Choices:
    """experts, weights [T, K] (-1 in unused slots) -> one {expert: weight} per token."""
    out = []
    for es, ws in zip(experts.tolist(), weights.float().tolist()):
        out.append({e: w for e, w in zip(es, ws) if e >= 0})
    return out


def choice_tensors(picked: Sequence[dict[int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `choices`: experts [T, K] (-1 padded) and weights [T, K] (0 padded)."""
    k = max((len(c) for c in picked), default=0)
    experts = torch.full((len(picked), k), -1, dtype=torch.int64)
    weights = torch.zeros(len(picked), k, dtype=torch.float32)
    for t, c in enumerate(picked):
        experts[t, : len(c)] = torch.tensor(list(c), dtype=torch.int64)
        weights[t, : len(c)] = torch.tensor(list(c.values()), dtype=torch.float32)
    return experts, weights


def assert_same_choices(got: Choices, want: Choices, atol: float = 1e-5) -> None:
    """Token by token: the same experts, and weights within `atol`."""
    assert len(got) == len(want), (len(got), len(want))
    for t, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), f"token {t}: experts {sorted(g)} != reference {sorted(w)}"
        for e, weight in w.items():
            assert abs(g[e] - weight) <= atol, f"token {t} expert {e}: weight {g[e]} != reference {weight}"


def naive_route(scores: torch.Tensor, gate: Any, policy: Any, bias: torch.Tensor | None) -> Choices:
    """The routing spec, one token at a time in Python floats.

    scores: [T, E] softmax or sigmoid scores; gate: the layer's trained routing (num_experts, top_k,
    score_function, norm_topk_prob, routed_scaling_factor, n_group, topk_group); policy: mode
    ("top_k" | "top_p" | "threshold"), top_k, top_p, threshold, max_k; bias: [E] selection-only bias.
    """
    E, per_group = gate.num_experts, gate.num_experts // gate.n_group
    out = []
    for row in scores.tolist():
        choice = [s + (0.0 if bias is None else float(bias[e])) for e, s in enumerate(row)]
        allowed = list(range(E))
        if gate.n_group > 1:
            group_score = []
            for grp in range(gate.n_group):
                best = sorted(choice[grp * per_group : (grp + 1) * per_group], reverse=True)[:2]
                group_score.append(sum(best))
            kept = sorted(range(gate.n_group), key=lambda grp: -group_score[grp])[: gate.topk_group]
            allowed = [e for e in allowed if e // per_group in kept]
        ranked = sorted(allowed, key=lambda e: -choice[e])
        max_k = policy.max_k or gate.top_k
        if policy.mode == "top_k":
            picked = ranked[: policy.top_k or gate.top_k]
        elif policy.mode == "top_p":
            total = sum(row[e] for e in allowed) if gate.score_function == "sigmoid" else 1.0
            picked, mass = [], 0.0
            for e in ranked:
                picked.append(e)
                mass += row[e] / total
                if mass >= policy.top_p - 1e-6:
                    break
            picked = picked[:max_k]
        else:
            picked = [e for e in ranked if row[e] >= policy.threshold][:max_k] or ranked[:1]
        weights = [row[e] for e in picked]
        if gate.norm_topk_prob:
            weights = [w / sum(weights) for w in weights]
        out.append({e: w * gate.routed_scaling_factor for e, w in zip(picked, weights, strict=True)})
    return out


def transformers_routing(
    source: WeightSource, config_dict: dict, layer: int, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """experts, weights [T, K]: the family's transformers router, with the source's gate weight
    (and selection bias), on hidden [T, H] in float32."""
    gate = source.gate(layer)
    router = hf_configs.router(source.spec.family, _hf_config(config_dict)).float()
    with torch.no_grad():
        router.weight.copy_(gate.weight)
        if gate.correction_bias is not None:
            router.e_score_correction_bias.copy_(gate.correction_bias)
        _, weights, experts = router(hidden.float())
    return experts, weights.float()


def _gate_from_config(family: str, config_dict: dict) -> SimpleNamespace:
    """The trained routing, read from the transformers config as transformers reads it."""
    cfg = _hf_config(config_dict)
    deepseek = family == "deepseek_v3"
    return SimpleNamespace(
        num_experts=getattr(cfg, hf_configs.FAMILIES[family].experts_key),
        top_k=cfg.num_experts_per_tok,
        score_function="sigmoid" if deepseek else "softmax",
        norm_topk_prob=getattr(cfg, "norm_topk_prob", True),  # Mixtral always renormalises
        routed_scaling_factor=cfg.routed_scaling_factor if deepseek else 1.0,
        n_group=cfg.n_group if deepseek else 1,
        topk_group=cfg.topk_group if deepseek else 1,
    )


def reference_routing(
    source: WeightSource, config_dict: dict, layer: int, hidden: torch.Tensor, policy: Any = None
) -> Choices:
    """What the mesh must choose for hidden [T, H]: the transformers router for the default top-k,
    `naive_route` on plainly computed scores for a policy override."""
    if policy is None:
        return choices(*transformers_routing(source, config_dict, layer, hidden))
    gate = _gate_from_config(source.spec.family, config_dict)
    weights = source.gate(layer)
    logits = hidden.float() @ weights.weight.float().T  # [T, E]
    scores = logits.sigmoid() if gate.score_function == "sigmoid" else logits.softmax(dim=-1)
    return naive_route(scores, gate, policy, weights.correction_bias)


def assert_matches_reference(
    source: WeightSource,
    config_dict: dict,
    layer: int,
    hidden: torch.Tensor,
    out: torch.Tensor,
    routing: Any = None,
    policy: Any = None,
    atol: float = 1e-5,
) -> None:
    """A mesh's answer for hidden [T, H] equals the references: the routing it reported (if given)
    equals `reference_routing`, and `out` [T, H] equals `dense_reference` on that reference routing."""
    want = reference_routing(source, config_dict, layer, hidden, policy)
    if routing is not None:
        assert_same_choices(choices(routing.experts, routing.weights), want)
    expected = dense_reference(source, layer, hidden, *choice_tensors(want))
    err = (out.double() - expected).abs().max().item()
    assert err <= atol, f"max abs error {err} against the dense reference"
