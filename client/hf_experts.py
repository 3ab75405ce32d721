"""The `moemesh` experts implementation of transformers' experts interface.

transformers 5 MoE blocks compute their own routing and call
`self.experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])`; the experts class is
decorated with `use_experts_implementation`, and `config._experts_implementation` picks the
function from `ALL_EXPERTS_FUNCTIONS` that does the work. `RoutedExperts` registers
`moemesh_experts_forward` there under `IMPLEMENTATION`, points every experts module at its layer
on the mesh and switches the model's configs to it: the model's own routers run in this process,
exactly as written, and only the experts run remote (`Router.Dispatch`). `close()` restores the
configs' implementations, so the model runs locally again.

transformers is imported on first use only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .client import Client
from .hf import ModelOnMesh

IMPLEMENTATION = "moemesh"
_TARGET = "_moemesh_target"  # the attribute that points an experts module at its layer


@dataclass(frozen=True)
class _Target:
    client: Client
    layer: int


def moemesh_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index, top_k_weights):
    """hidden_states: [T, H]; top_k_index, top_k_weights: [T, K] -> [T, H], the weighted sum of the
    selected experts, computed on the mesh (inference only: no autograd graph to the experts)."""
    target = getattr(self, _TARGET, None)
    if target is None:
        raise RuntimeError(
            f"{type(self).__name__} uses the {IMPLEMENTATION!r} experts implementation but is not "
            "offloaded; close the offload or set config._experts_implementation back"
        )
    width = hidden_states.shape[-1]
    flat = hidden_states.detach().reshape(-1, width)  # [T, H]
    index = top_k_index.detach().reshape(flat.shape[0], -1)  # [T, K]
    weights = top_k_weights.detach().reshape(flat.shape[0], -1).float()  # [T, K]
    out = target.client.dispatch(flat, target.layer, index, weights)
    return out.to(device=hidden_states.device, dtype=hidden_states.dtype).reshape(hidden_states.shape)


def register() -> None:
    """Register `moemesh_experts_forward` in transformers' ALL_EXPERTS_FUNCTIONS (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moemesh_experts_forward)


def _configs(model: nn.Module, modules) -> list:
    """Every config object that may hold `_experts_implementation`: the model's, its sub-configs
    (recursively), and each experts module's own, parents first, each once."""
    found: dict[int, object] = {}

    def add(config) -> None:
        if config is None or id(config) in found or not hasattr(config, "_experts_implementation"):
            return
        found[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            add(getattr(config, key, None))

    add(getattr(model, "config", None))
    for module in modules:
        add(getattr(module, "config", None))
    return list(found.values())


class RoutedExperts(ModelOnMesh):
    """The model's experts modules running on the mesh through `Dispatch`, until `close()`.

    experts: {decoder layer index: experts module}; each layer must be served by `client`'s router.
    """

    def __init__(self, model: nn.Module, client: Client, experts: dict[int, nn.Module]):
        served = {ls.layer for ls in client.topology().layers}
        missing = sorted(set(experts) - served)
        if missing:
            raise ValueError(f"the router at {client.address} serves layers {sorted(served)}, not {missing}")
        register()
        self.client = client
        self.layers = tuple(sorted(experts))
        self._experts = dict(experts)
        self._configs = _configs(model, experts.values())
        self._saved = [config._experts_implementation for config in self._configs]
        for layer, module in self._experts.items():
            setattr(module, _TARGET, _Target(client, layer))
        for config in self._configs:
            config._experts_implementation = IMPLEMENTATION

    def restore(self) -> None:
        """Give the model its own experts implementation back (idempotent)."""
        # Parents first: a parent's setter also sets its sub-configs, which then get their own back.
        for config, saved in zip(self._configs, self._saved, strict=True):
            config._experts_implementation = saved
        for module in self._experts.values():
            if hasattr(module, _TARGET):
                delattr(module, _TARGET)
        self._configs, self._saved, self._experts = [], [], {}
