"""A live transformers model's experts, described for the mesh (`moemesh.json` + fused tensors).

Any family whose experts use transformers' experts interface (`use_experts_implementation`) can
be served: the experts modules say what their math is (flags `has_gate`, `has_bias`,
`is_concatenated`, `is_transposed`, `has_post_expert_norm`; `act_fn`; `_apply_gate`) and hold
their weights as fused 3-D tensors. `describe_experts` reads all of that from the modules;
`write_experts_checkpoint` writes the description (experts/model.py reads it) and the experts'
tensors under their in-memory names, which `CheckpointSource` reads one expert at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from moemesh.experts.model import (
    DESCRIPTION_FILE,
    DESCRIPTION_FORMAT,
    SUPPORTED_ACTIVATIONS,
    SUPPORTED_FAMILIES,
)
from moemesh.protos.spec import ExpertFFN, GLUKind, UnsupportedModel

EXPERTS_FILE = "experts.safetensors"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_TENSORS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


@dataclass(frozen=True)
class DescribedExperts:
    """experts: {decoder layer: experts module}; names: {decoder layer: module name};
    description: the `moemesh.json` dict."""

    experts: dict[int, nn.Module]
    names: dict[int, str]
    description: dict


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module that uses transformers' experts interface."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "is_concatenated") and hasattr(module, "has_gate") and hasattr(module, "down_proj")
    ]


def activation_name(act: object) -> str:
    """The transformers ACT2FN name of an activation module (the first supported one that builds
    the same class with the same settings); UnsupportedModel if none does."""
    from transformers.activations import ACT2FN

    def settings(module: object) -> dict:
        return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}

    functions = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu"}  # some experts keep a plain function
    if act in functions:
        return functions[act]
    for name in SUPPORTED_ACTIVATIONS:
        candidate = ACT2FN[name] if name in ACT2FN else None  # noqa: SIM401 - [] builds the instance
        if candidate is not None and type(candidate) is type(act) and settings(candidate) == settings(act):
            return name
    raise UnsupportedModel(
        f"activation {type(act).__name__} is not supported; supported: {SUPPORTED_ACTIVATIONS}"
    )


def expert_ffn(module: nn.Module) -> ExpertFFN:
    """The math of one experts module, from its interface flags, act_fn and `_apply_gate`."""
    kind_of = type(module)
    if module.has_post_expert_norm:
        raise UnsupportedModel(f"{kind_of.__name__}: post-expert norms are not supported yet")
    gate = getattr(kind_of, "_apply_gate", None)
    gate_name = getattr(gate, "__qualname__", "")
    fields: dict = {}
    if gate_name == "_default_apply_gate" or not module.has_gate:
        fields["glu_kind"] = GLUKind.GLU
    elif gate_name == "GptOssExperts._apply_gate":
        fields.update(glu_kind=GLUKind.GPT_OSS, alpha=float(module.alpha), limit=float(module.limit))
    elif gate_name == "DeepseekV4Experts._apply_gate":
        fields.update(glu_kind=GLUKind.CLAMPED_GLU, limit=float(module.limit))
    else:
        raise UnsupportedModel(f"{kind_of.__name__}: its gate {gate_name or '?'} is not one moemesh computes")
    act = getattr(module, "act_fn", None)
    if fields["glu_kind"] is not GLUKind.GPT_OSS:  # gpt-oss's gate has its own activation
        fields["activation"] = activation_name(act)
    return ExpertFFN(
        gated=bool(module.has_gate),
        bias=bool(module.has_bias),
        interleaved=not module.is_concatenated,
        transposed=bool(module.is_transposed),
        **fields,
    )


def describe_experts(model: nn.Module) -> DescribedExperts:
    """Every experts module of `model`, keyed by its decoder layer; UnsupportedModel when the model
    has none, or when one cannot be served (its layer unknown, its math not one moemesh computes)."""
    found = experts_modules(model) if isinstance(model, nn.Module) else []
    name = type(model).__name__
    config = getattr(model, "config", None)
    if not found:
        family = getattr(config, "model_type", None) or (
            config.to_dict().get("model_type") if config else None
        )
        raise UnsupportedModel(
            f"{name}: model_type {family!r} is not supported: it is none of {', '.join(SUPPORTED_FAMILIES)} "
            "and no experts module of it uses transformers' experts interface"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    top_k = getattr(text, "num_experts_per_tok", None) or 1
    experts, names, layers = {}, {}, []
    for module_name, module in found:
        match = _LAYER.search(module_name)
        if match is None or int(match.group(1)) in experts:
            raise UnsupportedModel(f"{name}: experts module {module_name!r} has no decoder layer of its own")
        layer = int(match.group(1))
        ffn = expert_ffn(module)
        down = module.down_proj  # [E, H, I], or [E, I, H] when transposed
        num, hidden, inner = (down.shape[0], down.shape[2], down.shape[1]) if ffn.transposed else down.shape
        experts[layer], names[layer] = module, module_name
        layers.append(
            {
                "layer": layer,
                "hidden_size": int(hidden),
                "intermediate_size": int(inner),
                "num_experts": int(num),
                "top_k": int(top_k),
                "experts_tensors": module_name,
                "ffn": {k: (v.value if isinstance(v, GLUKind) else v) for k, v in asdict(ffn).items()},
            }
        )
    family = getattr(config, "model_type", "") or name
    description = {
        "format": DESCRIPTION_FORMAT,
        "family": family,
        "layers": sorted(layers, key=lambda x: x["layer"]),
    }
    return DescribedExperts(experts, names, description)


def write_experts_checkpoint(described: DescribedExperts, directory: str | Path, config=None) -> Path:
    """Write `moemesh.json`, the experts' fused tensors (`experts.safetensors`, in-memory names) and,
    when given, the model's `config.json` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for layer, module in described.experts.items():
        for attr in _TENSORS:
            value = getattr(module, attr, None)
            if isinstance(value, torch.Tensor):
                tensors[f"{described.names[layer]}.{attr}"] = value.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / EXPERTS_FILE))
    with open(directory / DESCRIPTION_FILE, "w", encoding="utf-8") as fh:
        json.dump(described.description, fh, indent=1)
    if config is not None:
        config.to_json_file(str(directory / "config.json"))
    return directory
