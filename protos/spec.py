"""The shared contract as Python types: each concept defined once, used by every package.

`moemesh.proto` is the contract on the wire; this module is the same contract in Python, pure
(dataclasses and torch dtypes, no grpc, no protobuf), so that the compute cores (`router/`,
`experts/`) and the transport side (`services/`, `client/`, `deploy/`) share one vocabulary.
`wire.py` converts between these types and the protobuf messages.

    ExpertKey                 (layer, expert)
    Segment                   rows [start, start + count) of a packed tensor go through one expert
    DTYPES / parse_dtype      the tensor dtypes moemesh computes and sends, by name and wire code
    GateConfig                the trained routing of one MoE layer (checked once, here)
    RoutingPolicy, Routing    a per-request override, and the gate's decision
    ExpertFFN                 the math of one routed expert (gated or not, biases, activation, gate kind)
    MoELayerSpec, ModelSpec   what a model's sparse layers look like
    HostInfo, LayerInfo, Topology   what a router serves, as hosts and clients see it
    format_experts / parse_experts / describe_experts   expert sets as text
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

ExpertKey = tuple[int, int]  # (layer, expert)


class UnsupportedModel(ValueError):
    """The checkpoint's architecture is not one moemesh can serve; the message names the supported ones."""


# -- tensors -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DType:
    """A dtype moemesh accepts: its canonical name, other names users type, torch dtype and wire code
    (the `moemesh.v1.DType` enum value)."""

    name: str
    aliases: tuple[str, ...]
    torch: torch.dtype
    wire: int

    @property
    def itemsize(self) -> int:
        return self.torch.itemsize


DTYPES: tuple[DType, ...] = (
    DType("float32", ("fp32",), torch.float32, 1),
    DType("float16", ("fp16",), torch.float16, 2),
    DType("bfloat16", ("bf16",), torch.bfloat16, 3),
    DType("int32", (), torch.int32, 4),
)
# Dtypes that experts compute in (and that hidden states may have).
FLOAT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

_BY_NAME = {n: d for d in DTYPES for n in (d.name, *d.aliases)}
_BY_TORCH = {d.torch: d for d in DTYPES}
_BY_WIRE = {d.wire: d for d in DTYPES}


def dtype_info(value: str | torch.dtype | int) -> DType:
    """Look a dtype up by name ("bf16", "torch.float32"), torch dtype or wire code; ValueError
    naming the supported ones."""
    if isinstance(value, torch.dtype):
        found = _BY_TORCH.get(value)
    elif isinstance(value, str):
        found = _BY_NAME.get(value.strip().lower().removeprefix("torch."))
    else:
        found = _BY_WIRE.get(value)
    if found is None:
        raise ValueError(f"dtype {value!r} is not supported; use one of {[d.name for d in DTYPES]}")
    return found


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A compute dtype from a name or torch dtype: float32/fp32, float16/fp16, bfloat16/bf16."""
    info = dtype_info(value)
    if info.name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {value!r} is not a compute dtype; use one of {list(FLOAT_DTYPES)}")
    return info.torch


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32" (the canonical name parse_dtype accepts and the wire reports)."""
    return dtype_info(dtype).name


@dataclass(frozen=True)
class Segment:
    """Rows [start, start + count) of a packed tensor go through expert `expert` of layer `layer`."""

    layer: int
    expert: int
    start: int
    count: int

    @property
    def key(self) -> ExpertKey:
        return (self.layer, self.expert)


# -- routing -----------------------------------------------------------------------------------------


class ScoreFunction(str, Enum):
    """How router logits become expert scores."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class GroupScore(str, Enum):
    """How the group limit (`n_group` > 1) scores a group of experts."""

    TOP2_SUM = "top2_sum"  # sum of the two best selection scores (DeepSeek-V3, GLM4-MoE)
    MAX = "max"  # the best score (DeepSeek-V2 `group_limited_greedy`)


class RoutingMode(str, Enum):
    """How many experts a token gets."""

    TOP_K = "top_k"
    TOP_P = "top_p"
    THRESHOLD = "threshold"


class InvalidArgument(ValueError):
    """Bad input from a caller; `field` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidRouting(ValueError):
    """A routing policy that does not fit the layer. `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class GateConfig:
    """The trained routing of one MoE layer, as the checkpoint states it. Checked here, once.

    has_correction_bias: the gate has a selection-only bias per expert (DeepSeek-V3).
    group_score: how the group limit scores a group.
    float32_logits: softmax logits computed in float32 rather than the hidden dtype (DeepSeek-V2);
        sigmoid logits always are.
    has_gate_bias: the router's linear layer has a bias [experts], added to the logits (gpt-oss).
    """

    num_experts: int
    top_k: int
    score_function: ScoreFunction = ScoreFunction.SOFTMAX
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    has_correction_bias: bool = False
    group_score: GroupScore = GroupScore.TOP2_SUM
    float32_logits: bool = False
    has_gate_bias: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "score_function", ScoreFunction(self.score_function))
        except ValueError:
            choices = ", ".join(f.value for f in ScoreFunction)
            raise ValueError(
                f"score_function must be one of {choices}, got {self.score_function!r}"
            ) from None
        try:
            object.__setattr__(self, "group_score", GroupScore(self.group_score))
        except ValueError:
            choices = ", ".join(g.value for g in GroupScore)
            raise ValueError(f"group_score must be one of {choices}, got {self.group_score!r}") from None
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must be >= 1 and divide the {self.num_experts} experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in 1..{self.n_group} (n_group)")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..{self.num_experts}; it exceeds the experts")
        if self.top_k > self.selectable_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {self.selectable_experts} experts in topk_group="
                f"{self.topk_group} groups of {self.experts_per_group}"
            )
        if not (math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
            raise ValueError(
                f"routed_scaling_factor must be a finite number > 0, got {self.routed_scaling_factor}"
            )

    @property
    def experts_per_group(self) -> int:
        """Experts in one group (`num_experts` when groups are not used)."""
        return self.num_experts // self.n_group

    @property
    def selectable_experts(self) -> int:
        """How many experts one token can choose from after the group limit."""
        if self.n_group > 1:
            return self.topk_group * self.experts_per_group
        return self.num_experts


@dataclass(frozen=True)
class RoutingPolicy:
    """A per-request override. `None` fields take the layer default (`GateConfig.top_k`)."""

    mode: RoutingMode = RoutingMode.TOP_K
    top_k: int | None = None
    top_p: float | None = None
    threshold: float | None = None
    max_k: int | None = None

    def describe(self) -> str:
        """The mode and the fields that are set, e.g. "top_p(top_p=0.9,max_k=4)"."""
        fields = [
            f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
            for name in ("top_k", "top_p", "threshold", "max_k")
            if (value := getattr(self, name)) is not None
        ]
        return f"{getattr(self.mode, 'value', self.mode)}({','.join(fields)})"


@dataclass(frozen=True)
class Routing:
    """The gate's decision for a batch.

    experts: [tokens, K] int64, expert index per slot, -1 in unused slots (dynamic modes)
    weights: [tokens, K] float32, combine weight per slot, 0 in unused slots
    """

    experts: torch.Tensor
    weights: torch.Tensor


def describe(policy: RoutingPolicy | None) -> str:
    """A policy as span attributes show it: "default" (the layer's own), or `RoutingPolicy.describe`."""
    return "default" if policy is None else policy.describe()


def is_real(value: object) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# -- models ------------------------------------------------------------------------------------------


class GLUKind(str, Enum):
    """How a gated expert combines its gate and up projections (transformers' `_apply_gate`)."""

    GLU = "glu"  # act(gate) * up (transformers' default)
    CLAMPED_GLU = "clamped_glu"  # act(min(gate, limit)) * clamp(up, -limit, limit) (DeepSeek-V4)
    GPT_OSS = "gpt_oss"  # g = min(gate, limit); g * sigmoid(alpha * g) * (clamp(up, -limit, limit) + 1)


@dataclass(frozen=True)
class ExpertFFN:
    """The math of one routed expert, as transformers' experts interface describes it.

        gated:     out = down(glu(gate(x), up(x)))       glu: `glu_kind`, with `activation`
        not gated: out = down(act(up(x)))                (`has_gate=False`)

    Each projection adds its bias when `bias`. The last three fields say how a checkpoint stores the
    fused tensors (`gate_up_proj: [E, 2I, H]`, `down_proj: [E, H, I]`): `interleaved` gate/up rows
    (gate0, up0, gate1, ...) rather than gate rows then up rows, and `transposed` ([E, H, 2I],
    [E, I, H]); loading undoes both, so the compute never sees them.
    """

    activation: str = "silu"  # transformers ACT2FN name
    gated: bool = True
    bias: bool = False
    glu_kind: GLUKind = GLUKind.GLU
    alpha: float = 1.702  # GPT_OSS only
    limit: float = 7.0  # CLAMPED_GLU and GPT_OSS only
    interleaved: bool = False
    transposed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "glu_kind", GLUKind(self.glu_kind))
        if not self.gated and self.glu_kind is not GLUKind.GLU:
            raise ValueError(f"glu_kind={self.glu_kind.value} needs a gated expert (gated=True)")
        if not (is_real(self.alpha) and is_real(self.limit) and self.limit > 0):
            raise ValueError(f"alpha and limit must be finite (limit > 0), got {self.alpha}, {self.limit}")


@dataclass(frozen=True)
class MoELayerSpec:
    """One sparse MoE block."""

    layer: int  # decoder layer index
    hidden_size: int
    intermediate_size: int  # inner size of one routed expert
    activation: str  # transformers ACT2FN name, e.g. "silu"
    gate: GateConfig
    shared_intermediate_size: int = 0  # 0 = no shared expert
    shared_gated: bool = False  # Qwen2-MoE: sigmoid(x @ shared_expert_gate) scales the shared expert
    ffn: ExpertFFN | None = None  # None: SwiGLU-style act(gate) * up with `activation`, no biases
    # False: the router holds no gate for this layer (the caller routes; Dispatch only, no Forward).
    router_gate: bool = True
    # Where the checkpoint keeps this layer's fused experts ("model.layers.3.mlp.experts"); "" = the
    # family's own tensor names.
    experts_tensors: str = ""

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def expert_ffn(self) -> ExpertFFN:
        """The expert math of this layer (`ffn`, or the family default from `activation`)."""
        return self.ffn if self.ffn is not None else ExpertFFN(activation=self.activation)


@dataclass(frozen=True)
class ModelSpec:
    """All sparse layers of a model."""

    name: str
    family: str  # transformers model_type: "mixtral", "qwen2_moe", ..., "gpt_oss"
    layers: tuple[MoELayerSpec, ...]

    def layer(self, index: int) -> MoELayerSpec:
        """The sparse block of decoder layer `index`; KeyError if that layer is dense or absent."""
        return _layer(self.layers, index, self.name)

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """Decoder layer indices of the sparse blocks, ascending."""
        return tuple(spec.layer for spec in self.layers)

    def expert_keys(self) -> list[ExpertKey]:
        """Every (layer, expert) of the model, in order."""
        return [(ls.layer, e) for ls in self.layers for e in range(ls.num_experts)]


def _layer(layers, index: int, model: str):
    """The entry of `layers` (each with a `.layer` index) for decoder layer `index`, else KeyError."""
    for entry in layers:
        if entry.layer == index:
            return entry
    raise KeyError(
        f"layer {index} of model {model!r} is not a MoE layer; MoE layers are {[x.layer for x in layers]}"
    )


# -- what a router serves ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HostInfo:
    """An expert host: what it says of itself (`Expert.Info`) and what the router knows of it."""

    host_id: str
    address: str
    device: str
    dtype: str
    experts: tuple[ExpertKey, ...]
    model: str = ""
    node: str = ""
    relative_speed: float = 1.0  # vs the reference accelerator; the router favours faster replicas
    healthy: bool = True  # False while the router keeps the host out of plans after a failure


@dataclass(frozen=True)
class LayerInfo:
    """One MoE layer as a router serves it."""

    layer: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    family: str
    shared_experts: int
    tokens_routed: tuple[int, ...] = ()  # rows routed to each expert since the router started

    @classmethod
    def of(cls, spec: MoELayerSpec, family: str, tokens_routed: Sequence[int] = ()) -> LayerInfo:
        return cls(
            spec.layer,
            spec.num_experts,
            spec.hidden_size,
            spec.intermediate_size,
            spec.gate.top_k,
            family,
            1 if spec.shared_intermediate_size else 0,
            tuple(tokens_routed),
        )


@dataclass(frozen=True)
class Topology:
    """What a router serves: its model, MoE layers and expert hosts."""

    model: str
    layers: tuple[LayerInfo, ...]
    hosts: tuple[HostInfo, ...]

    def layer(self, index: int) -> LayerInfo:
        """The MoE layer `index`; KeyError if the router serves no such layer."""
        return _layer(self.layers, index, self.model)


# -- expert sets as text -----------------------------------------------------------------------------


def expert_runs(experts: Iterable[ExpertKey]) -> dict[int, list[tuple[int, int]]]:
    """{layer: [(first, last), ...]}: the consecutive runs of each layer's experts, sorted."""
    runs: dict[int, list[tuple[int, int]]] = {}
    for layer, expert in sorted(set(experts)):
        layer_runs = runs.setdefault(layer, [])
        if layer_runs and expert == layer_runs[-1][1] + 1:
            layer_runs[-1] = (layer_runs[-1][0], expert)
        else:
            layer_runs.append((expert, expert))
    return runs


def _run_text(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def format_experts(experts: Iterable[ExpertKey]) -> str:
    """[(0,0),(0,1),(0,2),(1,0)] -> "0:0-2,1:0" (the CLI's --experts syntax)."""
    return ",".join(
        f"{layer}:" + "+".join(_run_text(*r) for r in runs) for layer, runs in expert_runs(experts).items()
    )


def describe_experts(experts: Iterable[ExpertKey]) -> str:
    """For people: "layer 0: experts 0-3, 6; layer 1: experts 2"."""
    runs = expert_runs(experts)
    if not runs:
        return "no experts"
    return "; ".join(
        f"layer {layer}: experts {', '.join(_run_text(*r) for r in rs)}" for layer, rs in runs.items()
    )


def parse_experts(text: str) -> tuple[ExpertKey, ...]:
    """Inverse of format_experts: "0:0-2+5,1:0" -> ((0,0),(0,1),(0,2),(0,5),(1,0))."""
    out: list[ExpertKey] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer_text, sep, ranges = part.partition(":")
        if not sep or not layer_text.strip().isdigit():
            raise ValueError(f"--experts: expected LAYER:FIRST-LAST[+...], got {part!r}")
        layer = int(layer_text)
        for r in ranges.split("+"):
            lo, _, hi = r.partition("-")
            if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
                raise ValueError(f"--experts: bad expert range {r!r} in {part!r}")
            first, last = int(lo), int(hi) if hi else int(lo)
            if last < first:
                raise ValueError(f"--experts: empty range {r!r} in {part!r}")
            out.extend((layer, e) for e in range(first, last + 1))
    if not out:
        raise ValueError("--experts: no experts given")
    return tuple(out)


def check_segments(segments: Sequence[Segment], num_rows: int) -> None:
    """Every segment a non-empty run inside `num_rows` rows, none overlapping; ValueError naming it."""
    for i, s in enumerate(segments):
        if s.count < 1 or s.start < 0 or s.start + s.count > num_rows:
            raise ValueError(
                f"segments[{i}] rows [{s.start}, {s.start + s.count}) must be 1 or more rows "
                f"within [0, {num_rows}), the rows sent"
            )
    ordered = sorted(segments, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.start + a.count:
            raise ValueError(f"segments overlap: {a} and {b}; each row goes through exactly one expert")
