"""Gate (`router/gating.py`): exact against the transformers routers, plus the properties of
group limits and dynamic sparse activation (top-p, threshold) against a naive per-token loop."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moemesh.protos import spec
from moemesh.protos.spec import (
    GateConfig,
    GroupScore,
    InvalidRouting,
    RoutingMode,
    RoutingPolicy,
    ScoreFunction,
)
from moemesh.router.gating import effective_k, gate_scores, route, validate_policy
from tests import hf_configs
from tests.references import assert_same_choices, choices, naive_route

T, H = 64, 32
SOFTMAX, SIGMOID = ScoreFunction.SOFTMAX, ScoreFunction.SIGMOID


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(num_experts: int, seed: int = 0, tokens: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: [tokens, H]; gate_weight: [experts, H], scaled so that logits are O(1)."""
    g = _gen(seed)
    hidden = torch.randn(tokens, H, generator=g)
    gate_weight = torch.randn(num_experts, H, generator=g) / math.sqrt(H)
    return hidden, gate_weight


def _by_expert(experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the K slots of every token by expert index: experts, weights [T, K]."""
    experts, order = experts.sort(dim=-1)
    return experts, weights.gather(1, order)


def _used(routing: spec.Routing) -> torch.Tensor:
    return routing.experts >= 0  # [T, K] bool


def _chosen(routing: spec.Routing, num_experts: int) -> torch.Tensor:
    """[T, E] bool, True where the token uses the expert (unused slots go to a spare column)."""
    idx = routing.experts.masked_fill(~_used(routing), num_experts)  # [T, K]
    mask = torch.zeros(idx.shape[0], num_experts + 1, dtype=torch.bool)
    return mask.scatter_(1, idx, True)[:, :num_experts]


# ---------------------------------------------------------------------------------------------
# Exact against transformers


def _router(family: str, norm: bool):
    """The family's transformers router at hidden size H, and the GateConfig that must match it."""
    if family in ("deepseek_v3", "glm4_moe"):
        gate = GateConfig(
            num_experts=16,
            top_k=4,
            score_function=SIGMOID,
            norm_topk_prob=norm,
            routed_scaling_factor=2.5,
            n_group=4,
            topk_group=2,
        )
        extra = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=norm)
    elif family == "deepseek_v2":  # norm: group_limited_greedy, else greedy (never renormalised)
        method = "group_limited_greedy" if norm else "greedy"
        gate = GateConfig(
            num_experts=16,
            top_k=3,
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
            n_group=4 if norm else 1,
            topk_group=2 if norm else 1,
            group_score=GroupScore.MAX,
            float32_logits=True,
        )
        extra = dict(n_group=4, topk_group=2, routed_scaling_factor=1.5, topk_method=method)
    elif family == "gpt_oss":  # softmax over the k picked logits: the top-k renormalised
        gate = GateConfig(num_experts=8, top_k=2, norm_topk_prob=True, has_gate_bias=True)
        extra = {}
    else:
        gate = GateConfig(num_experts=8, top_k=2, norm_topk_prob=norm)
        extra = {} if family == "mixtral" else dict(norm_topk_prob=norm)  # Mixtral always renormalises
    cfg = hf_configs.config(
        family, hidden_size=H, num_experts=gate.num_experts, num_experts_per_tok=gate.top_k, **extra
    )
    return hf_configs.router(family, cfg), gate


FAMILIES = [
    pytest.param("mixtral", True, id="mixtral"),
    pytest.param("qwen2_moe", True, id="qwen2_moe-norm"),
    pytest.param("qwen2_moe", False, id="qwen2_moe-raw"),
    pytest.param("qwen3_moe", True, id="qwen3_moe-norm"),
    pytest.param("olmoe", False, id="olmoe-raw"),
    pytest.param("olmoe", True, id="olmoe-norm"),
    pytest.param("deepseek_v3", True, id="deepseek_v3-norm"),
    pytest.param("deepseek_v3", False, id="deepseek_v3-raw"),
    pytest.param("glm4_moe", True, id="glm4_moe-norm"),
    pytest.param("glm4_moe", False, id="glm4_moe-raw"),
    pytest.param("deepseek_v2", True, id="deepseek_v2-group_limited_greedy"),
    pytest.param("deepseek_v2", False, id="deepseek_v2-greedy"),
    pytest.param("gpt_oss", True, id="gpt_oss"),
]


def _seeded_router(family: str, norm: bool, seed: int = 1):
    """The transformers router with seeded weights (and a non-zero bias for DeepSeek-V3)."""
    router, gate = _router(family, norm)
    g = _gen(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) / math.sqrt(H))
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(gate.num_experts, generator=g) * 0.3)
        if gate.has_gate_bias:  # gpt-oss's router Linear bias
            router.bias.copy_(torch.randn(gate.num_experts, generator=g) * 0.3)
    return router, gate


@pytest.mark.parametrize(("family", "norm"), FAMILIES)
def test_top_k_matches_transformers_router(family, norm):
    router, gate = _seeded_router(family, norm)
    bias = getattr(router, "e_score_correction_bias", None)
    gate_bias = router.bias.detach() if gate.has_gate_bias else None
    hidden = torch.randn(T, H, generator=_gen(2))

    with torch.no_grad():
        _, ref_weights, ref_experts = router(hidden)
    got = route(hidden, router.weight.detach(), gate, correction_bias=bias, gate_bias=gate_bias)

    assert got.experts.dtype == torch.int64 and got.weights.dtype == torch.float32
    assert got.experts.shape == got.weights.shape == (T, gate.top_k)
    ref_e, ref_w = _by_expert(ref_experts, ref_weights.float())
    got_e, got_w = _by_expert(got.experts, got.weights)
    assert torch.equal(got_e, ref_e)
    torch.testing.assert_close(got_w, ref_w, rtol=0, atol=1e-6)


def test_deepseek_correction_bias_changes_choice_not_weights():
    router, gate = _seeded_router("deepseek_v3", True)
    hidden = torch.randn(T, H, generator=_gen(2))
    weight, bias = router.weight.detach(), router.e_score_correction_bias

    biased = route(hidden, weight, gate, correction_bias=bias)
    plain = route(hidden, weight, gate)
    # the bias must matter for this seed, or the exactness test above proves nothing about it
    assert not torch.equal(
        _by_expert(biased.experts, biased.weights)[0], _by_expert(plain.experts, plain.weights)[0]
    )
    # weights are the unbiased sigmoid scores of the chosen experts, normalised and scaled
    scores = torch.sigmoid(hidden @ weight.T).gather(1, biased.experts)
    torch.testing.assert_close(biased.weights, 2.5 * scores / scores.sum(-1, keepdim=True), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("family", "norm"), [FAMILIES[0], FAMILIES[6], FAMILIES[8], FAMILIES[10]])
def test_bfloat16_model_matches_transformers_router(family, norm):
    # softmax routers take logits in the model dtype, DeepSeek-V3 upcasts to float32 first
    router, gate = _seeded_router(family, norm)
    router = router.to(torch.bfloat16)
    bias = getattr(router, "e_score_correction_bias", None)
    hidden = torch.randn(T, H, generator=_gen(2)).to(torch.bfloat16)

    with torch.no_grad():
        _, ref_weights, ref_experts = router(hidden)
    got = route(hidden, router.weight.detach(), gate, correction_bias=bias)

    assert got.weights.dtype == torch.float32
    ref_e, ref_w = _by_expert(ref_experts, ref_weights.float())
    got_e, got_w = _by_expert(got.experts, got.weights)
    assert torch.equal(got_e, ref_e)
    torch.testing.assert_close(got_w, ref_w, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dynamic sparse activation against a naive per-token loop (tests.references.naive_route)


CONFIGS = {
    "softmax": GateConfig(num_experts=16, top_k=4),
    "softmax-raw-groups": GateConfig(num_experts=16, top_k=4, norm_topk_prob=False, n_group=4, topk_group=2),
    "sigmoid-groups": GateConfig(
        num_experts=16, top_k=4, score_function=SIGMOID, routed_scaling_factor=2.5, n_group=4, topk_group=2
    ),
    "sigmoid-raw-groups-of-one": GateConfig(
        num_experts=8, top_k=3, score_function=SIGMOID, norm_topk_prob=False, n_group=8, topk_group=5
    ),
}
POLICIES = {
    "top_k": RoutingPolicy(),
    "top_k=2": RoutingPolicy(top_k=2),
    "top_p=0.5": RoutingPolicy(RoutingMode.TOP_P, top_p=0.5, max_k=6),
    "top_p=0.9": RoutingPolicy(RoutingMode.TOP_P, top_p=0.9),
    "top_p=1": RoutingPolicy(RoutingMode.TOP_P, top_p=1.0, max_k=8),
    "threshold=0.1": RoutingPolicy(RoutingMode.THRESHOLD, threshold=0.1, max_k=5),
    "threshold=0.6": RoutingPolicy(RoutingMode.THRESHOLD, threshold=0.6, max_k=8),
}


@pytest.mark.parametrize("with_bias", [False, True], ids=["unbiased", "biased"])
@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_route_matches_naive_per_token_loop(config_name, policy_name, with_bias):
    config, policy = CONFIGS[config_name], POLICIES[policy_name]
    hidden, gate_weight = _inputs(config.num_experts, seed=3)
    bias = torch.randn(config.num_experts, generator=_gen(4)) * 0.2 if with_bias else None

    got = route(hidden, gate_weight, config, policy, bias)
    want = naive_route(gate_scores(hidden, gate_weight, config.score_function), config, policy, bias)

    assert got.experts.shape == got.weights.shape
    assert_same_choices(choices(got.experts, got.weights), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("config_name", ["softmax", "sigmoid-groups"])
@pytest.mark.parametrize(("top_p", "max_k"), [(0.5, None), (0.8, 3), (0.95, 16)])
def test_top_p_reaches_mass_with_shortest_prefix_or_hits_cap(config_name, top_p, max_k):
    config = CONFIGS[config_name]
    hidden, gate_weight = _inputs(config.num_experts, seed=5)
    hidden = 3 * hidden  # sharper scores, so that k varies between tokens
    got = route(hidden, gate_weight, config, RoutingPolicy(RoutingMode.TOP_P, top_p=top_p, max_k=max_k))

    cap = min(max_k or config.top_k, config.selectable_experts)
    scores = gate_scores(hidden, gate_weight, config.score_function)  # [T, E]
    if config.score_function is SIGMOID:
        # normalise over the experts of the groups used (group choice is checked elsewhere)
        per_group = config.experts_per_group
        groups = _chosen(got, config.num_experts).reshape(T, config.n_group, per_group).any(-1)
        allowed = groups.repeat_interleave(per_group, dim=-1)  # [T, E]
        # a token may use fewer groups than allowed; only check tokens that used topk_group groups
        full = allowed.sum(-1) == config.selectable_experts
        assert bool(full.any())
        scores = scores.masked_fill(~allowed, 0.0)
        scores = scores / scores.sum(-1, keepdim=True)
    else:
        full = torch.ones(T, dtype=torch.bool)

    count = _used(got).sum(-1)  # [T]
    mass = scores.gather(1, got.experts.clamp(min=0)).masked_fill(~_used(got), 0.0).cumsum(-1)  # [T, K]
    reached = mass.gather(1, (count - 1).unsqueeze(-1)).squeeze(-1) >= top_p - 1e-6
    before = torch.where(count > 1, mass.gather(1, (count - 2).clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    assert bool(((count >= 1) & (count <= cap)).all())
    assert bool((reached | (count == cap))[full].all())
    assert bool((before < top_p - 1e-6)[full].all()), "prefix is not the shortest"
    assert got.experts.shape[1] == int(count.max())
    assert int(count.max()) > int(count.min()) or int(count.min()) == cap, "k should vary for this seed"


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("policy_name", ["top_p=0.5", "top_p=1", "threshold=0.1", "threshold=0.6"])
def test_dynamic_slots_are_packed_capped_and_normalised(config_name, policy_name):
    config, policy = CONFIGS[config_name], POLICIES[policy_name]
    hidden, gate_weight = _inputs(config.num_experts, seed=6)
    got = route(hidden, gate_weight, config, policy)

    used = _used(got)
    count = used.sum(-1)
    K = got.experts.shape[1]
    cap = min(policy.max_k or config.top_k, config.selectable_experts)
    # at least one expert, at most the cap, and K is the largest count in the batch
    assert bool((count >= 1).all()) and bool((count <= cap).all())
    assert int(count.max()) == K
    # used slots come first; unused slots are -1 with weight 0, used weights are positive
    assert torch.equal(used, torch.arange(K) < count.unsqueeze(-1))
    assert bool((got.weights[~used] == 0).all()) and bool((got.experts[~used] == -1).all())
    assert bool((got.weights[used] > 0).all())
    # no expert twice in one token
    e = got.experts.masked_fill(~used, -1).sort(-1).values
    assert not bool(((e[:, 1:] == e[:, :-1]) & (e[:, 1:] >= 0)).any())
    sums = got.weights.sum(-1)
    if config.norm_topk_prob:
        torch.testing.assert_close(sums, torch.full((T,), config.routed_scaling_factor), rtol=0, atol=1e-5)
    else:
        scores = gate_scores(hidden, gate_weight, config.score_function)
        raw = scores.gather(1, got.experts.clamp(min=0)).masked_fill(~used, 0.0)
        torch.testing.assert_close(got.weights, raw * config.routed_scaling_factor, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config_name", ["softmax-raw-groups", "sigmoid-groups", "sigmoid-raw-groups-of-one"])
@pytest.mark.parametrize("policy_name", ["top_k", "top_p=1", "threshold=0.1"])
def test_chosen_experts_fall_in_at_most_topk_group_groups(config_name, policy_name):
    config, policy = CONFIGS[config_name], POLICIES[policy_name]
    if policy.mode is RoutingMode.TOP_P:
        policy = RoutingPolicy(RoutingMode.TOP_P, top_p=1.0, max_k=config.num_experts)
    hidden, gate_weight = _inputs(config.num_experts, seed=7)
    got = route(hidden, gate_weight, config, policy, torch.randn(config.num_experts, generator=_gen(8)))

    used = _used(got)
    # groups: [T, n_group] bool, groups that hold at least one chosen expert
    groups = _chosen(got, config.num_experts).reshape(T, config.n_group, config.experts_per_group).any(-1)
    assert int(groups.sum(-1).max()) <= config.topk_group
    if policy_name == "top_p=1":
        # top_p=1 with no cap below the allowed experts takes every expert of the kept groups
        assert bool((used.sum(-1) == config.selectable_experts).all())
        assert bool((groups.sum(-1) == config.topk_group).all())


def test_top_p_stops_where_mass_reaches_top_p_up_to_rounding():
    # one token whose probabilities are 1/2, 1/4, 1/8, 1/8: the first two reach 0.75
    config = GateConfig(num_experts=4, top_k=4)
    hidden = torch.zeros(1, H)
    hidden[0, 0] = 1.0
    gate_weight = torch.zeros(4, H)
    gate_weight[:, 0] = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()

    got = route(hidden, gate_weight, config, RoutingPolicy(RoutingMode.TOP_P, top_p=0.75))
    assert got.experts.tolist() == [[0, 1]]
    torch.testing.assert_close(got.weights, torch.tensor([[2 / 3, 1 / 3]]))
    # within the 1e-6 tolerance above the mass of two experts, two still reach it
    two = float(gate_scores(hidden, gate_weight, SOFTMAX)[0, :2].sum())
    got = route(hidden, gate_weight, config, RoutingPolicy(RoutingMode.TOP_P, top_p=two + 5e-7))
    assert got.experts.tolist() == [[0, 1]]
    # well above it, a third expert is needed
    got = route(hidden, gate_weight, config, RoutingPolicy(RoutingMode.TOP_P, top_p=0.76))
    assert got.experts.shape == (1, 3)


def test_threshold_takes_every_passing_expert_and_at_least_the_best():
    config = CONFIGS["softmax"]
    hidden, gate_weight = _inputs(config.num_experts, seed=9)
    scores = gate_scores(hidden, gate_weight, SOFTMAX)  # [T, E]
    threshold = 0.15
    got = route(
        hidden, gate_weight, config, RoutingPolicy(RoutingMode.THRESHOLD, threshold=threshold, max_k=16)
    )

    chosen = _chosen(got, config.num_experts)
    passing = scores >= threshold
    none_pass = ~passing.any(-1)
    assert bool(none_pass.any()) and bool((~none_pass).any()), "seed should cover both cases"
    assert torch.equal(chosen[~none_pass], passing[~none_pass])
    # no expert passes: exactly the best one, with all the (normalised) weight
    assert bool((_used(got).sum(-1)[none_pass] == 1).all())
    assert torch.equal(got.experts[none_pass, 0], scores[none_pass].argmax(-1))
    assert bool((got.weights[none_pass, 0] == 1.0).all())


def test_threshold_cap_keeps_the_best_passing_experts():
    config = CONFIGS["softmax"]
    hidden, gate_weight = _inputs(config.num_experts, seed=10)
    got = route(hidden, gate_weight, config, RoutingPolicy(RoutingMode.THRESHOLD, threshold=0.0, max_k=3))

    # threshold 0 passes every expert, so the cap decides: the top-3 by score
    assert got.experts.shape == (T, 3)
    top3 = gate_scores(hidden, gate_weight, SOFTMAX).topk(3, dim=-1).indices
    assert torch.equal(got.experts.sort(-1).values, top3.sort(-1).values)


def test_top_k_override_changes_k():
    config = CONFIGS["sigmoid-groups"]
    hidden, gate_weight = _inputs(config.num_experts, seed=11)

    default = route(hidden, gate_weight, config)
    one = route(hidden, gate_weight, config, RoutingPolicy(top_k=1))
    six = route(hidden, gate_weight, config, RoutingPolicy(top_k=6))

    assert default.experts.shape == (T, 4) and one.experts.shape == (T, 1) and six.experts.shape == (T, 6)
    assert bool((one.weights == 2.5).all())
    # the default top-4 is contained in the top-6 of the same groups
    assert bool((default.experts.unsqueeze(-1) == six.experts.unsqueeze(1)).any(-1).all())
    assert effective_k(config, RoutingPolicy(top_k=6)) == 6
    assert effective_k(config, RoutingPolicy(RoutingMode.TOP_P, top_p=0.5, max_k=16)) == 8


def test_no_tokens_gives_empty_routing():
    config = CONFIGS["softmax"]
    _, gate_weight = _inputs(config.num_experts)
    for policy in (None, POLICIES["top_p=0.5"], POLICIES["threshold=0.1"]):
        got = route(torch.empty(0, H), gate_weight, config, policy)
        assert got.experts.shape[0] == 0 and got.weights.shape == got.experts.shape


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("policy", "field", "expected"),
    [
        (RoutingPolicy(top_k=9), "routing.top_k", "1..8"),  # more than the 2 groups of 4 allow
        (RoutingPolicy(top_k=0), "routing.top_k", "1..8"),
        (RoutingPolicy(top_k=2.5), "routing.top_k", "integer"),
        (RoutingPolicy(RoutingMode.TOP_P, top_p=0.0), "routing.top_p", "(0, 1]"),
        (RoutingPolicy(RoutingMode.TOP_P, top_p=1.5), "routing.top_p", "(0, 1]"),
        (RoutingPolicy(RoutingMode.TOP_P, top_p=float("nan")), "routing.top_p", "(0, 1]"),
        (RoutingPolicy(RoutingMode.THRESHOLD, threshold=-0.1), "routing.threshold", "[0, 1]"),
        (RoutingPolicy(RoutingMode.THRESHOLD, threshold=1.1), "routing.threshold", "[0, 1]"),
        (RoutingPolicy(RoutingMode.TOP_P, top_p=0.5, max_k=0), "routing.max_k", "1..16"),
        (RoutingPolicy(RoutingMode.TOP_P, top_p=0.5, max_k=17), "routing.max_k", "1..16"),
        (RoutingPolicy(RoutingMode.TOP_P), "routing.mode", "routing.top_p"),
        (RoutingPolicy(RoutingMode.THRESHOLD), "routing.mode", "routing.threshold"),
        (RoutingPolicy(mode="nucleus"), "routing.mode", "top_k, top_p, threshold"),
    ],
)
def test_invalid_policy_names_field_and_range(policy, field, expected):
    config = CONFIGS["sigmoid-groups"]  # 16 experts, 4 groups of 4, 2 groups per token
    hidden, gate_weight = _inputs(config.num_experts, tokens=2)

    with pytest.raises(InvalidRouting) as err:
        route(hidden, gate_weight, config, policy)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert expected in str(err.value)
    assert isinstance(err.value, ValueError)


def test_valid_policy_accepts_string_mode():
    config = CONFIGS["softmax"]
    assert validate_policy(config, RoutingPolicy(mode="top_p", top_p=0.3)).mode is RoutingMode.TOP_P
    assert validate_policy(config, None) == RoutingPolicy()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_experts": 10, "top_k": 2, "n_group": 4, "topk_group": 1},  # 10 % 4 != 0
        {"num_experts": 8, "top_k": 0},
        {"num_experts": 8, "top_k": 9},
        {"num_experts": 8, "top_k": 2, "n_group": 2, "topk_group": 3},
        {"num_experts": 16, "top_k": 5, "n_group": 4, "topk_group": 1},  # one group of 4 < 5
        {"num_experts": 8, "top_k": 2, "score_function": "relu"},
    ],
)
def test_invalid_gate_config_raises(kwargs):
    with pytest.raises(ValueError):
        GateConfig(**kwargs)


def test_gate_config_accepts_string_score_function():
    assert GateConfig(num_experts=8, top_k=2, score_function="sigmoid").score_function is SIGMOID


@pytest.mark.parametrize(
    ("hidden", "gate_weight", "bias"),
    [
        (torch.zeros(2, 3, H), torch.zeros(8, H), None),  # hidden not 2-D
        (torch.zeros(2, H), torch.zeros(8, H + 1), None),  # hidden size mismatch
        (torch.zeros(2, H), torch.zeros(7, H), None),  # wrong number of experts
        (torch.zeros(2, H), torch.zeros(8, H), torch.zeros(7)),  # bias shape
    ],
)
def test_bad_shapes_raise_value_error(hidden, gate_weight, bias):
    with pytest.raises(ValueError, match="hidden|gate_weight|correction_bias"):
        route(hidden, gate_weight, GateConfig(num_experts=8, top_k=2), correction_bias=bias)


def test_deepseek_v2_groups_are_scored_by_their_best_expert():
    # the exactness test above proves the MAX rule only if the top-2 sum would choose otherwise
    router, gate = _seeded_router("deepseek_v2", True)
    hidden = torch.randn(T, H, generator=_gen(2))
    weight = router.weight.detach()
    by_max = route(hidden, weight, gate)
    by_top2 = route(hidden, weight, dataclasses.replace(gate, group_score=GroupScore.TOP2_SUM))
    assert not torch.equal(
        _by_expert(by_max.experts, by_max.weights)[0], _by_expert(by_top2.experts, by_top2.weights)[0]
    )


def test_gpt_oss_router_bias_changes_choice():
    # the exactness test above proves the router bias only if it changes what tokens choose
    router, gate = _seeded_router("gpt_oss", True)
    hidden = torch.randn(T, H, generator=_gen(2))
    weight = router.weight.detach()
    with_bias = route(hidden, weight, gate, gate_bias=router.bias.detach())
    without = route(hidden, weight, gate)
    assert not torch.equal(
        _by_expert(with_bias.experts, with_bias.weights)[0], _by_expert(without.experts, without.weights)[0]
    )
