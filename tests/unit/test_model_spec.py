"""experts/model.py and device.py: transformers config parsing (against transformers' own config
classes and decoder layers), devices and dtype names."""

from __future__ import annotations

import pytest
import torch

from moemesh.experts.device import resolve_device
from moemesh.experts.model import SUPPORTED_FAMILIES, spec_from_config
from moemesh.experts.weights import PresetSource
from moemesh.protos.spec import GateConfig, UnsupportedModel, dtype_name, parse_dtype

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------------------------------------
# Config parsing
# ---------------------------------------------------------------------------------------------

CONFIG_CLASSES = {
    "mixtral": transformers.MixtralConfig,
    "qwen2_moe": transformers.Qwen2MoeConfig,
    "qwen3_moe": transformers.Qwen3MoeConfig,
    "olmoe": transformers.OlmoeConfig,
    "deepseek_v3": transformers.DeepseekV3Config,
    "glm4_moe": transformers.Glm4MoeConfig,
    "deepseek_v2": transformers.DeepseekV2Config,
    "gpt_oss": transformers.GptOssConfig,
}
# Keys whose transformers default (None) is no usable MoE config: given in both dicts.
REQUIRED = {"deepseek_v2": {"num_experts_per_tok": 6}}


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_missing_keys_take_transformers_defaults(family):
    # A config.json with only model_type parses like the full dict transformers writes for its defaults.
    required = REQUIRED.get(family, {})
    from_defaults = spec_from_config({**CONFIG_CLASSES[family]().to_dict(), **required}, "m")
    assert spec_from_config({"model_type": family, **required}, "m") == from_defaults


def test_mixtral_spec():
    spec = spec_from_config(
        {
            "model_type": "mixtral",
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_local_experts": 6,
            "num_experts_per_tok": 3,
            "num_hidden_layers": 3,
            "hidden_act": "gelu",
        },
        "m",
    )
    assert spec.family == "mixtral" and spec.layer_indices == (0, 1, 2)
    assert spec.layer(2).activation == "gelu"
    assert (spec.layer(1).hidden_size, spec.layer(1).intermediate_size, spec.layer(1).num_experts) == (
        32,
        48,
        6,
    )
    assert (
        spec.layers[0].gate.score_function == "softmax"
        and spec.layers[0].gate.top_k == 3
        and spec.layers[0].gate.norm_topk_prob
    )
    assert spec.layer(0).shared_intermediate_size == 0


def test_qwen2_moe_spec_layer_rule_and_shared_expert():
    spec = spec_from_config(
        {
            "model_type": "qwen2_moe",
            "num_hidden_layers": 8,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [3],
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 40,
            "norm_topk_prob": True,
        },
        "q",
    )
    assert spec.layer_indices == (1, 5, 7)  # (idx + 1) % 2 == 0, minus mlp-only layer 3
    assert spec.layer(5).shared_intermediate_size == 40 and spec.layer(5).shared_gated
    assert spec.layers[0].gate.norm_topk_prob is True


def test_qwen3_moe_and_olmoe_specs():
    q3 = spec_from_config(
        {
            "model_type": "qwen3_moe",
            "num_hidden_layers": 4,
            "mlp_only_layers": [0],
            "num_experts": 16,
            "moe_intermediate_size": 8,
            "num_experts_per_tok": 4,
        },
        "q3",
    )
    assert q3.layer_indices == (1, 2, 3) and q3.layer(1).num_experts == 16
    assert q3.layer(1).shared_intermediate_size == 0 and not q3.layer(1).gate.norm_topk_prob
    # transformers 5 writes the attribute_map spelling for Qwen3-MoE
    alias = spec_from_config(
        {"model_type": "qwen3_moe", "num_local_experts": 12, "num_experts_per_tok": 2}, "q3"
    )
    assert alias.layers[0].num_experts == 12
    ol = spec_from_config(
        {
            "model_type": "olmoe",
            "num_hidden_layers": 2,
            "num_experts": 8,
            "intermediate_size": 24,
            "norm_topk_prob": True,
            "num_experts_per_tok": 2,
        },
        "o",
    )
    assert (
        ol.layer_indices == (0, 1) and ol.layer(0).intermediate_size == 24 and ol.layer(0).gate.norm_topk_prob
    )


def test_deepseek_v3_spec():
    spec = spec_from_config(
        {
            "model_type": "deepseek_v3",
            "num_hidden_layers": 7,
            "first_k_dense_replace": 2,
            "moe_layer_freq": 2,
            "n_routed_experts": 32,
            "moe_intermediate_size": 16,
            "n_shared_experts": 2,
            "n_group": 4,
            "topk_group": 2,
            "num_experts_per_tok": 6,
            "routed_scaling_factor": 1.5,
            "norm_topk_prob": False,
        },
        "d",
    )
    assert spec.layer_indices == (2, 4, 6)
    assert spec.layer(4).shared_intermediate_size == 32 and not spec.layer(4).shared_gated
    assert spec.layers[0].gate == GateConfig(
        num_experts=spec.layers[0].num_experts,
        score_function="sigmoid",
        top_k=6,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        n_group=4,
        topk_group=2,
        has_correction_bias=True,
    )


@pytest.mark.parametrize(
    "family, config",
    [
        (
            "qwen2_moe",
            {
                "num_hidden_layers": 6,
                "decoder_sparse_step": 2,
                "mlp_only_layers": [3],
                "shared_expert_intermediate_size": 8,
            },
        ),
        ("qwen3_moe", {"num_hidden_layers": 4, "mlp_only_layers": [0, 2]}),
        (
            "deepseek_v3",
            {
                "num_hidden_layers": 4,
                "first_k_dense_replace": 2,
                "n_group": 2,
                "topk_group": 1,
                "q_lora_rank": None,
                "kv_lora_rank": 8,
                "qk_rope_head_dim": 4,
                "qk_nope_head_dim": 4,
                "v_head_dim": 4,
                "n_routed_experts": 4,
            },
        ),
    ],
)
def test_sparse_layers_match_transformers_model(family, config):
    base = {
        "vocab_size": 16,
        "hidden_size": 16,
        "intermediate_size": 16,
        "moe_intermediate_size": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    }
    cfg = CONFIG_CLASSES[family](**{**base, **config})
    model = transformers.AutoModel.from_config(cfg)
    sparse = tuple(i for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "experts"))
    assert spec_from_config(cfg.to_dict(), family).layer_indices == sparse


def test_layer_of_dense_layer_is_key_error():
    spec = PresetSource("tiny-deepseek-v3").spec
    with pytest.raises(KeyError, match=r"layer 0 .* not a MoE layer; MoE layers are \[1, 2\]"):
        spec.layer(0)


def test_unsupported_model_lists_families():
    with pytest.raises(UnsupportedModel) as err:
        spec_from_config({"model_type": "llama"}, "some/dir")
    assert "'llama'" in str(err.value)
    for family in SUPPORTED_FAMILIES:
        assert family in str(err.value)
    with pytest.raises(UnsupportedModel, match="model_type None"):
        spec_from_config({}, "x")


def test_invalid_configs_name_the_key():
    with pytest.raises(ValueError, match=r"top_k=9 must be in 1..8.*num_experts_per_tok"):
        spec_from_config({"model_type": "mixtral", "num_experts_per_tok": 9}, "m")
    with pytest.raises(ValueError, match="n_group=3"):
        spec_from_config({"model_type": "deepseek_v3", "n_routed_experts": 16, "n_group": 3}, "d")
    with pytest.raises(ValueError, match="'hidden_size'"):
        spec_from_config({"model_type": "olmoe", "hidden_size": 0}, "o")
    with pytest.raises(UnsupportedModel, match="hidden_act 'tanh'"):
        spec_from_config({"model_type": "mixtral", "hidden_act": "tanh"}, "m")


# ---------------------------------------------------------------------------------------------
# Devices and dtypes
# ---------------------------------------------------------------------------------------------


def test_resolve_device():
    auto = resolve_device(None)
    assert resolve_device("auto") == auto
    if not torch.cuda.is_available():
        assert auto.type in ("xpu", "mps", "cpu")
        with pytest.raises(ValueError, match="'cuda:0' is not available here"):
            resolve_device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu-please' is not a device name"):
        resolve_device("gpu-please")


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float16", torch.float16),
        ("FP16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
    ],
)
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) is dtype
    assert parse_dtype(dtype_name(dtype)) is dtype


def test_bad_dtype_names():
    with pytest.raises(ValueError, match="'int8'.*bfloat16"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="float64"):
        dtype_name(torch.float64)
    assert dtype_name(torch.bfloat16) == "bfloat16"
