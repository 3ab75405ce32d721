"""Whole transformers MoE models with their experts on the mesh give the local model's outputs."""

from __future__ import annotations

import pytest
import torch

from moemesh.deploy.offload import offload_experts
from moemesh.client.remote import RemoteMoE

pytestmark = pytest.mark.integration

transformers = pytest.importorskip("transformers")


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    return transformers.MixtralForCausalLM(config)


def _qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        max_position_embeddings=128,
    )
    return transformers.Qwen2MoeForCausalLM(config)


def _deepseek_v3():
    config = transformers.DeepseekV3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=128,
    )
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():  # a non-zero selection bias, as trained checkpoints have
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return model


def _seeded(factory):
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():  # transformers 5 leaves some expert tensors uninitialised: fill all
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize(
    "factory", [_mixtral, _qwen2_moe, _deepseek_v3], ids=["mixtral", "qwen2_moe", "deepseek_v3"]
)
def test_logits_equal_local_model(factory):
    model = _seeded(factory)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        local = model(ids).logits
    with offload_experts(model, num_hosts=3, device="cpu") as remote:
        assert all(isinstance(model.model.layers[i].mlp, RemoteMoE) for i in remote.layers)
        with torch.no_grad():
            meshed = model(ids).logits
    assert (meshed - local).abs().max().item() <= 1e-4


def test_mixtral_greedy_generate_same_tokens():
    model = _seeded(_mixtral)
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        local = model.generate(prompt, **kwargs)
    with offload_experts(model, num_hosts=3, device="cpu"):
        with torch.no_grad():
            meshed = model.generate(prompt, **kwargs)
    assert torch.equal(meshed, local)
    assert meshed.shape[1] == prompt.shape[1] + 12
