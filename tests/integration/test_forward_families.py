"""`Forward` for the families whose gates the router runs beyond the presets: a tiny seeded
transformers model, `save_pretrained`, a 3-host mesh on that checkpoint; `Client.forward` on every
sparse layer equals the model's own transformers sparse block (gate, experts, shared experts)."""

from __future__ import annotations

import pytest
import torch

from moemesh.client import Client
from moemesh.deploy.local import EmbeddedMesh, MeshConfig
from moemesh.experts.weights import open_source
from tests import hf_configs

pytestmark = pytest.mark.integration

pytest.importorskip("transformers")

# family -> config overrides: three layers give the families with a dense first layer two MoE layers
FAMILIES = {"glm4_moe": {"num_hidden_layers": 3}, "deepseek_v2": {"num_hidden_layers": 3}, "gpt_oss": {}}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_equals_the_transformers_block(family, tmp_path):
    model = hf_configs.causal_lm(family, **FAMILIES[family])
    model.save_pretrained(tmp_path)
    spec = open_source(tmp_path).spec
    blocks = model.model.layers
    assert spec.family == family and spec.layer_indices == tuple(
        i
        for i, layer in enumerate(blocks)
        if type(layer.mlp).__name__ == hf_configs.FAMILIES[family].block_class
    )
    with (
        EmbeddedMesh(MeshConfig(str(tmp_path), num_hosts=3, device="cpu")) as mesh,
        Client(mesh.address) as client,
    ):
        for index in spec.layer_indices:
            hidden = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(index))
            out = client.forward(hidden, layer=index)
            with torch.no_grad():
                expected = blocks[index].mlp(hidden.unsqueeze(0))
            if isinstance(expected, tuple):  # gpt-oss's block returns (hidden, router scores)
                expected = expected[0]
            expected = expected.squeeze(0)
            assert (out - expected).abs().max().item() <= 1e-5
