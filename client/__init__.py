"""moemesh Python SDK.

from moemesh.client import Client, RoutingPolicy, RoutingMode
with Client("127.0.0.1:50051") as mesh:
    out = mesh.forward(hidden, layer=0)        # hidden: [tokens, hidden_size]
"""

from moemesh.router.gating import Routing, RoutingMode, RoutingPolicy

from .client import AsyncClient, Client, Topology
from .errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    MoeMeshError,
    ResourceExhaustedError,
    UnavailableError,
)
from .hf import RemoteExperts, offload_experts
from .remote import RemoteMoE

__all__ = [
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "MoeMeshError",
    "offload_experts",
    "ResourceExhaustedError",
    "Routing",
    "RoutingMode",
    "RoutingPolicy",
    "RemoteExperts",
    "RemoteMoE",
    "Topology",
    "UnavailableError",
]
