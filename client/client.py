"""Sync and asyncio clients of the Router service.

with Client("127.0.0.1:50051") as mesh:
    out = mesh.forward(hidden, layer=0)                      # hidden: [tokens, hidden_size]
    out, routing = mesh.forward(hidden, layer=0, return_routing=True)
    routing = mesh.route(hidden, layer=0, policy=RoutingPolicy(RoutingMode.TOP_P, top_p=0.9))
"""

from __future__ import annotations

from contextlib import contextmanager

import grpc
import torch

from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.protos import wire
from moemesh.protos.spec import Routing, RoutingPolicy, Topology
from moemesh.protos.wire import DEFAULT_MAX_MESSAGE_BYTES, channel_options

from .errors import from_rpc_error
from .tracing import call_attributes, traced_aio_channel, traced_channel


def _span_attributes(hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None) -> dict:
    return {
        "moemesh.layer": layer,
        "moemesh.tokens": int(hidden.shape[0]),
        "moemesh.routing.policy": "default" if policy is None else policy.describe(),
    }


def _forward_request(hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None, return_routing: bool):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden_size], got shape {list(hidden.shape)}")
    request = pb.ForwardRequest(layer=layer, hidden=wire.encode_tensor(hidden), return_routing=return_routing)
    if policy is not None:
        request.routing.CopyFrom(wire.encode_policy(policy))
    return request


def _route_request(hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None):
    request = pb.RouteRequest(layer=layer, hidden=wire.encode_tensor(hidden))
    if policy is not None:
        request.routing.CopyFrom(wire.encode_policy(policy))
    return request


def _forward_result(reply: pb.ForwardResponse, return_routing: bool):
    # clone(): decoded tensors wrap the reply's bytes read-only; callers get an ordinary tensor.
    out = wire.decode_tensor(reply.hidden, "hidden", rank=2).clone()
    return (out, wire.decode_routing(reply.routing)) if return_routing else out


class _Base:
    """What both clients share: address, default deadline, and how a call is made.

    Each call is a CLIENT span of `tracer_provider` (default the global one) whose context travels
    to the router in the call's metadata (the channel's interceptors, `tracing.py`).
    """

    def __init__(self, address: str, timeout: float | None):
        self.address = address
        self.timeout = timeout

    @contextmanager
    def _rpc(self, attributes=None):
        """`attributes` on the call's span; a grpc.RpcError leaves as the typed error, keeping its cause."""
        try:
            with call_attributes(attributes or {}):
                yield
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
        super().__init__(address, timeout)
        self._channel = traced_channel(address, channel_options(max_message_bytes), tracer_provider)
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
        with self._rpc(_span_attributes(hidden, layer, policy)):
            reply = self._stub.Forward(request, timeout=self._deadline(timeout))
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
        with self._rpc(_span_attributes(hidden, layer, policy)):
            reply = self._stub.Route(request, timeout=self._deadline(timeout))
        return wire.decode_routing(reply.routing)

    def topology(self, timeout: float | None = None) -> Topology:
        """The router's layers, expert hosts and observed load."""
        with self._rpc():
            reply = self._stub.GetTopology(pb.GetTopologyRequest(), timeout=self._deadline(timeout))
        return wire.decode_topology(reply)

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
        super().__init__(address, timeout)
        self._channel = traced_aio_channel(address, channel_options(max_message_bytes), tracer_provider)
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
        with self._rpc(_span_attributes(hidden, layer, policy)):
            reply = await self._stub.Forward(request, timeout=self._deadline(timeout))
        return _forward_result(reply, return_routing)

    async def route(
        self,
        hidden: torch.Tensor,
        layer: int,
        policy: RoutingPolicy | None = None,
        timeout: float | None = None,
    ) -> Routing:
        request = _route_request(hidden, layer, policy)
        with self._rpc(_span_attributes(hidden, layer, policy)):
            reply = await self._stub.Route(request, timeout=self._deadline(timeout))
        return wire.decode_routing(reply.routing)

    async def topology(self, timeout: float | None = None) -> Topology:
        with self._rpc():
            reply = await self._stub.GetTopology(pb.GetTopologyRequest(), timeout=self._deadline(timeout))
        return wire.decode_topology(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
