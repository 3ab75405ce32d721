"""experts/: FFN math against transformers, the expert bank, presets (config parsing and devices:
test_model_spec.py)."""

from __future__ import annotations

import pytest
import torch

from moemesh.experts.ffn import ExpertBank, UnknownExpert, activation_fn, ffn
from moemesh.experts.weights import PRESETS, FFNWeights, PresetSource, open_source, preset_config
from moemesh.protos.spec import Segment

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds  # noqa: E402
from transformers.models.mixtral import modeling_mixtral as mixtral  # noqa: E402
from transformers.models.olmoe import modeling_olmoe as olmoe  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3  # noqa: E402

# bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%); an FFN of two matmuls over H=64 and
# I=128 accumulates a few such roundings: bf16 results stay within 3% of the largest float32
# output value (0.8% seen over 50 seeds), float16 (11 bits) within 0.5% (0.12% seen).
LOW_PRECISION_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}

H, INNER, E = 16, 24, 4  # small sizes for the transformers comparisons

# family -> (transformers experts class, its config built for H, INNER, E)
TRANSFORMERS_EXPERTS = {
    "mixtral": lambda act: mixtral.MixtralExperts(
        transformers.MixtralConfig(
            hidden_size=H, intermediate_size=INNER, num_local_experts=E, hidden_act=act
        )
    ),
    "qwen2_moe": lambda act: qwen2.Qwen2MoeExperts(
        transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=INNER, num_experts=E, hidden_act=act)
    ),
    "qwen3_moe": lambda act: qwen3.Qwen3MoeExperts(
        transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INNER, num_experts=E, hidden_act=act)
    ),
    "olmoe": lambda act: olmoe.OlmoeExperts(
        transformers.OlmoeConfig(hidden_size=H, intermediate_size=INNER, num_experts=E, hidden_act=act)
    ),
    "deepseek_v3": lambda act: ds.DeepseekV3Experts(
        transformers.DeepseekV3Config(
            hidden_size=H, moe_intermediate_size=INNER, n_routed_experts=E, hidden_act=act
        )
    ),
}


def _fill(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def _unfuse(experts: torch.nn.Module, e: int) -> FFNWeights:
    """transformers 5 in-memory layout: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""
    gate, up = experts.gate_up_proj[e].detach().chunk(2, dim=0)
    return FFNWeights(gate=gate, up=up, down=experts.down_proj[e].detach())


# ---------------------------------------------------------------------------------------------
# ffn against transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(TRANSFORMERS_EXPERTS))
@pytest.mark.parametrize("act", ["silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu"])
def test_ffn_matches_transformers_experts(family, act):
    experts = TRANSFORMERS_EXPERTS[family](act)
    _fill(experts, seed=1)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(2))
    for e in range(E):
        # Route every token to expert e with weight 1: transformers then returns the bare expert FFN.
        index = torch.full((7, 1), e)
        with torch.no_grad():
            expected = experts(x, index, torch.ones(7, 1))
        got = ffn(x, _unfuse(experts, e), act)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "mlp_cls, config",
    [
        (qwen2.Qwen2MoeMLP, transformers.Qwen2MoeConfig(hidden_size=H, intermediate_size=INNER)),
        (ds.DeepseekV3MLP, transformers.DeepseekV3Config(hidden_size=H, intermediate_size=INNER)),
    ],
)
def test_ffn_matches_transformers_shared_expert_mlp(mlp_cls, config):
    mlp = mlp_cls(config)
    _fill(mlp, seed=3)
    x = torch.randn(5, H)
    w = FFNWeights(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach())
    with torch.no_grad():
        torch.testing.assert_close(ffn(x, w, "silu"), mlp(x), rtol=1e-6, atol=1e-6)


def test_unknown_activation_lists_supported():
    with pytest.raises(ValueError, match="'tanhshrink'.*silu.*gelu_new.*relu"):
        activation_fn("tanhshrink")


# ---------------------------------------------------------------------------------------------
# ExpertBank
# ---------------------------------------------------------------------------------------------

HELD = [(0, 1), (0, 2), (1, 2), (1, 7)]


@pytest.fixture(scope="module")
def source():
    return open_source("tiny-mixtral")


@pytest.fixture(scope="module")
def bank(source):
    return ExpertBank.from_source(source, HELD, torch.device("cpu"), torch.float32)


SPANS = [  # rows 4..5 and 14..15 are covered by no span; (0, 2) comes twice (two requests)
    Segment(layer=0, expert=2, start=0, count=3),
    Segment(layer=1, expert=7, start=3, count=1),
    Segment(layer=0, expert=1, start=6, count=4),
    Segment(layer=1, expert=2, start=10, count=2),
    Segment(layer=0, expert=2, start=12, count=2),
]


def _reference(source, spans, rows):
    out = torch.zeros_like(rows)
    for s in spans:
        w = source.expert(s.layer, s.expert)
        out[s.start : s.start + s.count] = ffn(rows[s.start : s.start + s.count], w, "silu")
    return out


def test_bank_holds_only_requested_experts(bank):
    assert bank.experts == sorted(HELD)
    assert bank.hidden_size == 64
    assert bank.nbytes == len(HELD) * 3 * 128 * 64 * 4  # gate_up [256, 64] + down [64, 128], float32
    assert bank.holds(1, 7) and not bank.holds(1, 6)


def test_bank_compute_equals_per_expert_ffn(source, bank):
    rows = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    got = bank.compute(SPANS, rows)
    torch.testing.assert_close(got, _reference(source, SPANS, rows), rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(got[4:6]) == 0 and torch.count_nonzero(got[14:]) == 0
    assert got.dtype == rows.dtype and got.device == rows.device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_bank_within_documented_tolerance(source, dtype):
    low = ExpertBank.from_source(source, HELD, torch.device("cpu"), dtype)
    assert low.nbytes == len(HELD) * 3 * 128 * 64 * 2
    rows = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    expected = _reference(source, SPANS, rows)
    got = low.compute(SPANS, rows)  # float32 rows in, float32 out, computed in `dtype`
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= LOW_PRECISION_TOL[dtype] * expected.abs().max()


def test_output_follows_rows_dtype(bank):
    rows = torch.randn(4, 64).to(torch.bfloat16)
    out = bank.compute([Segment(0, 1, 0, 4)], rows)
    assert out.dtype == torch.bfloat16
    out.mul_(2)  # an ordinary tensor, not an inference tensor: callers may update it in place


def test_unknown_expert_names_layer_expert_and_holdings(bank):
    with pytest.raises(UnknownExpert) as err:
        bank.compute([Segment(0, 1, 0, 1), Segment(1, 3, 1, 1)], torch.randn(2, 64))
    message = str(err.value)
    assert "layer 1 expert 3" in message
    assert "layer 0: experts 1-2; layer 1: experts 2, 7" in message
    assert isinstance(err.value, KeyError)


@pytest.mark.parametrize(
    "span, match",
    [
        (Segment(0, 1, 3, 2), r"within \[0, 4\)"),  # runs past the end
        (Segment(0, 1, -1, 2), r"within \[0, 4\)"),
        (Segment(0, 1, 0, 0), "1 or more rows"),
    ],
)
def test_bad_span_rejected(bank, span, match):
    with pytest.raises(ValueError, match=match):
        bank.compute([Segment(0, 2, 0, 1), span], torch.randn(4, 64))


def test_bad_span_rejected_before_unknown_expert_computes(bank):
    # The first span is valid and held, the second is not held: nothing is computed or returned.
    with pytest.raises(UnknownExpert):
        bank.compute([Segment(0, 1, 0, 2), Segment(5, 0, 2, 2)], torch.randn(4, 64))


def test_overlapping_spans_rejected(bank):
    with pytest.raises(ValueError, match="overlap"):
        bank.compute([Segment(0, 1, 0, 3), Segment(0, 2, 2, 2)], torch.randn(4, 64))


def test_rows_of_wrong_shape_rejected(bank):
    with pytest.raises(ValueError, match="hidden size 32"):
        bank.compute([Segment(0, 1, 0, 1)], torch.randn(2, 32))
    with pytest.raises(ValueError, match="2-D float"):
        bank.compute([Segment(0, 1, 0, 1)], torch.ones(2, 64, dtype=torch.int64))


def test_bank_needs_activation_for_every_layer(source):
    weights = {(0, 0): source.expert(0, 0), (1, 0): source.expert(1, 0)}
    with pytest.raises(ValueError, match="no activation given for layer 1"):
        ExpertBank(weights, {0: "silu"}, torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def test_preset_tensors_are_deterministic():
    a, b = PresetSource("tiny-deepseek-v3"), PresetSource("tiny-deepseek-v3")
    for x, y in zip(a.expert(2, 5).tensors(), b.expert(2, 5).tensors(), strict=True):
        assert torch.equal(x, y)
    ga, gb = a.gate(1), b.gate(1)
    assert torch.equal(ga.weight, gb.weight) and torch.equal(ga.correction_bias, gb.correction_bias)
    assert ga.correction_bias.abs().min() > 0
    assert torch.equal(ga.shared.down, gb.shared.down)


def test_preset_values_are_pinned():
    # The seeding scheme is a contract between hosts of different versions: changing it silently
    # would make experts computed on two hosts disagree.
    w = PresetSource("tiny-mixtral").expert(0, 0)
    torch.testing.assert_close(w.gate[0, :3], torch.tensor(PINNED_TINY_MIXTRAL_GATE), rtol=0, atol=1e-7)


# tiny-mixtral, model.layers.0.block_sparse_moe.experts.0.w1.weight[0, :3]
PINNED_TINY_MIXTRAL_GATE = [0.1802387684583664, -0.14185988903045654, -0.18864814937114716]


def test_preset_tensors_differ_per_name():
    s = PresetSource("tiny-mixtral")
    assert not torch.equal(s.expert(0, 0).gate, s.expert(0, 1).gate)
    assert not torch.equal(s.expert(0, 0).gate, s.expert(1, 0).gate)
    assert not torch.equal(s.expert(0, 0).gate, s.expert(0, 0).up)
    assert not torch.equal(
        s.expert(0, 0).gate[:, :64], PresetSource("medium-mixtral").expert(0, 0).gate[:128, :64]
    )


def test_host_subset_equals_full_model(source):
    full = ExpertBank.from_source(
        source, [(layer, e) for layer in (0, 1) for e in range(8)], torch.device("cpu"), torch.float32
    )
    part = ExpertBank.from_source(
        open_source("tiny-mixtral"), [(1, 7), (0, 2)], torch.device("cpu"), torch.float32
    )
    rows = torch.randn(6, 64)
    spans = [Segment(0, 2, 0, 3), Segment(1, 7, 3, 3)]
    assert torch.equal(part.compute(spans, rows), full.compute(spans, rows))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_outputs_are_order_one(name):
    s = PresetSource(name)
    layer = s.spec.layers[-1]
    x = torch.randn(32, layer.hidden_size, generator=torch.Generator().manual_seed(6))
    y = ffn(x, s.expert(layer.layer, layer.num_experts - 1), layer.activation)
    assert 0.1 < y.std().item() < 3.0
    logits = x @ s.gate(layer.layer).weight.T
    assert 0.3 < logits.std().item() < 3.0


def test_preset_specs():
    ds_spec = PresetSource("tiny-deepseek-v3").spec
    assert ds_spec.layer_indices == (1, 2)
    assert (ds_spec.layers[0].num_experts, ds_spec.layers[0].intermediate_size) == (16, 32)
    assert ds_spec.layers[0].shared_intermediate_size == 32 and not ds_spec.layers[0].shared_gated
    r = ds_spec.layers[0].gate
    assert (r.top_k, r.n_group, r.topk_group, r.routed_scaling_factor, r.has_correction_bias) == (
        4,
        4,
        2,
        2.5,
        True,
    )
    qwen = PresetSource("tiny-qwen2-moe").spec
    assert qwen.layers[0].shared_intermediate_size == 64 and qwen.layers[0].shared_gated
    assert qwen.layers[0].gate.norm_topk_prob is False
    medium = PresetSource("medium-mixtral").spec
    assert medium.layer_indices == (0, 1, 2, 3)
    assert (
        medium.layers[0].hidden_size,
        medium.layers[0].intermediate_size,
        medium.layers[0].num_experts,
    ) == (512, 1024, 16)
    assert preset_config("tiny-mixtral") is not preset_config("tiny-mixtral")
    with pytest.raises(KeyError, match="tiny-mixtral"):
        preset_config("nope")
