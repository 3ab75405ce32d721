"""experts/weights.py on real transformers checkpoints (save_pretrained), sharded and fused layouts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.experts import weights as weights_module
from moemesh.experts.ffn import ExpertBank
from moemesh.experts.model import SUPPORTED_FAMILIES, spec_from_config
from moemesh.experts.weights import (
    PRESETS,
    CheckpointSource,
    MissingTensor,
    PresetSource,
    open_source,
    preset_config,
)
from moemesh.protos.spec import Segment, UnsupportedModel
from tests import hf_configs
from tests.fakes import ReadSpy

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (model, checkpoint directory written by save_pretrained)"""
    out = {}
    for family in SUPPORTED_FAMILIES:
        model = hf_configs.causal_lm(family)
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        out[family] = (model, directory)
    return out


def _moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _assert_same_weights(model, source):
    """Every expert, gate, bias and shared expert of `source` equals the transformers model's."""
    for index in _moe_layers(model):
        mlp = model.model.layers[index].mlp
        for e in range(source.spec.layer(index).num_experts):
            w = source.expert(index, e)
            if hasattr(mlp, "router"):  # gpt-oss: [E, H, 2I] with gate/up interleaved, [E, I, H], biases
                gate_up = mlp.experts.gate_up_proj[e]
                assert torch.equal(w.gate, gate_up[:, 0::2].t()) and torch.equal(w.up, gate_up[:, 1::2].t())
                assert torch.equal(w.down, mlp.experts.down_proj[e].t())
                bias = mlp.experts.gate_up_proj_bias[e]
                assert torch.equal(w.gate_bias, bias[0::2]) and torch.equal(w.up_bias, bias[1::2])
                assert torch.equal(w.down_bias, mlp.experts.down_proj_bias[e])
                continue
            # transformers 5 in memory: gate_up_proj [E, 2I, H] = cat(gate, up), down_proj [E, H, I]
            assert torch.equal(torch.cat([w.gate, w.up]), mlp.experts.gate_up_proj[e])
            assert torch.equal(w.down, mlp.experts.down_proj[e])
        g = source.gate(index)
        router = getattr(mlp, "router", None) or mlp.gate
        assert torch.equal(g.weight, router.weight)
        if hasattr(mlp, "router"):
            assert torch.equal(g.gate_bias, mlp.router.bias)
        else:
            assert g.gate_bias is None
        if hasattr(router, "e_score_correction_bias"):
            assert torch.equal(g.correction_bias, router.e_score_correction_bias)
        else:
            assert g.correction_bias is None
        shared = getattr(mlp, "shared_experts", None) or getattr(mlp, "shared_expert", None)
        if shared is None:
            assert g.shared is None
        else:
            assert torch.equal(g.shared.gate, shared.gate_proj.weight)
            assert torch.equal(g.shared.up, shared.up_proj.weight)
            assert torch.equal(g.shared.down, shared.down_proj.weight)
        if hasattr(mlp, "shared_expert_gate"):
            assert torch.equal(g.shared_gate, mlp.shared_expert_gate.weight)
        else:
            assert g.shared_gate is None


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_spec_matches_config(saved, family):
    model, directory = saved[family]
    source = open_source(directory)
    assert isinstance(source, CheckpointSource)
    spec, cfg = source.spec, model.config
    assert spec.name == str(directory) and spec.family == family
    assert spec.layer_indices == tuple(_moe_layers(model))
    layer = spec.layers[0]
    assert layer.hidden_size == cfg.hidden_size
    assert layer.num_experts == model.model.layers[spec.layers[0].layer].mlp.experts.num_experts
    experts = model.model.layers[spec.layers[0].layer].mlp.experts
    assert layer.intermediate_size == (
        getattr(experts, "intermediate_dim", None) or experts.intermediate_size
    )
    assert spec.layers[0].gate.top_k == cfg.num_experts_per_tok


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_weights_equal_the_model(saved, family):
    model, directory = saved[family]
    _assert_same_weights(model, open_source(directory))


def test_sharded_checkpoint(saved, tmp_path):
    model, _ = saved["deepseek_v3"]
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _assert_same_weights(model, open_source(tmp_path))


def test_index_entries_stay_inside_the_checkpoint_folder(saved, tmp_path):
    model, _ = saved["mixtral"]
    inner = tmp_path / "model"
    model.save_pretrained(inner, max_shard_size="40KB")
    index_path = inner / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    (tmp_path / "outside").mkdir()
    for escape in ("../outside/x.safetensors", str(tmp_path / "outside" / "x.safetensors")):
        index["weight_map"][name] = escape
        index_path.write_text(json.dumps(index))
        with pytest.raises(ValueError, match="outside the checkpoint folder"):
            open_source(inner)


def test_deepseek_spec_fields(saved):
    spec = open_source(saved["deepseek_v3"][1]).spec
    assert spec.layer_indices == (1,)
    assert spec.layer(1).shared_intermediate_size == 16 and not spec.layer(1).shared_gated
    r = spec.layers[0].gate
    assert (r.score_function, r.n_group, r.topk_group, r.routed_scaling_factor) == ("sigmoid", 2, 1, 2.5)
    assert r.has_correction_bias and r.norm_topk_prob


def test_bank_from_checkpoint_matches_transformers_experts(saved):
    model, directory = saved["mixtral"]
    experts = model.model.layers[1].mlp.experts
    bank = ExpertBank.from_source(
        open_source(directory), [(1, 0), (1, 3)], torch.device("cpu"), torch.float32
    )
    x = torch.randn(6, model.config.hidden_size)
    with torch.no_grad():
        # Route rows 0-2 to expert 3 and rows 3-5 to expert 0, each with weight 1.
        index = torch.tensor([[3]] * 3 + [[0]] * 3)
        expected = experts(x, index, torch.ones(6, 1))
    got = bank.compute([Segment(1, 3, 0, 3), Segment(1, 0, 3, 3)], x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_reading_one_expert_reads_only_its_tensors(saved, monkeypatch):
    _, directory = saved["qwen2_moe"]
    spy = ReadSpy(weights_module.safe_open)
    monkeypatch.setattr(weights_module, "safe_open", spy)
    source = open_source(directory)
    source.expert(1, 2)
    prefix = "model.layers.1.mlp.experts.2."
    assert sorted(spy.reads) == [
        prefix + "down_proj.weight",
        prefix + "gate_proj.weight",
        prefix + "up_proj.weight",
    ]
    spy.reads.clear()
    source.gate(0)
    assert all(".experts." not in name for name in spy.reads) and len(spy.reads) == 5


def test_host_needs_only_its_own_tensors(saved, tmp_path):
    """A directory holding only expert 3 of layer 1 serves that expert; others fail naming the tensor."""
    _, directory = saved["mixtral"]
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    full = CheckpointSource(directory)
    keep = [n for n in full.tensor_names if ".layers.1.block_sparse_moe.experts.3." in n]
    assert len(keep) == 3
    tensors = load_file(directory / "model.safetensors")
    save_file({n: tensors[n] for n in keep}, tmp_path / "model.safetensors")
    part = open_source(tmp_path)
    assert torch.equal(part.expert(1, 3).down, full.expert(1, 3).down)
    with pytest.raises(MissingTensor) as err:
        part.expert(1, 2)
    assert "model.layers.1.block_sparse_moe.experts.2.w1.weight" in str(err.value)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(MissingTensor, match=r"model\.layers\.1\.block_sparse_moe\.gate\.weight"):
        part.gate(1)


def test_missing_tensor_of_a_present_expert(saved, tmp_path):
    _, directory = saved["olmoe"]
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    tensors = load_file(directory / "model.safetensors")
    keep = ["model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight"]
    save_file({n: tensors[n] for n in keep}, tmp_path / "model.safetensors")
    with pytest.raises(
        MissingTensor, match=r"'model\.layers\.0\.mlp\.experts\.1\.down_proj\.weight' is not in checkpoint"
    ):
        open_source(tmp_path).expert(0, 1)


def _write_config(directory, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "family, block", [("qwen3_moe", "mlp"), ("mixtral", "block_sparse_moe"), ("mixtral", "mlp")]
)
def test_fused_layout_reads_one_expert_slice(tmp_path, monkeypatch, family, block):
    hidden, inner, num = 8, 4, 3
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    inner_key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    _write_config(
        tmp_path,
        {
            "model_type": family,
            "hidden_size": hidden,
            inner_key: inner,
            key: num,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 1,
        },
    )
    gate_up = torch.randn(num, 2 * inner, hidden).to(torch.bfloat16)  # [E, 2I, H]: gate rows, then up rows
    down = torch.randn(num, hidden, inner).to(torch.bfloat16)  # [E, H, I]
    router = torch.randn(num, hidden)
    save_file(
        {
            f"model.layers.0.{block}.experts.gate_up_proj": gate_up,
            f"model.layers.0.{block}.experts.down_proj": down,
            f"model.layers.0.{block}.gate.weight": router,
        },
        tmp_path / "model.safetensors",
    )
    spy = ReadSpy(weights_module.safe_open)
    monkeypatch.setattr(weights_module, "safe_open", spy)
    source = open_source(tmp_path)
    w = source.expert(0, 1)
    assert w.gate.dtype == torch.bfloat16  # as stored
    assert torch.equal(w.gate, gate_up[1, :inner]) and torch.equal(w.up, gate_up[1, inner:])
    assert torch.equal(w.down, down[1])
    assert spy.reads == [
        f"model.layers.0.{block}.experts.gate_up_proj",
        f"model.layers.0.{block}.experts.down_proj",
    ]
    as_f32 = source.expert(0, 2, dtype=torch.float32)
    assert as_f32.gate.dtype == torch.float32 and torch.equal(as_f32.down, down[2].float())
    assert torch.equal(source.gate(0).weight, router)


def test_shape_disagreeing_with_config_is_rejected(tmp_path):
    _write_config(
        tmp_path,
        {
            "model_type": "olmoe",
            "hidden_size": 8,
            "intermediate_size": 4,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "num_hidden_layers": 1,
        },
    )
    names = [f"model.layers.0.mlp.experts.0.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    save_file(
        {names[0]: torch.zeros(5, 8), names[1]: torch.zeros(4, 8), names[2]: torch.zeros(8, 4)},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(
        ValueError, match=r"gate_proj\.weight' has shape \[5, 8\], the config implies \[4, 8\]"
    ):
        open_source(tmp_path).expert(0, 0)


def test_unsupported_and_missing_checkpoints(tmp_path):
    _write_config(tmp_path, {"model_type": "llama", "hidden_size": 8})
    with pytest.raises(UnsupportedModel, match="'llama'.*mixtral.*deepseek_v3"):
        open_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        open_source(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        open_source(empty)
    _write_config(empty, {"model_type": "olmoe"})
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        open_source(empty)


def test_expert_and_layer_out_of_range(saved):
    source = open_source(saved["deepseek_v3"][1])
    with pytest.raises(KeyError, match="experts 0..7, not 8"):
        source.expert(1, 8)
    with pytest.raises(KeyError, match="layer 0 .* not a MoE layer"):
        source.expert(0, 0)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_configs_build_transformers_configs(name):
    cfg = transformers.AutoConfig.for_model(**preset_config(name))
    assert spec_from_config(cfg.to_dict(), name) == PresetSource(name).spec


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_preset_loaded_into_transformers_block(name):
    """Preset weights copied into the transformers model give its MoE block output from a plain reference."""
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**preset_config(name))
    )
    source = PresetSource(name)
    layer = source.spec.layers[-1]
    mlp = model.model.layers[layer.layer].mlp
    g = source.gate(layer.layer)
    with torch.no_grad():
        mlp.gate.weight.copy_(g.weight)
        for e in range(layer.num_experts):
            w = source.expert(layer.layer, e)
            mlp.experts.gate_up_proj[e].copy_(torch.cat([w.gate, w.up]))
            mlp.experts.down_proj[e].copy_(w.down)
        if g.shared is not None:
            for proj, t in (
                ("gate_proj", g.shared.gate),
                ("up_proj", g.shared.up),
                ("down_proj", g.shared.down),
            ):
                getattr(mlp.shared_expert, proj).weight.copy_(t)
            mlp.shared_expert_gate.weight.copy_(g.shared_gate)
        x = torch.randn(1, 5, layer.hidden_size, generator=torch.Generator().manual_seed(7))
        expected = mlp(x)[0]

    # Plain reference: softmax top-k (renormalised when the config says so), sum of weighted experts.
    rows = x[0]
    probs = torch.softmax(rows @ g.weight.T, dim=-1)
    top_w, top_i = probs.topk(source.spec.layers[0].gate.top_k, dim=-1)
    if source.spec.layers[0].gate.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    bank = ExpertBank.from_source(
        source, [(layer.layer, e) for e in range(layer.num_experts)], torch.device("cpu"), torch.float32
    )
    out = torch.zeros_like(rows)
    for t in range(rows.shape[0]):
        for k in range(top_i.shape[1]):
            y = bank.compute([Segment(layer.layer, int(top_i[t, k]), 0, 1)], rows[t : t + 1])
            out[t] += top_w[t, k] * y[0]
    if g.shared is not None:
        from moemesh.experts.ffn import ffn

        out += torch.sigmoid(rows @ g.shared_gate.T) * ffn(rows, g.shared, layer.activation)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
