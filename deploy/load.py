"""Expected load per expert: the share of its layer's routed token slots that each expert serves.

The shares of one layer sum to 1. They come from a uniform guess or from observed token counts
(EPLB's `weight`, or the router's `tokens_per_expert`), and drive both how many copies an expert
gets and where they go.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from moemesh.protos.spec import ExpertKey, ModelSpec


@dataclass(frozen=True)
class ExpertLoad:
    """Expected share of its layer's routed token slots per (layer, expert); each layer sums to 1.

    shares: ((layer, expert), share) for every expert of the model, sorted by (layer, expert).
    """

    shares: tuple[tuple[ExpertKey, float], ...]
    source: str = "uniform"

    @classmethod
    def uniform(cls, spec: ModelSpec) -> ExpertLoad:
        """Every expert of a layer equally loaded."""
        return cls(
            tuple(((ls.layer, e), 1.0 / ls.num_experts) for ls in spec.layers for e in range(ls.num_experts))
        )

    @classmethod
    def from_counts(
        cls,
        spec: ModelSpec,
        counts: torch.Tensor | Mapping[int, Sequence[float] | torch.Tensor],
        source: str = "observed",
    ) -> ExpertLoad:
        """Shares from observed token counts.

        counts: [moe_layers, experts] in `spec.layers` order (EPLB's `weight`), or
        {layer: [experts]} for every MoE layer (e.g. the router's `tokens_per_expert`).
        A layer that saw no tokens gets uniform shares: no observation, no preference.
        """
        if isinstance(counts, torch.Tensor):
            if counts.dim() != 2 or counts.shape[0] != len(spec.layers):
                raise ValueError(
                    f"counts: expected a [moe_layers={len(spec.layers)}, experts] tensor, got shape {list(counts.shape)}"
                )
            per_layer = {ls.layer: counts[i] for i, ls in enumerate(spec.layers)}
        else:
            per_layer = dict(counts)
        missing = [ls.layer for ls in spec.layers if ls.layer not in per_layer]
        extra = sorted(set(per_layer) - set(spec.layer_indices))
        if missing or extra:
            raise ValueError(
                f"counts: need one entry per MoE layer {list(spec.layer_indices)}; missing {missing}, not MoE layers {extra}"
            )
        shares: list[tuple[ExpertKey, float]] = []
        for ls in spec.layers:
            row = [
                float(c)
                for c in torch.as_tensor(per_layer[ls.layer], dtype=torch.float64).reshape(-1).tolist()
            ]
            if len(row) != ls.num_experts:
                raise ValueError(f"counts[{ls.layer}]: expected {ls.num_experts} values, got {len(row)}")
            if any(not math.isfinite(c) or c < 0 for c in row):
                raise ValueError(f"counts[{ls.layer}]: counts must be finite and >= 0")
            total = math.fsum(row)
            shares.extend(
                ((ls.layer, e), c / total if total > 0 else 1.0 / ls.num_experts) for e, c in enumerate(row)
            )
        return cls(tuple(shares), source)

    @cached_property
    def _by_key(self) -> dict[ExpertKey, float]:
        return dict(self.shares)

    def share(self, layer: int, expert: int) -> float:
        """The share of (layer, expert); KeyError if the model has no such expert."""
        return self._by_key[(layer, expert)]

    def check(self, spec: ModelSpec) -> None:
        """ValueError unless this load covers exactly the experts of `spec`."""
        keys = spec.expert_keys()
        if sorted(self._by_key) != keys:
            missing = sorted(set(keys) - set(self._by_key))[:5]
            extra = sorted(set(self._by_key) - set(keys))[:5]
            raise ValueError(
                f"load does not match model {spec.name!r}: missing experts {missing}, unknown experts {extra}"
            )
