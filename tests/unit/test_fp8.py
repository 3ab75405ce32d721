"""FP8 block-quantized checkpoints (DeepSeek-V3 / GLM `weight_scale_inv` layout), dequantized on read.

The checkpoint is written here: a tiny transformers DeepseekV3ForCausalLM saved with
`save_pretrained`, then every routed and shared expert projection quantized to float8_e4m3fn with
one float32 scale per [8, 12] block (hidden 32, expert width 16: partial blocks on both axes).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.experts import fp8
from moemesh.experts import weights as weights_module
from moemesh.experts.ffn import ExpertBank
from moemesh.experts.weights import CheckpointSource
from moemesh.protos.spec import Segment
from tests import hf_configs
from tests.fakes import ReadSpy

transformers = pytest.importorskip("transformers")

BLOCK = (8, 12)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# float8_e4m3fn keeps 3 mantissa bits: rounding a normal value x moves it by at most 2**-4 * |x|;
# a subnormal (|x| < 2**-6) by at most half its spacing 2**-9. With x = w / s per block, the
# dequantized weight is within 2**-4 * |w| + 2**-10 * s of w (plus float32 rounding, ~1e-7 * |w|).
REL_BOUND, SUBNORMAL_BOUND = 2.0**-4, 2.0**-10
_QUANTIZED = re.compile(r"\.mlp\.(experts\.\d+|shared_experts)\.(gate|up|down)_proj\.weight$")


def _blocks(rows: int, cols: int):
    for i in range(math.ceil(rows / BLOCK[0])):
        for j in range(math.ceil(cols / BLOCK[1])):
            yield i, j, slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1])


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn [out, in] and float32 scale_inv [ceil(out/8), ceil(in/12)], per block amax/448."""
    rows, cols = w.shape
    scale = torch.zeros(math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1]))
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i, j, r, c in _blocks(rows, cols):
        scale[i, j] = w[r, c].abs().amax().float() / FP8_MAX
        q[r, c] = (w[r, c].float() / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def _reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dequantized weight, block by block (independent of experts/fp8.py)."""
    out = torch.empty(q.shape)
    for i, j, r, c in _blocks(*q.shape):
        out[r, c] = q[r, c].float() * scale[i, j]
    return out


def _scale_per_element(scale: torch.Tensor, shape) -> torch.Tensor:
    out = torch.empty(shape)
    for i, j, r, c in _blocks(*shape):
        out[r, c] = scale[i, j]
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(original tensors, FP8 dir, dequantized-reference dir, {name: (q, scale)})"""
    model = hf_configs.causal_lm("deepseek_v3")
    fp8_dir = tmp_path_factory.mktemp("fp8")
    model.save_pretrained(fp8_dir)
    original = load_file(fp8_dir / "model.safetensors")
    quantized, fp8_tensors, deq_tensors = {}, {}, {}
    for name, w in original.items():
        if _QUANTIZED.search(name):
            q, s = quantized[name] = _quantize(w)
            fp8_tensors[name], fp8_tensors[fp8.scale_name(name)] = q, s
            deq_tensors[name] = _reference(q, s)
        else:
            fp8_tensors[name] = deq_tensors[name] = w
    assert len(quantized) == 1 * (8 + 1) * 3  # one MoE layer: 8 experts + the shared one, 3 projs
    save_file(fp8_tensors, fp8_dir / "model.safetensors")
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (fp8_dir / "config.json").write_text(json.dumps(config))
    deq_dir = tmp_path_factory.mktemp("dequantized")
    model.save_pretrained(deq_dir)
    save_file(deq_tensors, deq_dir / "model.safetensors")
    return original, fp8_dir, deq_dir, quantized


def test_experts_equal_the_dequantized_reference_and_near_the_original(checkpoints):
    original, fp8_dir, _, quantized = checkpoints
    source = CheckpointSource(fp8_dir)
    layer = source.spec.layer_indices[0]
    prefix = f"model.layers.{layer}.mlp"

    def check(name: str, got: torch.Tensor):
        q, scale = quantized[name]
        assert got.dtype == torch.float32 and torch.equal(got, _reference(q, scale))
        w = original[name].float()
        bound = REL_BOUND * w.abs() + SUBNORMAL_BOUND * _scale_per_element(scale, w.shape) + 1e-7 * w.abs()
        assert ((got - w).abs() <= bound).all(), name
        assert not torch.equal(got, w)  # the quantization did something

    for e in range(source.spec.layer(layer).num_experts):
        w = source.expert(layer, e)
        for proj, got in (("gate", w.gate), ("up", w.up), ("down", w.down)):
            check(f"{prefix}.experts.{e}.{proj}_proj.weight", got)
    g = source.gate(layer)
    for proj, got in (("gate", g.shared.gate), ("up", g.shared.up), ("down", g.shared.down)):
        check(f"{prefix}.shared_experts.{proj}_proj.weight", got)
    # the router's tensors are not quantized: as stored
    assert torch.equal(g.weight, original[f"{prefix}.gate.weight"])
    assert torch.equal(g.correction_bias, original[f"{prefix}.gate.e_score_correction_bias"])
    # another dtype on request: the dequantized float32, converted
    bf16 = source.expert(layer, 3, dtype=torch.bfloat16)
    assert bf16.up.dtype == torch.bfloat16
    assert torch.equal(bf16.up, source.expert(layer, 3).up.to(torch.bfloat16))


def test_reading_one_fp8_expert_reads_its_tensors_and_their_scales(checkpoints, monkeypatch):
    _, fp8_dir, _, _ = checkpoints
    spy = ReadSpy(weights_module.safe_open)
    monkeypatch.setattr(weights_module, "safe_open", spy)
    source = CheckpointSource(fp8_dir)
    source.expert(1, 5)
    names = [f"model.layers.1.mlp.experts.5.{p}_proj.weight" for p in ("down", "gate", "up")]
    assert sorted(spy.reads) == sorted(names + [fp8.scale_name(n) for n in names])


def test_bank_from_fp8_checkpoint_equals_bank_from_dequantized_weights(checkpoints):
    _, fp8_dir, deq_dir, _ = checkpoints
    experts, cpu = [(1, 0), (1, 3), (1, 7)], torch.device("cpu")
    banks = [
        ExpertBank.from_source(CheckpointSource(d), experts, cpu, torch.float32) for d in (fp8_dir, deq_dir)
    ]
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(0))
    segments = [Segment(1, 3, 0, 4), Segment(1, 0, 4, 3), Segment(1, 7, 7, 2)]
    got, expected = (bank.compute(segments, x) for bank in banks)
    assert got.abs().sum() > 0 and torch.equal(got, expected)


def test_fused_fp8_experts_are_dequantized_per_expert(checkpoints, tmp_path):
    """Fused [E, 2I, H] / [E, H, I] FP8 tensors with [E, blocks, blocks] scales: one expert's row."""
    _, fp8_dir, deq_dir, _ = checkpoints
    tensors = load_file(fp8_dir / "model.safetensors")
    deq = CheckpointSource(deq_dir)
    prefix, num = "model.layers.1.mlp.experts", 8
    fused = {"gate_up_proj": [], "down_proj": []}
    for e in range(num):
        w = deq.expert(1, e)
        fused["gate_up_proj"].append(torch.cat([w.gate, w.up]))
        fused["down_proj"].append(w.down)
    out = {n: t for n, t in tensors.items() if not n.startswith(prefix + ".")}
    for proj, ws in fused.items():
        pairs = [_quantize(w) for w in ws]
        out[f"{prefix}.{proj}"] = torch.stack([q for q, _ in pairs])
        out[fp8.scale_name(f"{prefix}.{proj}")] = torch.stack([s for _, s in pairs])
        fused[proj] = [_reference(q, s) for q, s in pairs]
    save_file(out, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((fp8_dir / "config.json").read_bytes())
    source = CheckpointSource(tmp_path)
    for e in (0, 6):
        w = source.expert(1, e)
        assert torch.equal(torch.cat([w.gate, w.up]), fused["gate_up_proj"][e])
        assert torch.equal(w.down, fused["down_proj"][e])


def test_fp8_tensor_without_its_scale_is_rejected_naming_it(checkpoints, tmp_path):
    _, fp8_dir, _, _ = checkpoints
    tensors = load_file(fp8_dir / "model.safetensors")
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    del tensors[fp8.scale_name(name)]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((fp8_dir / "config.json").read_bytes())
    source = CheckpointSource(tmp_path)
    with pytest.raises(fp8.MissingScale, match=re.escape(f"{name!r} is torch.float8_e4m3fn")) as info:
        source.expert(1, 2)
    assert fp8.scale_name(name) in str(info.value)
    source.expert(1, 1)  # the other experts still load


def test_scales_of_the_wrong_shape_and_block_size_defaults():
    w = torch.zeros(20, 30, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"needs scales \[3, 3\]"):
        fp8.dequantize_blocks(w, torch.ones(2, 3), (8, 12), "x.weight")
    assert fp8.dequantize_blocks(w, torch.ones(3, 3), (8, 12)).shape == (20, 30)
    assert fp8.block_size({}) == fp8.block_size({"quantization_config": {}}) == (128, 128)
    assert fp8.block_size({"quantization_config": {"weight_block_size": [16, 16]}}) == (16, 16)
    with pytest.raises(ValueError, match="weight_block_size"):
        fp8.block_size({"quantization_config": {"weight_block_size": [0, 16]}})
