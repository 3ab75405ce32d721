"""Where expert and gate weights come from: seeded presets or a safetensors checkpoint directory.

An expert host asks only for its own experts, the router only for gates and shared experts, so
neither ever materialises the whole model.

- Presets ("tiny-mixtral", ...) are transformers-style config dicts (`preset_config`) parsed by
  the same `spec_from_config` as real checkpoints, with seeded random weights: every tensor has
  its own generator, seeded from a stable hash of (preset, tensor name), so a host that generates
  only its experts gets bit-identical values to one that generates the whole model.
- Checkpoints are directories with `config.json` and `*.safetensors` (one file, or shards listed
  in `model.safetensors.index.json`) in the layout `save_pretrained` writes: one tensor per
  expert projection. The fused layout (`experts.gate_up_proj: [E, 2I, H]`,
  `experts.down_proj: [E, H, I]`) is read too, slicing out one expert without reading the rest.
- A directory with a `moemesh.json` (experts/model.py) is read by its description instead: each
  layer names its fused tensors (`{prefix}.gate_up_proj` or `.up_proj`, `.down_proj`, `_bias`
  variants) and their layout (interleaved gate/up, transposed), undone per expert on read.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from moemesh.protos.spec import ModelSpec

from . import fp8
from .model import DESCRIPTION_FILE, spec_from_config, spec_from_description
from .presets import PRESETS, preset_config


@dataclass(frozen=True)
class FFNWeights:
    """One expert FFN: out = down(glu(gate(x), up(x))), or down(act(up(x))) when `gate` is None.

    gate: [intermediate, hidden] or None; up: [intermediate, hidden]; down: [hidden, intermediate];
    biases (experts with `ExpertFFN.bias`): gate_bias / up_bias [intermediate], down_bias [hidden].
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that are present."""
        return [
            t
            for t in (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)
            if t is not None
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FFNWeights:
        """The same weights on `device` / in `dtype` (no copy where nothing changes)."""
        return FFNWeights(
            *(
                None if t is None else t.to(device=device, dtype=dtype)
                for t in (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)
            )
        )


@dataclass(frozen=True)
class GateWeights:
    """What the router needs for one layer.

    weight: [experts, hidden]; correction_bias: [experts] (DeepSeek-V3) or None;
    gate_bias: [experts], added to the logits (gpt-oss), or None;
    shared: the shared expert FFN (DeepSeek: all shared experts fused, as transformers does) or None;
    shared_gate: [1, hidden] (Qwen2-MoE) or None
    """

    weight: torch.Tensor
    correction_bias: torch.Tensor | None = None
    shared: FFNWeights | None = None
    shared_gate: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None


class WeightSource(Protocol):
    """Reads weights on demand, float32 on CPU unless the source stores another dtype.

    The sources here (`PresetSource`, `CheckpointSource`) also take an optional keyword
    `dtype=` on both methods to convert on read.
    """

    spec: ModelSpec

    def expert(self, layer: int, expert: int) -> FFNWeights: ...

    def gate(self, layer: int) -> GateWeights: ...


class MissingTensor(LookupError):
    """A checkpoint lacks a tensor the model's config says it must have; the message names both."""


# --------------------------------------------------------------------------------------------
# Tensor names (transformers on-disk layout)
# --------------------------------------------------------------------------------------------

# Module prefixes of a sparse block. Mixtral checkpoints use `block_sparse_moe`; transformers 5
# names the same module `mlp` in memory, so a fused checkpoint saved from memory may use either.
_BLOCK_PREFIXES: dict[str, tuple[str, ...]] = {
    "mixtral": ("model.layers.{layer}.block_sparse_moe", "model.layers.{layer}.mlp"),
    "qwen2_moe": ("model.layers.{layer}.mlp",),
    "qwen3_moe": ("model.layers.{layer}.mlp",),
    "olmoe": ("model.layers.{layer}.mlp",),
    "deepseek_v3": ("model.layers.{layer}.mlp",),
    "glm4_moe": ("model.layers.{layer}.mlp",),
    "deepseek_v2": ("model.layers.{layer}.mlp",),
    "gpt_oss": ("model.layers.{layer}.mlp",),
}

# Per-expert projection names (gate, up, down) under `{block}.experts.{expert}`.
_EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_EXPERT_PROJ = ("w1", "w3", "w2")


def _expert_names(family: str, layer: int, expert: int) -> list[tuple[str, str, str]]:
    """Candidate (gate, up, down) names of one expert, preferred layout first."""
    out = []
    for prefix in _BLOCK_PREFIXES[family]:
        block = prefix.format(layer=layer)
        projs = _MIXTRAL_EXPERT_PROJ if block.endswith("block_sparse_moe") else _EXPERT_PROJ
        out.append(tuple(f"{block}.experts.{expert}.{p}.weight" for p in projs))
    return out


def _fused_names(family: str, layer: int) -> list[tuple[str, str]]:
    """Candidate (gate_up_proj [E, 2I, H], down_proj [E, H, I]) names of one layer's experts."""
    return [
        (
            f"{prefix.format(layer=layer)}.experts.gate_up_proj",
            f"{prefix.format(layer=layer)}.experts.down_proj",
        )
        for prefix in _BLOCK_PREFIXES[family]
    ]


def _gate_names(family: str, layer: int) -> dict[str, str]:
    """Names of the router-side tensors of one layer (only those the family has)."""
    block = _BLOCK_PREFIXES[family][0].format(layer=layer)
    names = {"weight": f"{block}.gate.weight"}
    if family == "gpt_oss":  # GptOssMLP.router: a Linear with a bias
        names = {"weight": f"{block}.router.weight", "gate_bias": f"{block}.router.bias"}
    if family in ("deepseek_v3", "glm4_moe"):
        names["correction_bias"] = f"{block}.gate.e_score_correction_bias"
    if family in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        for p, proj in zip(("shared.gate", "shared.up", "shared.down"), _EXPERT_PROJ, strict=True):
            names[p] = f"{block}.shared_experts.{proj}.weight"
    if family == "qwen2_moe":
        for p, proj in zip(("shared.gate", "shared.up", "shared.down"), _EXPERT_PROJ, strict=True):
            names[p] = f"{block}.shared_expert.{proj}.weight"
        names["shared_gate"] = f"{block}.shared_expert_gate.weight"
    return names


def _check_shape(name: str, tensor: torch.Tensor | tuple[int, ...], expected: tuple[int, ...], where: str):
    shape = tuple(tensor.shape if isinstance(tensor, torch.Tensor) else tensor)
    if shape != expected:
        raise ValueError(
            f"{where}: tensor {name!r} has shape {list(shape)}, the config implies {list(expected)}"
        )


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _check_expert(spec: ModelSpec, layer: int, expert: int) -> None:
    num = spec.layer(layer).num_experts
    if not 0 <= expert < num:
        raise KeyError(f"model {spec.name!r} layer {layer} has experts 0..{num - 1}, not {expert}")


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

# Half-width of the uniform init of the DeepSeek selection bias: large enough to change choices.
_PRESET_BIAS_SCALE = 0.1
_SEED_SALT = "moemesh-preset-v1"


def _seed(preset: str, tensor: str) -> int:
    """A stable 63-bit seed for one tensor of one preset (same on every host and Python run)."""
    digest = hashlib.sha256(f"{_SEED_SALT}/{preset}/{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seeded_uniform(preset: str, tensor: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """float32 on CPU, uniform with standard deviation `std`, from its own generator.

    Uniform rather than normal: CPU `uniform_` is integer-based and gives the same bits on every
    CPU, while the vectorised `normal_` paths may differ in the last bit between instruction sets.
    """
    gen = torch.Generator(device="cpu").manual_seed(_seed(preset, tensor))
    half_width = std * math.sqrt(3.0)
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * half_width


class PresetSource:
    """Seeded random weights for a named preset; any subset of tensors, same values everywhere.

    Weights are scaled like nn.Linear's default (std 1/sqrt(fan_in)), so an FFN maps rows of
    O(1) to rows of O(1).
    """

    def __init__(self, name: str):
        self.spec: ModelSpec = spec_from_config(preset_config(name), name)

    def _tensor(
        self, name: str, shape: tuple[int, ...], std: float, dtype: torch.dtype | None
    ) -> torch.Tensor:
        return _cast(_seeded_uniform(self.spec.name, name, shape, std), dtype)

    def _ffn(
        self, names: tuple[str, str, str], hidden: int, inner: int, dtype: torch.dtype | None
    ) -> FFNWeights:
        gate, up, down = names
        return FFNWeights(
            gate=self._tensor(gate, (inner, hidden), 1 / math.sqrt(hidden), dtype),
            up=self._tensor(up, (inner, hidden), 1 / math.sqrt(hidden), dtype),
            down=self._tensor(down, (hidden, inner), 1 / math.sqrt(inner), dtype),
        )

    def expert(self, layer: int, expert: int, dtype: torch.dtype | None = None) -> FFNWeights:
        """Expert `expert` of layer `layer`: gate/up [I, H], down [H, I]; float32 unless `dtype`."""
        spec = self.spec.layer(layer)
        _check_expert(self.spec, layer, expert)
        names = _expert_names(self.spec.family, layer, expert)[0]
        return self._ffn(names, spec.hidden_size, spec.intermediate_size, dtype)

    def gate(self, layer: int, dtype: torch.dtype | None = None) -> GateWeights:
        """Router weight [E, H], plus the family's selection bias [E] / shared expert / shared gate [1, H]."""
        spec = self.spec.layer(layer)
        names = _gate_names(self.spec.family, layer)
        hidden = spec.hidden_size
        weight = self._tensor(names["weight"], (spec.num_experts, hidden), 1 / math.sqrt(hidden), dtype)
        bias = shared = shared_gate = None
        if spec.gate.has_correction_bias:
            bias = self._tensor(
                names["correction_bias"], (spec.num_experts,), _PRESET_BIAS_SCALE / math.sqrt(3), dtype
            )
        if spec.shared_intermediate_size:
            shared_names = (names["shared.gate"], names["shared.up"], names["shared.down"])
            shared = self._ffn(shared_names, hidden, spec.shared_intermediate_size, dtype)
        if spec.shared_gated:
            shared_gate = self._tensor(names["shared_gate"], (1, hidden), 1 / math.sqrt(hidden), dtype)
        return GateWeights(weight=weight, correction_bias=bias, shared=shared, shared_gate=shared_gate)


# --------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------

_INDEX_FILE = "model.safetensors.index.json"


class CheckpointSource:
    """Reads one model's expert and gate tensors from a safetensors checkpoint directory.

    The map tensor name -> shard file is built once (from `model.safetensors.index.json`, or from
    the headers of the `*.safetensors` files); each read opens (memory-maps) only the shard that
    holds the tensor and reads only that tensor, or one expert's slice of a fused tensor.
    Tensors come back as stored (dtype and all), FP8 ones dequantized (fp8.py), unless `dtype=`.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        description_path = self.directory / DESCRIPTION_FILE
        self._fp8_block = fp8.DEFAULT_BLOCK
        if description_path.is_file():
            with open(description_path, encoding="utf-8") as fh:
                self.spec: ModelSpec = spec_from_description(json.load(fh), str(directory))
        elif not config_path.is_file():
            raise FileNotFoundError(
                f"{directory}: no config.json; a checkpoint directory needs config.json + *.safetensors"
            )
        else:
            with open(config_path, encoding="utf-8") as fh:
                config = json.load(fh)
            self.spec = spec_from_config(config, str(directory))
            self._fp8_block = fp8.block_size(config)
        self._files = self._build_index()
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def _build_index(self) -> dict[str, Path]:
        """tensor name -> the file holding it."""
        index_path = self.directory / _INDEX_FILE
        if index_path.is_file():
            with open(index_path, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            return {name: self._inside(file, name) for name, file in weight_map.items()}
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory}: no *.safetensors files next to config.json")
        names: dict[str, Path] = {}
        for path in files:
            with safe_open(path, framework="pt") as fh:  # reads the header only
                for name in fh.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    names[name] = path
        return names

    def _inside(self, file: str, name: str) -> Path:
        """The index entry `file` as a path inside the checkpoint folder; ValueError for one that
        leaves it ("../x", an absolute path, a link out): a checkpoint reads only its own files."""
        root = self.directory.resolve()
        path = (self.directory / file).resolve()
        if not path.is_relative_to(root):
            raise ValueError(
                f"{self.directory}: {_INDEX_FILE} maps {name!r} to {file!r}, outside the checkpoint folder"
            )
        return path

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._files)

    def _handle(self, name: str) -> Any:
        path = self._files.get(name)
        if path is None:
            raise MissingTensor(f"tensor {name!r} is not in checkpoint {self.directory}")
        with self._lock:
            handle = self._handles.get(path)
            if handle is None:
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{self.directory}: {_INDEX_FILE} lists {path.name} for {name!r}, but it is missing"
                    )
                handle = self._handles[path] = safe_open(path, framework="pt")
        return handle

    def _read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self._handle(name).get_tensor(name)
        _check_shape(name, tensor, shape, str(self.directory))
        return self._dequantized(name, tensor)

    def _read_expert_slice(self, name: str, expert: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Row `expert` of a fused [E, ...] tensor, reading only that row."""
        view = self._handle(name).get_slice(name)
        _check_shape(name, tuple(view.get_shape()), shape, str(self.directory))
        return self._dequantized(name, view[expert], expert)

    def _dequantized(self, name: str, tensor: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """`tensor` (all of `name`, or its row `row`) as stored; FP8 ones times their scales (fp8.py)."""
        scale = fp8.scale_name(name)
        scales = self._handle(scale).get_slice(scale) if scale in self._files else None
        return fp8.dequantize(name, tensor, scales, row, self._fp8_block, str(self.directory))

    def expert(self, layer: int, expert: int, dtype: torch.dtype | None = None) -> FFNWeights:
        """Expert `expert` of layer `layer`: gate/up [I, H], down [H, I]; stored dtype unless `dtype`."""
        w = self._stored_expert(layer, expert)
        return w if dtype is None else w.to(dtype=dtype)

    def _stored_expert(self, layer: int, expert: int) -> FFNWeights:
        spec = self.spec.layer(layer)
        _check_expert(self.spec, layer, expert)
        if spec.experts_tensors:
            return self._described_expert(spec, expert)
        hidden, inner, num = spec.hidden_size, spec.intermediate_size, spec.num_experts
        for gate, up, down in _expert_names(self.spec.family, layer, expert):
            if gate in self._files:
                return FFNWeights(
                    gate=self._read(gate, (inner, hidden)),
                    up=self._read(up, (inner, hidden)),
                    down=self._read(down, (hidden, inner)),
                )
        for gate_up, down in _fused_names(self.spec.family, layer):
            if gate_up in self._files:
                fused = self._read_expert_slice(gate_up, expert, (num, 2 * inner, hidden))  # [2I, H]
                return FFNWeights(
                    gate=fused[:inner],  # gate rows first, then up (transformers' chunk(2))
                    up=fused[inner:],
                    down=self._read_expert_slice(down, expert, (num, hidden, inner)),
                )
        per_expert = _expert_names(self.spec.family, layer, expert)[0][0]
        fused_name = _fused_names(self.spec.family, layer)[0][0]
        raise MissingTensor(
            f"tensor {per_expert!r} is not in checkpoint {self.directory} "
            f"(nor the fused {fused_name!r}); layer {layer} expert {expert} cannot be read"
        )

    def _described_expert(self, spec, expert: int) -> FFNWeights:
        """One expert of a layer described by `moemesh.json`: slices of its fused tensors, in the
        canonical layout (gate/up [I, H], down [H, I], biases [I] / [H])."""
        ffn, prefix = spec.expert_ffn, spec.experts_tensors
        hidden, inner, num = spec.hidden_size, spec.intermediate_size, spec.num_experts
        width = 2 * inner if ffn.gated else inner  # rows of the (gate_)up projection
        first = f"{prefix}.gate_up_proj" if ffn.gated else f"{prefix}.up_proj"
        stored = (num, hidden, width) if ffn.transposed else (num, width, hidden)
        up = self._read_expert_slice(first, expert, stored)
        up = up.t() if ffn.transposed else up  # [width, H]
        down_stored = (num, inner, hidden) if ffn.transposed else (num, hidden, inner)
        down = self._read_expert_slice(f"{prefix}.down_proj", expert, down_stored)
        down = down.t() if ffn.transposed else down  # [H, I]
        up_bias = down_bias = None
        if ffn.bias:
            up_bias = self._read_expert_slice(f"{first}_bias", expert, (num, width))  # [width]
            down_bias = self._read_expert_slice(f"{prefix}.down_proj_bias", expert, (num, hidden))  # [H]
        if not ffn.gated:
            return FFNWeights(None, up.contiguous(), down.contiguous(), None, up_bias, down_bias)
        # interleaved rows: gate0, up0, gate1, up1, ...; else gate rows, then up rows
        split = (lambda t: (t[0::2], t[1::2])) if ffn.interleaved else (lambda t: (t[:inner], t[inner:]))
        gate, up = (t.contiguous() for t in split(up))
        gate_bias, up_bias = split(up_bias) if ffn.bias else (None, None)
        return FFNWeights(gate, up, down.contiguous(), gate_bias, up_bias, down_bias)

    def gate(self, layer: int, dtype: torch.dtype | None = None) -> GateWeights:
        """Router weight [E, H], plus the family's selection bias [E] / shared expert / shared gate [1, H]."""
        spec = self.spec.layer(layer)
        if not spec.router_gate:
            raise LookupError(
                f"{self.directory}: layer {layer} has no router gate; its callers route (Dispatch)"
            )
        names = _gate_names(self.spec.family, layer)
        hidden, num = spec.hidden_size, spec.num_experts
        # Mixtral gates may live under either block prefix, like its experts.
        weight_name = next(
            (
                f"{p.format(layer=layer)}.gate.weight"
                for p in _BLOCK_PREFIXES[self.spec.family]
                if f"{p.format(layer=layer)}.gate.weight" in self._files
            ),
            names["weight"],
        )
        weight = self._read(weight_name, (num, hidden))
        bias = shared = shared_gate = None
        if spec.gate.has_correction_bias:
            bias = self._read(names["correction_bias"], (num,))
        gate_bias = self._read(names["gate_bias"], (num,)) if spec.gate.has_gate_bias else None
        if spec.shared_intermediate_size:
            inner = spec.shared_intermediate_size
            shared = FFNWeights(
                gate=self._read(names["shared.gate"], (inner, hidden)),
                up=self._read(names["shared.up"], (inner, hidden)),
                down=self._read(names["shared.down"], (hidden, inner)),
            )
            if dtype is not None:
                shared = shared.to(dtype=dtype)
        if spec.shared_gated:
            shared_gate = self._read(names["shared_gate"], (1, hidden))
        return GateWeights(
            weight=_cast(weight, dtype),
            correction_bias=_cast(bias, dtype),
            shared=shared,
            shared_gate=_cast(shared_gate, dtype),
            gate_bias=_cast(gate_bias, dtype),
        )

    def close(self) -> None:
        """Drop the open shard handles (they are reopened on the next read)."""
        with self._lock:
            self._handles.clear()

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(model: str | Path) -> WeightSource:
    """A preset name from PRESETS, or a directory holding config.json + *.safetensors."""
    if isinstance(model, str) and model in PRESETS:
        return PresetSource(model)
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory"
        )
    return CheckpointSource(model)
