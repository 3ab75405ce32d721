"""The presets: transformers-style `config.json` dicts of small models with seeded random weights
(`weights.PresetSource` makes the weights), for demos, tests and benchmarks; nothing is downloaded.
Each is complete enough to build the matching transformers model, e.g.
`MixtralConfig(**preset_config("tiny-mixtral"))`."""

from __future__ import annotations

import copy
from typing import Any

PRESETS: tuple[str, ...] = (
    "tiny-mixtral",
    "medium-mixtral",
    "bench-mixtral",
    "tiny-deepseek-v3",
    "tiny-qwen2-moe",
)

_PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-mixtral": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "medium-mixtral": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 1024,
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "num_local_experts": 16,
        "num_experts_per_tok": 2,
    },
    # One MoE layer at the size `moemesh bench` measures (issue 8): Mixtral layout, 8 experts, top-2.
    "bench-mixtral": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 1024,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "tiny-deepseek-v3": {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,  # dense MLP of layer 0
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "hidden_act": "silu",
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
    },
    "tiny-qwen2-moe": {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,  # dense MLP of mlp_only_layers (none here)
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
}


def preset_config(name: str) -> dict[str, Any]:
    """The transformers-style config dict of preset `name` (a fresh copy)."""
    if name not in _PRESET_CONFIGS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(_PRESET_CONFIGS[name])
