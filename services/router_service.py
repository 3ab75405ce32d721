"""Router.Forward / Dispatch / Route / GetTopology: a thin servicer over `moemesh.router.pipeline.SparseMoE`.

    admit ─▶ decode ─▶ validate ─▶ gate ─▶ plan ─▶ dispatch ─▶ combine ─▶ encode
    (Dispatch: the caller's routing, validated, instead of the gate; no shared experts)

admit: the call's tokens are read from the message's shape (`wire.claimed_rows`: only a shape that
fits the data counts), before any decoding or torch work; beyond `RouterLimits` (tokens and calls
in flight) it gets `Overloaded` (RESOURCE_EXHAUSTED) at once. What the router holds (gates,
shared experts, the routing table) is built in `launch.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.protos import wire
from moemesh.protos.spec import HostInfo, LayerInfo, ModelSpec, Topology
from moemesh.router.batching import ForwardBatcher
from moemesh.router.pipeline import ForwardResult, LayerRequest, MoELayer, SparseMoE, check_finite

from .admission import Admission, RouterLimits, Ticket
from .bootstrap import Service

SERVICE_NAME = "moemesh.v1.Router"


class RouterServicer(pb_grpc.RouterServicer):
    """Forward, Dispatch, Route and GetTopology for one model."""

    def __init__(
        self, moe: SparseMoE, spec: ModelSpec, hosts: Sequence[HostInfo], limits: RouterLimits | None = None
    ):
        self.moe = moe
        self.spec = spec
        self.hosts = list(hosts)
        self.limits = limits or RouterLimits()
        self.batcher = ForwardBatcher(moe, self.limits.batching())
        self.in_flight = Admission(
            "router",
            "at capacity",
            "tokens",
            "in flight",
            self.limits.max_inflight_tokens,
            self.limits.max_inflight_requests,
        )

    def _admit(self, request: pb.ForwardRequest | pb.DispatchRequest | pb.RouteRequest) -> Ticket:
        """Room for the call's tokens (the first dimension of `hidden`, nothing decoded yet; a shape
        that does not fit the data counts none, and decoding refuses it next)."""
        return self.in_flight.admit(wire.claimed_rows(request.hidden))

    # -- validation: every message names the field and what was expected --------------------------

    def _layer(self, layer: int) -> MoELayer:
        spec = self.moe.layers.get(layer)
        if spec is None:
            raise wire.InvalidArgument(
                "layer", f"unknown MoE layer {layer}; expected one of {sorted(self.moe.layers)}"
            )
        return spec

    def _hidden(self, msg: pb.Tensor, has_field: bool, spec: MoELayer) -> torch.Tensor:
        if not has_field:
            raise wire.InvalidArgument("hidden", "required: a [tokens, hidden_size] tensor")
        hidden = wire.decode_tensor(msg, "hidden", rank=2)
        tokens, width = hidden.shape
        if tokens == 0:
            raise wire.InvalidArgument("hidden.shape", "expected at least 1 token, got an empty batch")
        if width != spec.hidden_size:
            raise wire.InvalidArgument(
                "hidden.shape", f"expected hidden size {spec.hidden_size} for layer {spec.layer}, got {width}"
            )
        return hidden

    def _decode(self, request: pb.ForwardRequest | pb.RouteRequest):
        """hidden and routing override of a Forward or Route request, checked up to their values
        (NaN / Inf are found with the torch work, off the event loop)."""
        spec = self._layer(request.layer)
        hidden = self._hidden(request.hidden, request.HasField("hidden"), spec)
        return hidden, wire.decode_policy(request.routing, request.HasField("routing"))

    # -- RPCs ---------------------------------------------------------------------------------------

    async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        with self._admit(request):
            hidden, policy = self._decode(request)

            def encode(result: ForwardResult) -> pb.ForwardResponse:  # in the forward's finish hop
                reply = pb.ForwardResponse(hidden=wire.encode_tensor(result.hidden))
                if request.return_routing:
                    reply.routing.CopyFrom(wire.encode_routing(result.routing))
                return reply

            timeout = context.time_remaining()
            result = await self.batcher.forward(request.layer, LayerRequest(hidden, policy, encode), timeout)
            return result.finished

    async def Dispatch(self, request: pb.DispatchRequest, context) -> pb.DispatchResponse:
        with self._admit(request):
            hidden = self._hidden(request.hidden, request.HasField("hidden"), self._layer(request.layer))
            if not request.HasField("routing"):
                raise wire.InvalidArgument(
                    "routing",
                    "required: experts int32 [tokens, K] (-1 = unused slot), weights float32 [tokens, K]",
                )
            routing = wire.decode_routing(request.routing)  # ids, weights and tokens: checked in the pipeline

            def encode(result: ForwardResult) -> pb.DispatchResponse:  # in the forward's finish hop
                return pb.DispatchResponse(hidden=wire.encode_tensor(result.hidden))

            timeout = context.time_remaining()
            result = await self.batcher.forward(
                request.layer, LayerRequest(hidden, finish=encode, routing=routing), timeout
            )
            return result.finished

    async def Route(self, request: pb.RouteRequest, context) -> pb.RouteResponse:
        with self._admit(request):
            hidden, policy = self._decode(request)

            def route() -> pb.RouteResponse:  # one executor hop: check, gate, encode
                check_finite(hidden)
                return pb.RouteResponse(
                    routing=wire.encode_routing(self.moe.gate(request.layer, hidden, policy))
                )

            return await self.moe.run(route)

    async def GetTopology(self, request: pb.GetTopologyRequest, context) -> pb.GetTopologyResponse:
        return wire.encode_topology(self.topology())

    def topology(self) -> Topology:
        routed = self.moe.tokens_routed
        layers = tuple(
            LayerInfo.of(ls, self.spec.family, routed[ls.layer].tolist()) for ls in self.spec.layers
        )
        health = self.moe.health
        hosts = tuple(dataclasses.replace(h, healthy=not health.is_down(h.host_id)) for h in self.hosts)
        return Topology(self.spec.name, layers, hosts)

    def service(self) -> Service:
        return Service(SERVICE_NAME, lambda server: pb_grpc.add_RouterServicer_to_server(self, server))
