"""`RemoteMoE`: a torch module whose forward runs one MoE layer on the mesh."""

from __future__ import annotations

import torch
from torch import nn

from moemesh.protos.spec import RoutingPolicy

from .client import Client


class RemoteMoE(nn.Module):
    """Drop-in for a sparse MoE block: hidden [..., hidden_size] -> [..., hidden_size].

    Inference only: the output carries no autograd graph back to the experts.
    `with_router_scores`: return (hidden, None), for decoder layers that unpack the block's
    (hidden, router scores) pair (gpt-oss); the scores stay on the router.
    """

    def __init__(
        self,
        client: Client,
        layer: int,
        policy: RoutingPolicy | None = None,
        with_router_scores: bool = False,
    ):
        super().__init__()
        self.client = client
        self.layer = layer
        self.policy = policy
        self.with_router_scores = with_router_scores

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, None]:
        shape = hidden_states.shape
        flat = hidden_states.detach().reshape(-1, shape[-1])
        out = self.client.forward(flat, self.layer, self.policy)
        out = out.to(device=hidden_states.device, dtype=hidden_states.dtype).reshape(shape)
        return (out, None) if self.with_router_scores else out

    def extra_repr(self) -> str:
        return f"layer={self.layer}, router={self.client.address}"
