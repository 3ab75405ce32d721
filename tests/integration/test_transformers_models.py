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


def test_offload_gives_the_model_back_and_can_offload_again():
    from moemesh.client import ClientClosedError, MoeMeshError, UnsupportedModel

    model = hf_configs.causal_lm("mixtral")
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    blocks = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        local = model(ids).logits
    for _ in range(2):  # offloaded, given back, offloaded again
        with offload_experts(model, num_hosts=2, device="cpu") as remote:
            remote_block = model.model.layers[0].mlp
            with torch.no_grad():
                assert (model(ids).logits - local).abs().max().item() <= 1e-4
        assert [layer.mlp for layer in model.model.layers] == blocks  # the model's own blocks are back
        with torch.no_grad():
            assert torch.equal(model(ids).logits, local)  # and it runs locally again
    with pytest.raises(ClientClosedError) as closed:  # a RemoteMoE kept past the mesh's life
        remote_block(torch.zeros(1, 2, model.config.hidden_size))
    assert isinstance(closed.value, MoeMeshError) and remote.client.closed
    with pytest.raises(UnsupportedModel, match="model_type"):
        offload_experts(
            type(
                "NotMoE", (), {"config": type("C", (), {"to_dict": lambda self: {"model_type": "llama"}})()}
            )()
        )
