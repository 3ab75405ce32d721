"""Sync and asyncio clients of the Router service.

with Client("127.0.0.1:50051") as mesh:
    out = mesh.forward(hidden, layer=0)                      # hidden: [tokens, hidden_size]
    out, routing = mesh.forward(hidden, layer=0, return_routing=True)
    routing = mesh.route(hidden, layer=0, policy=RoutingPolicy(RoutingMode.TOP_P, top_p=0.9))
    out = mesh.dispatch(hidden, 0, routing.experts, routing.weights)  # your routing, routed experts

Each RPC is described once (`_Call`: stub method, request, how to read the reply, span
attributes); `Client` makes it blocking and `AsyncClient` awaits it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.protos import wire
from moemesh.protos.spec import Routing, RoutingPolicy, Topology, describe
from moemesh.protos.wire import DEFAULT_MAX_MESSAGE_BYTES, channel_options

from .errors import ClientClosedError, from_rpc_error
from .tracing import call_attributes, traced_aio_channel, traced_channel


@dataclass(frozen=True)
class _Call:
    """One RPC to make: `RouterStub.<method>(request)`, its reply read by `result`."""

    method: str
    request: Any
    result: Callable[[Any], Any]
    attributes: Mapping[str, Any] = field(default_factory=dict)  # on the call's CLIENT span


def _check_hidden(hidden: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden_size], got shape {list(hidden.shape)}")


def _layer_request(message, hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None, **fields):
    _check_hidden(hidden)
    request = message(layer=layer, hidden=wire.encode_tensor(hidden), **fields)
    if policy is not None:
        request.routing.CopyFrom(wire.encode_policy(policy))
    return request


def _attributes(hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None) -> dict[str, Any]:
    return {
        "moemesh.layer": layer,
        "moemesh.tokens": int(hidden.shape[0]),
        "moemesh.routing.policy": describe(policy),
    }


def _forward(hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None, return_routing: bool) -> _Call:
    def result(reply: pb.ForwardResponse):
        # clone(): decoded tensors wrap the reply's bytes read-only; callers get an ordinary tensor.
        out = wire.decode_tensor(reply.hidden, "hidden", rank=2).clone()
        return (out, wire.decode_routing(reply.routing)) if return_routing else out

    request = _layer_request(pb.ForwardRequest, hidden, layer, policy, return_routing=return_routing)
    return _Call("Forward", request, result, _attributes(hidden, layer, policy))


def _dispatch(hidden: torch.Tensor, layer: int, experts, weights) -> _Call:
    _check_hidden(hidden)
    routing = Routing(torch.as_tensor(experts), torch.as_tensor(weights))
    request = wire.encode_dispatch(layer, hidden, routing)
    attributes = {
        "moemesh.layer": layer,
        "moemesh.tokens": int(hidden.shape[0]),
        "moemesh.routing.policy": "caller",
    }
    return _Call(
        "Dispatch",
        request,
        lambda reply: wire.decode_tensor(reply.hidden, "hidden", rank=2).clone(),
        attributes,
    )


def _route(hidden: torch.Tensor, layer: int, policy: RoutingPolicy | None) -> _Call:
    request = _layer_request(pb.RouteRequest, hidden, layer, policy)
    return _Call(
        "Route", request, lambda reply: wire.decode_routing(reply.routing), _attributes(hidden, layer, policy)
    )


_TOPOLOGY = _Call("GetTopology", pb.GetTopologyRequest(), wire.decode_topology)


class _Base:
    """What both clients share: address, default deadline, and how a call's errors leave.

    Each call is a CLIENT span of `tracer_provider` (default the global one) whose context travels
    to the router in the call's metadata (the channel's interceptors, `tracing.py`).
    """

    _open_channel: Callable  # tracing.traced_channel or traced_aio_channel

    def __init__(
        self,
        address: str,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tracer_provider=None,
    ):
        """`timeout` (seconds) is the default deadline of every call."""
        self.address = address
        self.timeout = timeout
        self._channel = type(self)._open_channel(address, channel_options(max_message_bytes), tracer_provider)
        self._stub = pb_grpc.RouterStub(self._channel)
        self.closed = False

    def _call(self, call: _Call, timeout: float | None):
        """Start `call` on the stub (blocking: the reply; asyncio: an awaitable of it)."""
        if self.closed:
            raise ClientClosedError(self.address)
        deadline = self.timeout if timeout is None else timeout
        with call_attributes(call.attributes):
            return getattr(self._stub, call.method)(call.request, timeout=deadline)


class Client(_Base):
    """Blocking client. `timeout` (seconds) is the default deadline of every call."""

    _open_channel = staticmethod(traced_channel)

    def _invoke(self, call: _Call, timeout: float | None):
        try:
            return call.result(self._call(call, timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def forward(self, hidden, layer: int, policy=None, return_routing: bool = False, timeout=None):
        """hidden: [tokens, hidden_size] -> the MoE layer's output (and the Routing, if asked)."""
        return self._invoke(_forward(hidden, layer, policy, return_routing), timeout)

    def dispatch(self, hidden, layer: int, experts, weights, timeout=None) -> torch.Tensor:
        """hidden: [tokens, hidden_size] with your own routing -> the routed experts' combined output.

        experts: [tokens, K] expert ids (any integer dtype; -1 = unused slot), weights: [tokens, K]
        combine weights (any float dtype), e.g. a transformers router's `top_k_index` and
        `top_k_weights`. Returns sum over used slots of weight * expert(hidden), in hidden's dtype;
        the router runs no gate and adds no shared experts.
        """
        return self._invoke(_dispatch(hidden, layer, experts, weights), timeout)

    def route(self, hidden, layer: int, policy=None, timeout=None) -> Routing:
        """hidden: [tokens, hidden_size] -> chosen experts and weights, without running experts."""
        return self._invoke(_route(hidden, layer, policy), timeout)

    def topology(self, timeout: float | None = None) -> Topology:
        """The router's layers, expert hosts and observed load."""
        return self._invoke(_TOPOLOGY, timeout)

    def close(self) -> None:
        self.closed = True
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as `Client`, as coroutines."""

    _open_channel = staticmethod(traced_aio_channel)

    async def _invoke(self, call: _Call, timeout: float | None):
        try:
            return call.result(await self._call(call, timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def forward(self, hidden, layer: int, policy=None, return_routing: bool = False, timeout=None):
        """See `Client.forward`."""
        return await self._invoke(_forward(hidden, layer, policy, return_routing), timeout)

    async def dispatch(self, hidden, layer: int, experts, weights, timeout=None) -> torch.Tensor:
        """See `Client.dispatch`."""
        return await self._invoke(_dispatch(hidden, layer, experts, weights), timeout)

    async def route(self, hidden, layer: int, policy=None, timeout=None) -> Routing:
        """See `Client.route`."""
        return await self._invoke(_route(hidden, layer, policy), timeout)

    async def topology(self, timeout: float | None = None) -> Topology:
        """See `Client.topology`."""
        return await self._invoke(_TOPOLOGY, timeout)

    async def close(self) -> None:
        self.closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
