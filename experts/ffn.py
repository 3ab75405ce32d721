"""Expert FFN math on a host's device and dtype: many experts, many rows, one call.

A request packs the rows of many experts into one tensor `rows: [R, hidden]`; `Segment`s say
which rows belong to which (layer, expert). `ExpertBank.compute` validates every segment first,
then runs each expert once over all of its rows and returns `[R, hidden]`.
`ExpertBank.compute_many` does the same for several requests at once (an expert host merges
concurrent calls): each expert still runs once, over the rows of every request.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moemesh.protos.spec import ExpertFFN, ExpertKey, GLUKind, Segment, check_segments, describe_experts

from .model import SUPPORTED_ACTIVATIONS
from .weights import FFNWeights, WeightSource


class UnknownExpert(KeyError):
    """A segment names an expert that this bank does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# transformers ACT2FN name -> the torch function it computes.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),  # same formula as transformers' NewGELU
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # transformers' ReLUSquaredActivation
}
assert set(_ACTIVATIONS) == set(SUPPORTED_ACTIVATIONS)


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function for a transformers activation name; ValueError listing the supported."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}"
        ) from None


def ffn(x: torch.Tensor, w: FFNWeights, activation: str) -> torch.Tensor:
    """x: [rows, hidden] -> [rows, hidden]: down(act(x @ gate.T) * (x @ up.T)).

    x and the weights (gate/up [I, H], down [H, I]) share one device and dtype.
    """
    act = activation_fn(activation)
    return F.linear(act(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)


def glu_fn(spec: ExpertFFN) -> Callable[[torch.Tensor], torch.Tensor]:
    """[rows, 2I] (gate columns, then up columns) -> [rows, I], or [rows, I] -> act for a non-gated
    expert: the middle of the expert FFN, as transformers' `_apply_gate` computes it."""
    act = activation_fn(spec.activation)
    if not spec.gated:
        return act
    kind, limit, alpha = spec.glu_kind, spec.limit, spec.alpha

    def glu(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # [rows, I] each
        if kind is GLUKind.GLU:
            return act(gate) * up
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        if kind is GLUKind.CLAMPED_GLU:
            return act(gate) * up
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))  # GPT_OSS

    return glu


@dataclass(frozen=True)
class _Expert:
    gate_up: torch.Tensor  # [2I, H]: gate rows, then up rows; [I, H] (up only) when not gated
    down: torch.Tensor  # [H, I]
    glu: Callable[[torch.Tensor], torch.Tensor]  # [rows, 2I] -> [rows, I] (glu_fn)
    gate_up_bias: torch.Tensor | None = None  # [2I] or [I]
    down_bias: torch.Tensor | None = None  # [H]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, H] -> [rows, H]"""
        return F.linear(self.glu(F.linear(x, self.gate_up, self.gate_up_bias)), self.down, self.down_bias)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.gate_up, self.down, self.gate_up_bias, self.down_bias) if t is not None]


def _fuse(
    w: FFNWeights, spec: ExpertFFN, where: str, device, dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gate_up [2I, H] or up [I, H], its bias or None) on device/dtype, checking what `spec` needs."""
    if spec.gated != (w.gate is not None):
        raise ValueError(
            f"{where}: the layer's experts are {'' if spec.gated else 'not '}gated, the weights disagree"
        )
    if spec.bias != (w.up_bias is not None and w.down_bias is not None):
        raise ValueError(
            f"{where}: the layer's experts {'have' if spec.bias else 'have no'} biases, the weights disagree"
        )
    weights = [w.gate, w.up] if spec.gated else [w.up]
    biases = [w.gate_bias, w.up_bias] if spec.gated else [w.up_bias]
    fused = torch.cat([t.to(device, dtype) for t in weights], dim=0).contiguous()
    bias = torch.cat([b.to(device, dtype) for b in biases]).contiguous() if spec.bias else None
    return fused, bias


class ExpertBank:
    """The experts one host holds, on one device and dtype.

    Each expert is stored as gate_up: [2I, H] (gate and up fused into one matmul) and down: [H, I].
    """

    def __init__(
        self,
        weights: dict[ExpertKey, FFNWeights],
        activation: str | ExpertFFN | dict[int, str | ExpertFFN],
        device: torch.device,
        dtype: torch.dtype,
    ):
        """weights: (layer, expert) -> FFNWeights; activation: the expert math (an activation name
        for SwiGLU-style experts, or an `ExpertFFN`), one for all or one per layer held."""
        self.device = torch.device(device)
        self.dtype = dtype
        self._experts: dict[ExpertKey, _Expert] = {}
        hidden_sizes = set()
        with torch.no_grad():
            for (layer, expert), w in sorted(weights.items()):
                spec = activation if isinstance(activation, (str, ExpertFFN)) else activation.get(layer)
                if spec is None:
                    raise ValueError(
                        f"no activation given for layer {layer}; activation covers layers {sorted(activation)}"
                    )
                spec = ExpertFFN(activation=spec) if isinstance(spec, str) else spec
                inner, hidden = w.up.shape
                shapes = [w.up.shape, w.down.shape] + ([] if w.gate is None else [w.gate.shape])
                if any(
                    tuple(s) != e for s, e in zip(shapes, [(inner, hidden), (hidden, inner), (inner, hidden)])
                ):
                    raise ValueError(
                        f"layer {layer} expert {expert}: gate {None if w.gate is None else list(w.gate.shape)}, "
                        f"up {list(w.up.shape)}, down {list(w.down.shape)} are not [I, H], [I, H], [H, I]"
                    )
                hidden_sizes.add(hidden)
                gate_up, gate_up_bias = _fuse(w, spec, f"layer {layer} expert {expert}", self.device, dtype)
                self._experts[(layer, expert)] = _Expert(
                    gate_up=gate_up,
                    down=w.down.to(self.device, dtype).contiguous(),
                    glu=glu_fn(spec),
                    gate_up_bias=gate_up_bias,
                    down_bias=None
                    if w.down_bias is None
                    else w.down_bias.to(self.device, dtype).contiguous(),
                )
        if len(hidden_sizes) > 1:
            raise ValueError(f"one bank holds one hidden size; got {sorted(hidden_sizes)}")
        self.hidden_size: int | None = hidden_sizes.pop() if hidden_sizes else None

    @classmethod
    def from_source(
        cls,
        source: WeightSource,
        experts: Iterable[ExpertKey],
        device: torch.device,
        dtype: torch.dtype,
    ) -> ExpertBank:
        """Load only `experts` ((layer, expert) pairs) from `source`, one at a time."""
        wanted = sorted(set(experts))
        weights = {}
        for layer, expert in wanted:
            # Move each expert to the device as it is read, so host memory holds one at a time.
            weights[(layer, expert)] = source.expert(layer, expert).to(device=device, dtype=dtype)
        activations = {layer: source.spec.layer(layer).expert_ffn for layer, _ in wanted}
        return cls(weights, activations, device, dtype)

    @property
    def experts(self) -> list[ExpertKey]:
        """The (layer, expert) pairs held, sorted."""
        return sorted(self._experts)

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights held on the device."""
        return sum(t.numel() * t.element_size() for e in self._experts.values() for t in e.tensors())

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._experts

    def validate(self, segments: Sequence[Segment], rows: torch.Tensor) -> None:
        """Raise before any compute: ValueError for a bad tensor or segment, UnknownExpert for an
        expert not held."""
        if rows.dim() != 2 or not rows.is_floating_point():
            raise ValueError(
                f"rows must be a 2-D float tensor [rows, hidden]; got {rows.dtype} {list(rows.shape)}"
            )
        if self.hidden_size is not None and rows.shape[1] != self.hidden_size:
            raise ValueError(
                f"rows have hidden size {rows.shape[1]}; the experts here take {self.hidden_size}"
            )
        check_segments(segments, rows.shape[0])
        for s in segments:
            if s.key not in self._experts:
                raise UnknownExpert(
                    f"layer {s.layer} expert {s.expert} is not held by this host; "
                    f"it holds {describe_experts(self._experts)}"
                )

    def compute(self, segments: Sequence[Segment], rows: torch.Tensor) -> torch.Tensor:
        """rows: [R, hidden] in any float dtype -> [R, hidden] in rows.dtype; uncovered rows are zero.

        Runs under no_grad rather than inference_mode: the result is an ordinary tensor, so callers
        outside inference mode may still update it in place (e.g. scale by routing weights).
        """
        return self.compute_many([(segments, rows)])[0]

    def compute_many(
        self, requests: Sequence[tuple[Sequence[Segment], torch.Tensor]], *, checked: bool = False
    ) -> list[torch.Tensor]:
        """Several requests in one pass: each expert runs one matmul over the rows all of them bring it.

        requests: [(segments_i, rows_i: [R_i, hidden])], rows in any float dtype.
        Returns [out_i: [R_i, hidden]] in rows_i's dtype and device: out_i is compute(segments_i,
        rows_i), whatever it was merged with (rows no segment covers are zero).
        Every request is validated before any compute, unless `checked` says the caller already
        validated each one (an expert host checks each call before queueing it).
        """
        if not checked:
            for segments, rows in requests:
                self.validate(segments, rows)
        with torch.no_grad():
            xs = [rows.to(device=self.device, dtype=self.dtype) for _, rows in requests]  # [R_i, H] each
            outs = [torch.zeros_like(x) for x in xs]
            # (request, segment) pairs per expert, in request order: one matmul per expert per pass.
            by_expert: dict[ExpertKey, list[tuple[int, Segment]]] = {}
            for i, (segments, _) in enumerate(requests):
                for s in segments:
                    by_expert.setdefault(s.key, []).append((i, s))
            for key, group in by_expert.items():
                parts = [xs[i][s.start : s.start + s.count] for i, s in group]
                y = self._experts[key](parts[0] if len(parts) == 1 else torch.cat(parts))  # [sum(count), H]
                for (i, s), part in zip(group, y.split([s.count for _, s in group]), strict=True):
                    outs[i][s.start : s.start + s.count] = part
            return [out.to(device=rows.device, dtype=rows.dtype) for out, (_, rows) in zip(outs, requests)]
