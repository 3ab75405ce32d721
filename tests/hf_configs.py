"""Tiny transformers MoE configs, models, blocks and routers: one builder per use, for every test.

- `config(family, **overrides)`: the family's transformers config at tiny sizes (`num_experts=`
  is accepted for every family and written to the family's own field);
- `causal_lm(family, seed=0, **overrides)`: the whole model, seeded, every weight filled, a
  non-zero DeepSeek-V3 selection bias (as trained checkpoints have), in eval mode;
- `moe_block(family, config)` / `router(family, config)`: the family's sparse MoE block and its
  top-k router module.

transformers is imported on first use, so that importing this module costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

# Sizes every family shares: small enough for a 2-core machine, big enough for 2 MoE layers.
TINY: dict[str, Any] = {
    "vocab_size": 128,
    "max_position_embeddings": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@dataclass(frozen=True)
class Family:
    """Where transformers keeps one MoE family, and its tiny sizes on top of TINY."""

    config_class: str
    block_class: str
    router_class: str
    experts_key: str  # the config field that holds the number of routed experts
    sizes: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        "MixtralConfig",
        "MixtralSparseMoeBlock",
        "MixtralTopKRouter",
        "num_local_experts",
        dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
    ),
    "qwen2_moe": Family(
        "Qwen2MoeConfig",
        "Qwen2MoeSparseMoeBlock",
        "Qwen2MoeTopKRouter",
        "num_experts",
        dict(
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": Family(
        "Qwen3MoeConfig",
        "Qwen3MoeSparseMoeBlock",
        "Qwen3MoeTopKRouter",
        "num_experts",
        dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    ),
    "olmoe": Family(
        "OlmoeConfig",
        "OlmoeSparseMoeBlock",
        "OlmoeTopKRouter",
        "num_experts",
        dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    ),
    "deepseek_v3": Family(
        "DeepseekV3Config",
        "DeepseekV3MoE",
        "DeepseekV3TopkRouter",
        "n_routed_experts",
        {
            # experts: 8 in 2 groups, tokens pick 2 experts from the best group; layer 0 is dense
            **dict(intermediate_size=64, moe_intermediate_size=16, first_k_dense_replace=1),
            **dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2),
            # multi-head latent attention at tiny sizes
            **dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16),
            **dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        },
    ),
    "glm4_moe": Family(
        "Glm4MoeConfig",
        "Glm4MoeMoE",
        "Glm4MoeTopkRouter",
        "n_routed_experts",
        {
            # DeepSeek-V3's router: 8 experts in 2 groups, 2 picked from the best group; layer 0 dense
            **dict(intermediate_size=64, moe_intermediate_size=16, first_k_dense_replace=1),
            **dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2),
            **dict(routed_scaling_factor=1.5, n_shared_experts=2),
        },
    ),
    "deepseek_v2": Family(
        "DeepseekV2Config",
        "DeepseekV2Moe",
        "DeepseekV2TopkRouter",
        "n_routed_experts",
        {
            # 8 experts in 4 groups, 3 picked from the 2 groups with the best expert; layer 0 dense
            **dict(intermediate_size=64, moe_intermediate_size=16, first_k_dense_replace=1),
            **dict(n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy"),
            **dict(n_group=4, topk_group=2, routed_scaling_factor=1.5, n_shared_experts=2),
            # multi-head latent attention at tiny sizes
            **dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16),
            **dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        },
    ),
    "gpt_oss": Family(
        "GptOssConfig",
        "GptOssMLP",
        "GptOssTopKRouter",
        "num_local_experts",
        dict(intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, head_dim=8),
    ),
}


def _modeling(family: str):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def config(family: str, num_experts: int | None = None, **overrides: Any):
    """The family's transformers config: TINY, then the family's sizes, then `overrides`."""
    import transformers

    spec = FAMILIES[family]
    fields = {**TINY, **spec.sizes, **overrides}
    if num_experts is not None:
        fields[spec.experts_key] = num_experts
    return getattr(transformers, spec.config_class)(**fields)


def causal_lm(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The tiny causal LM of the family, seeded, in eval mode.

    transformers 5 leaves some expert tensors uninitialised, so every matrix is filled here; the
    DeepSeek-V3 selection bias (zeros at init) gets small non-zero values so that it matters.
    """
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
            elif name.endswith(("_proj_bias", "router.bias")):  # gpt-oss biases: non-zero, so they count
                p.uniform_(-0.05, 0.05)
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return model


def moe_block(family: str, cfg) -> torch.nn.Module:
    """The family's sparse MoE block built from `cfg` (a config of the family), in eval mode."""
    return getattr(_modeling(family), FAMILIES[family].block_class)(cfg).eval()


def router(family: str, cfg) -> torch.nn.Module:
    """The family's top-k router module built from `cfg`: forward(hidden [T, H]) returns
    (logits [T, E], weights [T, K], experts [T, K])."""
    return getattr(_modeling(family), FAMILIES[family].router_class)(cfg)
