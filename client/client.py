"""Sync and asyncio clients of the Router service.

with Client("127.0.0.1:50051") as mesh:
    out = mesh.forward(hidden, layer=0)                      # hidden: [tokens, hidden_size]
    out, routing = mesh.forward(hidden, layer=0, return_routing=True)
    routing = mesh.route(hidden, layer=0, policy=RoutingPolicy(RoutingMode.TOP_P, top_p=0.9))
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import torch

from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.router.gating import Routing, RoutingPolicy
from moemesh.services import codec
from moemesh.services.bootstrap import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from moemesh.services.telemetry import Telemetry, client_call, describe_policy

from .errors import from_rpc_error


@dataclass(frozen=True)
class LayerTopology:
    layer: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    family: str
    shared_experts: int
    tokens_routed: tuple[int, ...] = ()  # rows routed to each expert since the router started


@dataclass(frozen=True)
class HostTopology:
    host_id: str
    address: str
    device: str
    dtype: str
    experts: tuple[tuple[int, int], ...]
    node: str = ""
    relative_speed: float = 1.0
    healthy: bool = True


@dataclass(frozen=True)
class Topology:
    """What a router serves: its model, MoE layers and expert hosts."""

    model: str
    layers: tuple[LayerTopology, ...]
    hosts: tuple[HostTopology, ...]

    def layer(self, index: int) -> LayerTopology:
        for ls in self.layers:
            if ls.layer == index:
                return ls
        raise KeyError(
            f"layer {index} is not an MoE layer of {self.model}; MoE layers: {[x.layer for x in self.layers]}"
        )


def _topology(msg: pb.GetTopologyResponse) -> Topology:
    return Topology(
        model=msg.model,
        layers=tuple(
            LayerTopology(
                x.layer,
                x.num_experts,
                x.hidden_size,
                x.intermediate_size,
                x.top_k,
                x.routing_family,
                x.shared_experts,
                tuple(x.tokens_routed),
            )
            for x in msg.layers
        ),
        hosts=tuple(
            HostTopology(
                h.host_id,
                h.address,
                h.device,
                h.dtype,
                tuple((e.layer, e.expert) for e in h.experts),
                h.node,
                h.relative_speed,
                h.healthy,
            )
            for h in msg.hosts
        ),
    )


FORWARD = "/moemesh.v1.Router/Forward"
ROUTE = "/moemesh.v1.Router/Route"
GET_TOPOLOGY = "/moemesh.v1.Router/GetTopology"


def _span_attributes(hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None) -> dict:
    return {
        "moemesh.layer": layer,
        "moemesh.tokens": int(hidden.shape[0]),
        "moemesh.routing.policy": describe_policy(policy),
    }


def _forward_request(hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None, return_routing: bool):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden_size], got shape {list(hidden.shape)}")
    request = pb.ForwardRequest(
        layer=layer, hidden=codec.encode_tensor(hidden), return_routing=return_routing
    )
    if policy is not None:
        request.routing.CopyFrom(codec.encode_policy(policy))
    return request


def _route_request(hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None):
    request = pb.RouteRequest(layer=layer, hidden=codec.encode_tensor(hidden))
    if policy is not None:
        request.routing.CopyFrom(codec.encode_policy(policy))
    return request


def _forward_result(reply: pb.ForwardResponse, return_routing: bool):
    # clone(): decoded tensors wrap the reply's bytes read-only; callers get an ordinary tensor.
    out = codec.decode_tensor(reply.hidden, "hidden", rank=2).clone()
    return (out, codec.decode_routing(reply.routing)) if return_routing else out


class _Base:
    """What both clients share: address, default deadline, tracer, and how a call is made."""

    def __init__(self, address: str, timeout: float | None, tracer_provider):
        self.address = address
        self.timeout = timeout
        # Each call is a CLIENT span (tracer_provider's, default the global one) whose context
        # travels to the router in the call's metadata.
        self._tracer = Telemetry(tracer_provider).tracer()

    @contextmanager
    def _rpc(self, method: str, attributes=None):
        """Span around the call; a grpc.RpcError leaves as the typed error, keeping its cause."""
        try:
            with client_call(self._tracer, method, self.address, attributes) as call:
                yield call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """Blocking client. `timeout` (seconds) is the default deadline of every call."""

    def __init__(
        self,
        address: str,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tracer_provider=None,
    ):
        super().__init__(address, timeout, tracer_provider)
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.RouterStub(self._channel)

    def forward(
        self,
        hidden: torch.Tensor,
        layer: int,
        policy: RoutingPolicy | None = None,
        return_routing: bool = False,
        timeout: float | None = None,
    ):
        """hidden: [tokens, hidden_size] -> the MoE layer's output (and the Routing, if asked)."""
        request = _forward_request(hidden, layer, policy, return_routing)
        with self._rpc(FORWARD, _span_attributes(hidden, layer, policy)) as c:
            reply = self._stub.Forward(request, timeout=self._deadline(timeout), metadata=c.metadata)
        return _forward_result(reply, return_routing)

    def route(
        self,
        hidden: torch.Tensor,
        layer: int,
        policy: RoutingPolicy | None = None,
        timeout: float | None = None,
    ) -> Routing:
        """hidden: [tokens, hidden_size] -> chosen experts and weights, without running experts."""
        request = _route_request(hidden, layer, policy)
        with self._rpc(ROUTE, _span_attributes(hidden, layer, policy)) as c:
            reply = self._stub.Route(request, timeout=self._deadline(timeout), metadata=c.metadata)
        return codec.decode_routing(reply.routing)

    def topology(self, timeout: float | None = None) -> Topology:
        """The router's layers, expert hosts and observed load."""
        with self._rpc(GET_TOPOLOGY) as c:
            reply = self._stub.GetTopology(
                pb.GetTopologyRequest(), timeout=self._deadline(timeout), metadata=c.metadata
            )
        return _topology(reply)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as `Client`, as coroutines."""

    def __init__(
        self,
        address: str,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tracer_provider=None,
    ):
        super().__init__(address, timeout, tracer_provider)
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.RouterStub(self._channel)

    async def forward(
        self,
        hidden: torch.Tensor,
        layer: int,
        policy: RoutingPolicy | None = None,
        return_routing: bool = False,
        timeout: float | None = None,
    ):
        request = _forward_request(hidden, layer, policy, return_routing)
        with self._rpc(FORWARD, _span_attributes(hidden, layer, policy)) as c:
            reply = await self._stub.Forward(request, timeout=self._deadline(timeout), metadata=c.metadata)
        return _forward_result(reply, return_routing)

    async def route(
        self,
        hidden: torch.Tensor,
        layer: int,
        policy: RoutingPolicy | None = None,
        timeout: float | None = None,
    ) -> Routing:
        request = _route_request(hidden, layer, policy)
        with self._rpc(ROUTE, _span_attributes(hidden, layer, policy)) as c:
            reply = await self._stub.Route(request, timeout=self._deadline(timeout), metadata=c.metadata)
        return codec.decode_routing(reply.routing)

    async def topology(self, timeout: float | None = None) -> Topology:
        with self._rpc(GET_TOPOLOGY) as c:
            reply = await self._stub.GetTopology(
                pb.GetTopologyRequest(), timeout=self._deadline(timeout), metadata=c.metadata
            )
        return _topology(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
