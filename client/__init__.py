"""moemesh Python SDK: clients of the Router service, typed errors, `RemoteMoE` for torch models.
Imports only the contract (`moemesh.protos`), grpc (traced by OpenTelemetry's gRPC instrumentation)
and torch; no server machinery.

from moemesh.client import Client, RoutingPolicy, RoutingMode
with Client("127.0.0.1:50051") as mesh:
    out = mesh.forward(hidden, layer=0)        # hidden: [tokens, hidden_size]
"""

from moemesh.protos.spec import Routing, RoutingMode, RoutingPolicy, Topology, UnsupportedModel

from .client import AsyncClient, Client
from .errors import (
    ClientClosedError,
    DeadlineExceededError,
    InvalidArgumentError,
    MoeMeshError,
    ResourceExhaustedError,
    UnavailableError,
)
from .hf import RemoteExperts, remote_experts
from .remote import RemoteMoE

__all__ = [
    "AsyncClient",
    "Client",
    "ClientClosedError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "MoeMeshError",
    "ResourceExhaustedError",
    "Routing",
    "RoutingMode",
    "RoutingPolicy",
    "RemoteExperts",
    "RemoteMoE",
    "remote_experts",
    "Topology",
    "UnavailableError",
    "UnsupportedModel",
]
