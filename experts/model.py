"""What a model's MoE layers look like: sizes, activation, routing family, shared experts.

A `ModelSpec` (moemesh.protos.spec) is parsed once from a transformers-style `config.json` (or
built by a preset) and passed everywhere else; nothing below re-reads the config.

Any other family whose experts use transformers' experts interface is described by a
`moemesh.json` next to its checkpoint (`spec_from_description`): written from the live model at
offload time, it names each MoE layer's sizes, fused expert tensors and expert math; the caller
routes (`Router.Dispatch`), so such a model has no router gate.

Parsing follows the transformers implementation of each family (configuration defaults, which
decoder layers are sparse, how the gate scores and normalises), without importing transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moemesh.protos.spec import (
    ExpertFFN,
    GateConfig,
    GLUKind,
    GroupScore,
    ModelSpec,
    MoELayerSpec,
    ScoreFunction,
    UnsupportedModel,
)

SUPPORTED_FAMILIES: tuple[str, ...] = (
    *("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "deepseek_v2", "gpt_oss"),
)
# Families whose shared experts are one MLP of n_shared_experts * moe_intermediate_size.
_FUSED_SHARED: tuple[str, ...] = ("deepseek_v2", "deepseek_v3", "glm4_moe")

# transformers ACT2FN names that the expert FFN implements (experts/ffn.py maps them to torch).
SUPPORTED_ACTIVATIONS: tuple[str, ...] = (
    *("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu"),
    "relu2",  # transformers' ReLUSquaredActivation (Nemotron-H's experts)
)

DESCRIPTION_FILE = "moemesh.json"  # a model described layer by layer (spec_from_description)
DESCRIPTION_FORMAT = 1

# Defaults of the transformers configuration classes (transformers 5.x), for keys a config.json
# may leave out. Only the keys moemesh reads are listed.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "hidden_act": "silu",
        "num_experts_per_tok": 2,
        "num_local_experts": 8,
    },
    "qwen2_moe": {
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "hidden_act": "silu",
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4,
        "num_experts": 60,
        "norm_topk_prob": False,
        "mlp_only_layers": None,
    },
    "qwen3_moe": {
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "hidden_act": "silu",
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 768,
        "num_experts_per_tok": 8,
        "num_experts": 128,
        "norm_topk_prob": False,
        "mlp_only_layers": None,
    },
    "olmoe": {
        "hidden_size": 2048,
        "intermediate_size": 2048,
        "num_hidden_layers": 16,
        "hidden_act": "silu",
        "num_experts_per_tok": 8,
        "num_experts": 64,
        "norm_topk_prob": False,
    },
    "deepseek_v3": {
        "hidden_size": 7168,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "hidden_act": "silu",
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "moe_layer_freq": 1,  # original DeepSeek config key; transformers treats every layer as 1
    },
    "glm4_moe": {
        "hidden_size": 4096,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 46,
        "hidden_act": "silu",
        "n_shared_experts": 1,
        "n_routed_experts": 128,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
    },
    "deepseek_v2": {
        "hidden_size": 4096,
        "moe_intermediate_size": 1407,
        "num_hidden_layers": 32,
        "hidden_act": "silu",
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "routed_scaling_factor": 1.0,
        "n_group": None,
        "topk_group": None,
        "topk_method": "greedy",
        "num_experts_per_tok": None,
        "first_k_dense_replace": 0,
        "mlp_bias": False,
    },
    "gpt_oss": {
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 36,
        "hidden_act": "silu",
        "num_experts_per_tok": 4,
        "num_local_experts": 128,
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
    },
}

# transformers `attribute_map` aliases: a config.json may carry either spelling.
_NUM_EXPERTS_KEYS: dict[str, tuple[str, ...]] = {
    "mixtral": ("num_local_experts", "num_experts"),
    "qwen2_moe": ("num_experts", "num_local_experts"),
    "qwen3_moe": ("num_experts", "num_local_experts"),
    "olmoe": ("num_experts", "num_local_experts"),
    "deepseek_v3": ("n_routed_experts", "num_local_experts"),
    "glm4_moe": ("n_routed_experts", "num_local_experts"),
    "deepseek_v2": ("n_routed_experts", "num_experts"),
    "gpt_oss": ("num_local_experts", "num_experts"),
}


class _Config:
    """A config dict with the family defaults behind it; `get` never returns a missing key silently."""

    def __init__(self, config: Mapping[str, Any], family: str, name: str):
        self._config = config
        self._defaults = _DEFAULTS[family]
        self.family = family
        self.name = name

    def get(self, *keys: str) -> Any:
        """The first of `keys` present in the config, else the family default of the first key."""
        for key in keys:
            if key in self._config:
                return self._config[key]
        return self._defaults[keys[0]]

    def positive_int(self, *keys: str) -> int:
        value = self.get(*keys)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.name}: config key {keys[0]!r} must be a positive integer, got {value!r}")
        return value

    def non_negative_int(self, *keys: str) -> int:
        value = self.get(*keys)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{self.name}: config key {keys[0]!r} must be an integer >= 0, got {value!r}")
        return value


def _sparse_layers(cfg: _Config, num_layers: int) -> list[int]:
    """Decoder layer indices whose MLP is a MoE block, by the rule of each family's decoder layer."""
    family = cfg.family
    if family in ("mixtral", "olmoe", "gpt_oss"):
        return list(range(num_layers))
    if family in ("qwen2_moe", "qwen3_moe"):
        # Qwen2MoeDecoderLayer: idx not in mlp_only_layers and (idx + 1) % decoder_sparse_step == 0
        mlp_only = set(cfg.get("mlp_only_layers") or ())
        step = cfg.positive_int("decoder_sparse_step")
        return [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
    if family == "deepseek_v3":
        # DeepseekV3DecoderLayer: idx >= first_k_dense_replace; the original DeepSeek code also
        # requires idx % moe_layer_freq == 0.
        first_dense = cfg.non_negative_int("first_k_dense_replace")
        freq = cfg.positive_int("moe_layer_freq")
        return [i for i in range(num_layers) if i >= first_dense and i % freq == 0]
    if family in ("glm4_moe", "deepseek_v2"):
        # Glm4MoeDecoderLayer, DeepseekV2DecoderLayer: idx >= first_k_dense_replace
        first_dense = cfg.non_negative_int("first_k_dense_replace")
        return [i for i in range(num_layers) if i >= first_dense]
    raise AssertionError(family)


def _gate(cfg: _Config, num_experts: int) -> GateConfig:
    """The family's trained routing; GateConfig checks it (and names the config keys on failure)."""
    family = cfg.family
    top_k = cfg.positive_int("num_experts_per_tok")
    if family == "mixtral":
        # MixtralTopKRouter always renormalises the top-k probabilities.
        fields: dict[str, Any] = {"norm_topk_prob": True}
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        fields = {"norm_topk_prob": bool(cfg.get("norm_topk_prob"))}
    elif family == "deepseek_v2":
        fields = _deepseek_v2_gate(cfg)
    elif family == "gpt_oss":
        # GptOssTopKRouter: logits with the router bias, top-k, softmax over the k picked logits,
        # which is the softmax renormalised over the k.
        fields = {"norm_topk_prob": True, "has_gate_bias": True}
    else:  # deepseek_v3, glm4_moe: sigmoid scores, selection bias, group-limited top-k, scaled weights.
        scaling = cfg.get("routed_scaling_factor")
        fields = {
            "score_function": ScoreFunction.SIGMOID,
            "norm_topk_prob": bool(cfg.get("norm_topk_prob")),
            "routed_scaling_factor": float(scaling if scaling is not None else 1.0),
            "n_group": cfg.non_negative_int("n_group") or 1,
            "topk_group": cfg.non_negative_int("topk_group") or 1,
            "has_correction_bias": True,
        }
    try:
        return GateConfig(num_experts=num_experts, top_k=top_k, **fields)
    except ValueError as err:
        raise ValueError(f"{cfg.name}: {err} (top_k is the config's num_experts_per_tok)") from None


def _deepseek_v2_gate(cfg: _Config) -> dict[str, Any]:
    """DeepseekV2TopkRouter: softmax of float32 logits; `greedy` top-k or `group_limited_greedy`
    (groups scored by their best expert); weights times routed_scaling_factor. transformers never
    renormalises them, whatever `norm_topk_prob` says, so neither does moemesh."""
    method = cfg.get("topk_method")
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModel(
            f"{cfg.name}: deepseek_v2 topk_method {method!r} is not one transformers' router runs; "
            "supported: greedy, group_limited_greedy"
        )
    if cfg.get("mlp_bias"):
        raise UnsupportedModel(
            f"{cfg.name}: deepseek_v2 with mlp_bias (biased shared experts) is not supported"
        )
    scaling = cfg.get("routed_scaling_factor")
    grouped = method == "group_limited_greedy"
    return {
        "float32_logits": True,
        "norm_topk_prob": False,
        "routed_scaling_factor": float(scaling if scaling is not None else 1.0),
        "n_group": (cfg.non_negative_int("n_group") or 1) if grouped else 1,
        "topk_group": (cfg.non_negative_int("topk_group") or 1) if grouped else 1,
        "group_score": GroupScore.MAX,
    }


def _expert_ffn(cfg: _Config) -> ExpertFFN | None:
    """The routed experts' math where it is not the default SwiGLU: gpt-oss's clamped SwiGLU with
    biases, its gate/up rows interleaved and its fused tensors stored transposed."""
    if cfg.family != "gpt_oss":
        return None
    return ExpertFFN(
        bias=True,
        glu_kind=GLUKind.GPT_OSS,
        alpha=float(cfg.get("swiglu_alpha")),
        limit=float(cfg.get("swiglu_limit")),
        interleaved=True,
        transposed=True,
    )


def _shared(cfg: _Config) -> tuple[int, bool]:
    """(shared expert inner size, gated) for one sparse block of the family."""
    if cfg.family == "qwen2_moe":
        size = cfg.non_negative_int("shared_expert_intermediate_size")
        return size, size > 0
    if cfg.family in _FUSED_SHARED:
        # DeepseekV2Moe / DeepseekV3MoE / Glm4MoeMoE fuse all shared experts into one MLP of n_shared_experts * moe_intermediate_size.
        return cfg.non_negative_int("n_shared_experts") * cfg.positive_int("moe_intermediate_size"), False
    return 0, False


def spec_from_config(config: Mapping[str, Any], name: str) -> ModelSpec:
    """Parse a transformers `config.json` dict. Raises UnsupportedModel for other architectures.

    Missing keys take the defaults of the transformers configuration class of the family; values
    that transformers would also reject (top-k larger than the experts, groups that do not divide
    the experts) raise ValueError naming the key.
    """
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModel(
            f"{name}: model_type {family!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    cfg = _Config(config, family, name)
    activation = cfg.get("hidden_act")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModel(
            f"{name}: hidden_act {activation!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    hidden = cfg.positive_int("hidden_size")
    num_experts = cfg.positive_int(*_NUM_EXPERTS_KEYS[family])
    inner_key = "intermediate_size" if family in ("mixtral", "olmoe", "gpt_oss") else "moe_intermediate_size"
    inner = cfg.positive_int(inner_key)
    shared_size, shared_gated = _shared(cfg)
    indices = _sparse_layers(cfg, cfg.positive_int("num_hidden_layers"))
    if not indices:
        raise UnsupportedModel(f"{name}: the {family} config declares no sparse MoE layers; nothing to serve")
    gate = _gate(cfg, num_experts)
    ffn = _expert_ffn(cfg)
    layers = tuple(
        MoELayerSpec(
            layer=i,
            hidden_size=hidden,
            intermediate_size=inner,
            activation=activation,
            gate=gate,
            shared_intermediate_size=shared_size,
            shared_gated=shared_gated,
            ffn=ffn,
            # the fused experts of gpt-oss are read in the layout `ffn` states
            experts_tensors=f"model.layers.{i}.mlp.experts" if ffn is not None else "",
        )
        for i in indices
    )
    return ModelSpec(name=name, family=family, layers=layers)


def spec_from_description(description: Mapping[str, Any], name: str) -> ModelSpec:
    """Parse a `moemesh.json` description (format 1):

        {"format": 1, "family": "gpt_oss", "layers": [{"layer": 0, "hidden_size": H,
         "intermediate_size": I, "num_experts": E, "top_k": K, "experts_tensors": "model.layers.0.mlp.experts",
         "ffn": {ExpertFFN fields}}, ...]}

    The layers have no router gate (`router_gate=False`): their callers route.
    """
    if description.get("format") != DESCRIPTION_FORMAT:
        raise ValueError(
            f"{name}: {DESCRIPTION_FILE} format {description.get('format')!r} is not {DESCRIPTION_FORMAT}"
        )
    layers = []
    for i, entry in enumerate(description.get("layers") or ()):
        try:
            ffn = ExpertFFN(**entry["ffn"])
            if ffn.activation not in SUPPORTED_ACTIVATIONS:
                raise UnsupportedModel(
                    f"activation {ffn.activation!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
                )
            num_experts = int(entry["num_experts"])
            layers.append(
                MoELayerSpec(
                    layer=int(entry["layer"]),
                    hidden_size=int(entry["hidden_size"]),
                    intermediate_size=int(entry["intermediate_size"]),
                    activation=ffn.activation,
                    gate=GateConfig(
                        num_experts=num_experts, top_k=min(int(entry.get("top_k", 1)), num_experts)
                    ),
                    ffn=ffn,
                    router_gate=False,
                    experts_tensors=str(entry["experts_tensors"]),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise type(err)(f"{name}: {DESCRIPTION_FILE} layers[{i}]: {err}") from None
    if not layers:
        raise UnsupportedModel(f"{name}: {DESCRIPTION_FILE} declares no MoE layers; nothing to serve")
    if len({ls.layer for ls in layers}) != len(layers):
        raise ValueError(f"{name}: {DESCRIPTION_FILE} repeats a layer index: {[ls.layer for ls in layers]}")
    return ModelSpec(name=name, family=str(description.get("family", "")), layers=tuple(layers))
