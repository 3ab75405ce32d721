"""Whole transformers MoE models with their experts on the mesh give the local model's outputs."""

from __future__ import annotations

import pytest
import torch

from moemesh.client.remote import RemoteMoE
from moemesh.deploy.offload import offload_experts
from tests import hf_configs

pytestmark = pytest.mark.integration

pytest.importorskip("transformers")


# DeepSeek-V3's first layer is dense: three layers give it two MoE layers, as the others have.
MODELS = {"mixtral": {}, "qwen2_moe": {}, "deepseek_v3": {"num_hidden_layers": 3}}


@pytest.mark.parametrize("family", list(MODELS))
def test_logits_equal_local_model(family):
    model = hf_configs.causal_lm(family, **MODELS[family])
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        local = model(ids).logits
    with offload_experts(model, num_hosts=3, device="cpu") as remote:
        assert all(isinstance(model.model.layers[i].mlp, RemoteMoE) for i in remote.layers)
        with torch.no_grad():
            meshed = model(ids).logits
    assert (meshed - local).abs().max().item() <= 1e-4


def test_mixtral_greedy_generate_same_tokens():
    model = hf_configs.causal_lm("mixtral")
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        local = model.generate(prompt, **kwargs)
    with offload_experts(model, num_hosts=3, device="cpu"):
        with torch.no_grad():
            meshed = model.generate(prompt, **kwargs)
    assert torch.equal(meshed, local)
    assert meshed.shape[1] == prompt.shape[1] + 12
