"""Run the experts of a `transformers` MoE model on a running mesh.

    with Client("router:50051") as mesh, remote_experts(model, mesh):
        logits = model(input_ids).logits       # every sparse block ran on the mesh

The router must serve the same checkpoint. `moemesh.deploy.offload_experts` does the same with an
embedded mesh that it starts from the model's own weights.
"""

from __future__ import annotations

from torch import nn

from moemesh.protos.spec import RoutingPolicy

from .client import Client
from .remote import RemoteMoE

BLOCK_ATTR = "mlp"  # where every supported family keeps the sparse block of a decoder layer
# Families whose sparse block returns (hidden, router scores) to its decoder layer.
_WITH_ROUTER_SCORES = ("gpt_oss",)


class ModelOnMesh:
    """What a model integration shares: its client, and `restore()` on `close()` (or on leaving the
    `with`), after which the model runs locally again."""

    client: Client

    @property
    def address(self) -> str:
        return self.client.address

    def restore(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteExperts(ModelOnMesh):
    """The model's sparse blocks swapped for `RemoteMoE`s (the router's gate, `Forward`)."""

    def __init__(self, model: nn.Module, client: Client, policy: RoutingPolicy | None = None):
        topology = client.topology()
        decoder = _decoder_layers(model)
        hidden = getattr(model.config, "hidden_size", None)
        self.client = client
        self.layers = tuple(ls.layer for ls in topology.layers)
        self._originals: dict[int, nn.Module] = {}
        for ls in topology.layers:
            if ls.layer >= len(decoder) or not hasattr(decoder[ls.layer], BLOCK_ATTR):
                raise ValueError(f"{type(model).__name__} has no decoder layer {ls.layer} with .{BLOCK_ATTR}")
            if hidden is not None and hidden != ls.hidden_size:
                raise ValueError(
                    f"the router at {client.address} serves {topology.model} with hidden size "
                    f"{ls.hidden_size}; this model's hidden size is {hidden}"
                )
        scores = getattr(model.config, "model_type", None) in _WITH_ROUTER_SCORES
        for index in self.layers:
            self._originals[index] = getattr(decoder[index], BLOCK_ATTR)
            setattr(decoder[index], BLOCK_ATTR, RemoteMoE(client, index, policy, scores))
        self._decoder = decoder

    def restore(self) -> None:
        """Put the model's own sparse blocks back (idempotent)."""
        for index, block in self._originals.items():
            setattr(self._decoder[index], BLOCK_ATTR, block)
        self._originals.clear()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: expected decoder layers at .model.layers")
    return layers


def remote_experts(model: nn.Module, client: Client, policy: RoutingPolicy | None = None) -> RemoteExperts:
    """Swap every sparse MoE block that `client`'s router serves for a `RemoteMoE`, in place."""
    return RemoteExperts(model, client, policy)
