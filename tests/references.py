"""Plain references, written independently of moemesh's compute path.

- `dense_reference`: every token, every chosen expert, a Python loop: the obvious definition.
- `transformers_block`: the transformers sparse MoE block of the family, loaded with the source's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moemesh.experts.weights import WeightSource


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
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        config = MixtralConfig(**config_dict)
    elif family == "qwen2_moe":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block

        config = Qwen2MoeConfig(**config_dict)
    elif family == "deepseek_v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block

        config = DeepseekV3Config(**config_dict)
    else:
        raise ValueError(family)
    block = Block(config).eval()
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
