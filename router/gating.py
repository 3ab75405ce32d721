"""Gate: pick the experts of every token and their combine weights. Pure torch.

Semantics follow the `transformers` routers of each model family (tests prove it):

- softmax top-k (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): softmax over float32 logits, top-k,
  optional renormalisation of the k weights (`norm_topk_prob`);
- DeepSeek-V3 (and GLM4-MoE, the same router): sigmoid scores, a selection-only correction bias,
  group-limited top-k (`n_group`, `topk_group`), normalisation, `routed_scaling_factor`;
- DeepSeek-V2: softmax of float32 logits, top-k (`greedy`) or group-limited top-k scoring a
  group by its best expert (`group_limited_greedy`), `routed_scaling_factor`, no renormalisation;
- gpt-oss: a router bias on the logits, top-k, softmax over the k picked logits (= the softmax
  renormalised over the k, `norm_topk_prob`);
- dynamic sparse activation, chosen per request: top-p and threshold (capped at `max_k`).

`route` runs, for a batch of T tokens, E experts, hidden size H:

1. logits  [T, E] = hidden [T, H] @ gate_weight [E, H]^T (+ gate_bias [E])  (hidden dtype for
   softmax unless `float32_logits`, float32 for sigmoid, as the references do);
2. scores  [T, E] float32 = softmax(logits) | sigmoid(logits);
3. choice  [T, E] = scores + correction_bias [E]: the selection score; the bias only ranks;
4. group limit (n_group > 1): group score = sum of the top-2 choice scores of the group
   (the max if a group has one expert), or the max (`GroupScore.MAX`); keep `topk_group`
   groups, other experts -> -inf;
5. pick per token: top-k | top-p | threshold over `choice`, dynamic k capped at `max_k`;
6. weights [T, K] = unbiased `scores` of the picked experts, renormalised over the picked
   slots if `norm_topk_prob`, times `routed_scaling_factor`.

Dynamic modes return K = the largest count used in the batch; unused slots hold expert -1 and
weight 0, so a caller can always skip `experts < 0`.

Shared experts are not chosen here: they run on every token (`MoELayer.shared`, pipeline.py).
"""

from __future__ import annotations

import dataclasses
import numbers

import torch
import torch.nn.functional as F

from moemesh.protos.spec import (
    GateConfig,
    GroupScore,
    InvalidRouting,
    Routing,
    RoutingMode,
    RoutingPolicy,
    ScoreFunction,
    is_real,
)

# Top-p counts a prefix as reaching `top_p` within this tolerance (float32 cumulative sums).
TOP_P_TOLERANCE = 1e-6
# Added to the sum of the picked weights before renormalising, as DeepSeek-V3 does: it keeps an
# all-zero row finite and is below float32 resolution for any sum that is not tiny.
_NORM_EPS = 1e-20


def effective_k(config: GateConfig, policy: RoutingPolicy | None = None) -> int:
    """Slots per token that `route` returns under `policy`: exactly this many for top-k, at most
    this many for top-p / threshold. Raises InvalidRouting like `route`."""
    policy = validate_policy(config, policy)
    if policy.mode is RoutingMode.TOP_K:
        return policy.top_k or config.top_k
    return min(policy.max_k or config.top_k, config.selectable_experts)


def validate_policy(config: GateConfig, policy: RoutingPolicy | None = None) -> RoutingPolicy:
    """Check `policy` against `config` before any tensor work; return it with `mode` as a
    `RoutingMode` (the default policy when `policy` is None).

    Every field that is set is checked, whatever the mode. Raises InvalidRouting naming the
    field (`routing.top_k`, `routing.top_p`, `routing.threshold`, `routing.max_k`,
    `routing.mode`) and the expected range.
    """
    if policy is None:
        return RoutingPolicy()
    try:
        mode = RoutingMode(policy.mode)
    except ValueError:
        choices = ", ".join(m.value for m in RoutingMode)
        raise InvalidRouting("routing.mode", f"must be one of {choices}, got {policy.mode!r}") from None

    if policy.top_k is not None:
        hi = config.selectable_experts
        why = ""
        if hi < config.num_experts:
            why = f" (topk_group={config.topk_group} of n_group={config.n_group} groups of {config.experts_per_group} experts)"
        _check_int("routing.top_k", policy.top_k, 1, hi, why)
    if policy.max_k is not None:
        _check_int("routing.max_k", policy.max_k, 1, config.num_experts, "")
    if policy.top_p is not None and not (is_real(policy.top_p) and 0.0 < policy.top_p <= 1.0):
        raise InvalidRouting("routing.top_p", f"must be in (0, 1], got {policy.top_p!r}")
    if policy.threshold is not None and not (is_real(policy.threshold) and 0.0 <= policy.threshold <= 1.0):
        raise InvalidRouting("routing.threshold", f"must be in [0, 1], got {policy.threshold!r}")

    if mode is RoutingMode.TOP_P and policy.top_p is None:
        raise InvalidRouting("routing.mode", "top_p needs routing.top_p in (0, 1], got none")
    if mode is RoutingMode.THRESHOLD and policy.threshold is None:
        raise InvalidRouting("routing.mode", "threshold needs routing.threshold in [0, 1], got none")
    return dataclasses.replace(policy, mode=mode)


def route(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    config: GateConfig,
    policy: RoutingPolicy | None = None,
    correction_bias: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> Routing:
    """Choose experts for every token.

    hidden: [tokens, hidden]; gate_weight: [experts, hidden]; correction_bias: [experts] or None
    (selection only); gate_bias: [experts] or None (added to the logits).
    Returns Routing(experts: [tokens, K] int64, weights: [tokens, K] float32).
    Raises InvalidRouting when `policy` does not fit `config`, ValueError on bad shapes.
    """
    policy = validate_policy(config, policy)
    _check_inputs(hidden, gate_weight, config, correction_bias, gate_bias)

    # scores: [T, E] float32, the probabilities the weights come from
    scores = gate_scores(hidden, gate_weight, config.score_function, config.float32_logits, gate_bias)
    # choice: [T, E], what ranks the experts; the bias never reaches the weights
    choice = scores if correction_bias is None else scores + correction_bias.to(torch.float32)
    # allowed: [T, E] bool, experts in the groups kept for each token
    choice, allowed = _limit_groups(choice, config.n_group, config.topk_group, config.group_score)

    if policy.mode is RoutingMode.TOP_K:
        k = policy.top_k or config.top_k
        experts = choice.topk(k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, experts)  # [T, k]
    else:
        max_k = policy.max_k or config.top_k
        # order: [T, E] experts by choice, best first; masked groups (-inf) come last
        order = choice.sort(dim=-1, descending=True, stable=True).indices
        if policy.mode is RoutingMode.TOP_P:
            count = _top_p_count(scores, allowed, order, policy.top_p, config.score_function)
        else:
            order, count = _threshold_order(scores, allowed, order, policy.threshold)
        count = count.clamp(min=1, max=max_k)  # [T]
        experts, weights = _take_prefix(scores, order, count)

    # post-process exactly as the references: renormalise, then scale
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + _NORM_EPS)
    weights = weights * config.routed_scaling_factor
    return Routing(experts=experts, weights=weights.to(torch.float32))


def gate_scores(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    score_function: ScoreFunction,
    float32_logits: bool = False,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert scores of every token, before any selection.

    hidden: [tokens, hidden]; gate_weight: [experts, hidden]; gate_bias: [experts] or None
    -> scores: [tokens, experts] float32.
    Softmax logits are computed in the hidden dtype (Mixtral / Qwen / OLMoE / gpt-oss routers)
    unless `float32_logits` (DeepSeek-V2), sigmoid logits in float32 (DeepSeek-V3 router).
    """
    dtype = torch.float32 if score_function == ScoreFunction.SIGMOID or float32_logits else hidden.dtype
    bias = None if gate_bias is None else gate_bias.to(dtype)
    logits = F.linear(hidden.to(dtype), gate_weight.to(dtype), bias)  # [T, E]
    if score_function == ScoreFunction.SIGMOID:
        return logits.sigmoid()
    return torch.softmax(logits.to(torch.float32), dim=-1)


def _limit_groups(
    choice: torch.Tensor, n_group: int, topk_group: int, group_score: GroupScore = GroupScore.TOP2_SUM
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `topk_group` best groups of each token (DeepSeek-V3 rule, or DeepSeek-V2's with
    `GroupScore.MAX`).

    choice: [T, E] -> (choice: [T, E] with -inf outside the kept groups, allowed: [T, E] bool).
    """
    T, E = choice.shape
    if n_group == 1:
        return choice, torch.ones_like(choice, dtype=torch.bool)
    per_group = E // n_group
    # group_scores: [T, G], sum of the top-2 scores of each group (the max for 1-expert groups),
    # or the max
    grouped = choice.reshape(T, n_group, per_group)
    best = 1 if group_score is GroupScore.MAX else min(2, per_group)
    group_scores = grouped.topk(best, dim=-1).values.sum(dim=-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # [T, G]
    allowed = keep.unsqueeze(-1).expand(T, n_group, per_group).reshape(T, E)
    return choice.masked_fill(~allowed, float("-inf")), allowed


def _top_p_count(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    order: torch.Tensor,
    top_p: float,
    score_function: ScoreFunction,
) -> torch.Tensor:
    """Length of the shortest prefix of `order` whose probability mass reaches `top_p`.

    scores, allowed, order: [T, E] -> count: [T] int64, capped at the allowed experts.
    Mass is the softmax probability, or for sigmoid the scores normalised over allowed experts.
    """
    mass = scores.masked_fill(~allowed, 0.0)  # [T, E]
    if score_function == ScoreFunction.SIGMOID:
        mass = mass / (mass.sum(dim=-1, keepdim=True) + _NORM_EPS)
    cum = mass.gather(1, order).cumsum(dim=-1)  # [T, E], mass of each prefix of `order`
    # cum is non-decreasing, so the prefixes short of the target are themselves a prefix
    count = (cum < top_p - TOP_P_TOLERANCE).sum(dim=-1) + 1
    return torch.minimum(count, allowed.sum(dim=-1))


def _threshold_order(
    scores: torch.Tensor,
    allowed: torch.Tensor,
    order: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the experts that pass `threshold` to the front of `order`, keeping their rank.

    scores, allowed, order: [T, E] -> (order: [T, E], count: [T] int64 experts that pass).
    When none passes, the front of `order` is still the best allowed expert.
    """
    passing = (allowed & (scores >= threshold)).gather(1, order)  # [T, E], in `order`
    # stable sort on "fails" (0 for passing, 1 otherwise) keeps the choice rank inside each part
    front = (~passing).to(torch.uint8).sort(dim=-1, stable=True).indices  # [T, E]
    return order.gather(1, front), passing.sum(dim=-1)


def _take_prefix(
    scores: torch.Tensor, order: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count[t]` experts of `order[t]` with their unbiased scores.

    scores, order: [T, E]; count: [T] -> (experts: [T, K] int64, weights: [T, K] float32),
    K = max(count) (at least 1); unused slots hold -1 and 0.
    """
    K = max(1, int(count.max())) if count.numel() else 1
    idx = order[:, :K]  # [T, K]
    used = torch.arange(K, device=order.device) < count.unsqueeze(-1)  # [T, K]
    experts = idx.masked_fill(~used, -1)
    weights = scores.gather(1, idx).masked_fill(~used, 0.0)
    return experts, weights


def _check_inputs(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    config: GateConfig,
    correction_bias: torch.Tensor | None,
    gate_bias: torch.Tensor | None = None,
) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating point tensor, got {hidden.dtype}")
    if gate_weight.dim() != 2 or gate_weight.shape[0] != config.num_experts:
        raise ValueError(
            f"gate_weight must be [experts={config.num_experts}, hidden], got shape {tuple(gate_weight.shape)}"
        )
    if gate_weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is [tokens, {hidden.shape[1]}], gate_weight is "
            f"[experts, {gate_weight.shape[1]}]"
        )
    if correction_bias is not None and tuple(correction_bias.shape) != (config.num_experts,):
        raise ValueError(
            f"correction_bias must be [experts={config.num_experts}], got shape {tuple(correction_bias.shape)}"
        )
    if gate_bias is not None and tuple(gate_bias.shape) != (config.num_experts,):
        raise ValueError(
            f"gate_bias must be [experts={config.num_experts}], got shape {tuple(gate_bias.shape)}"
        )


def _check_int(field: str, value: object, lo: int, hi: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRouting(field, f"must be an integer in {lo}..{hi}{why}, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidRouting(field, f"must be in {lo}..{hi}{why}, got {value}")
