"""Router.Forward / Route / GetTopology: a thin servicer over `moemesh.router.pipeline.SparseMoE`.

    decode ─▶ validate ─▶ gate ─▶ plan ─▶ dispatch ─▶ combine ─▶ encode

Also builds what the router holds (gates and shared experts, read from a WeightSource) and the
routing table (from the hosts' own `Info`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import torch

from moemesh.experts.ffn import ffn
from moemesh.experts.model import ModelSpec
from moemesh.experts.weights import GateWeights, WeightSource
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.router.dispatch import RoutingTable
from moemesh.router.gating import GateConfig, ScoreFunction
from moemesh.router.pipeline import MoELayer, SparseMoE

from . import codec
from .bootstrap import DEFAULT_MAX_MESSAGE_BYTES, Service, channel_options
from .telemetry import Telemetry, client_call

SERVICE_NAME = "moemesh.v1.Router"


@dataclass(frozen=True)
class HostDescription:
    """An expert host as it describes itself through Expert.Info."""

    host_id: str
    address: str
    device: str
    dtype: str
    experts: tuple[tuple[int, int], ...]
    model: str = ""
    node: str = ""
    relative_speed: float = 1.0


def gate_config(spec: ModelSpec, num_experts: int) -> GateConfig:
    r = spec.routing
    return GateConfig(
        num_experts=num_experts,
        top_k=r.top_k,
        score_function=ScoreFunction(r.score_function),
        norm_topk_prob=r.norm_topk_prob,
        routed_scaling_factor=r.routed_scaling_factor,
        n_group=r.n_group,
        topk_group=r.topk_group,
    )


def _shared_fn(gw: GateWeights, activation: str):
    """The shared expert(s) of a layer as hidden [T, H] -> [T, H], gated as the family does."""
    if gw.shared is None:
        return None
    shared = gw.shared
    shared_gate = gw.shared_gate

    def run(hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(shared.gate.dtype)
        out = ffn(x, shared, activation)
        if shared_gate is not None:  # Qwen2-MoE: sigmoid(x @ g^T) * shared(x)
            out = torch.sigmoid(x @ shared_gate.t()) * out
        return out

    return run


def build_layers(source: WeightSource) -> dict[int, MoELayer]:
    """Gates (and shared experts) of every MoE layer, on CPU in the checkpoint's precision."""
    layers = {}
    for ls in source.spec.layers:
        gw = source.gate(ls.layer)
        layers[ls.layer] = MoELayer(
            layer=ls.layer,
            hidden_size=ls.hidden_size,
            gate=gate_config(source.spec, ls.num_experts),
            gate_weight=gw.weight,
            correction_bias=gw.correction_bias,
            shared=_shared_fn(gw, ls.activation),
        )
    return layers


def routing_table(hosts: Sequence[HostDescription]) -> RoutingTable:
    replicas: dict[tuple[int, int], list[str]] = {}
    for host in hosts:
        for key in host.experts:
            replicas.setdefault(key, []).append(host.host_id)
    return RoutingTable(replicas)


async def describe_hosts(
    addresses: Sequence[str],
    timeout: float = 30.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    telemetry: Telemetry | None = None,
) -> list[HostDescription]:
    """Ask each expert host what it serves (waiting for it to come up, up to `timeout`)."""
    tracer = (telemetry or Telemetry()).tracer()

    async def one(address: str) -> HostDescription:
        async with grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes)) as channel:
            stub = pb_grpc.ExpertStub(channel)
            with client_call(tracer, "/moemesh.v1.Expert/Info", address) as call:
                info = await stub.Info(
                    pb.InfoRequest(), timeout=timeout, wait_for_ready=True, metadata=call.metadata
                )
        return HostDescription(
            host_id=info.host_id,
            address=address,
            device=info.device,
            dtype=info.dtype,
            experts=tuple((e.layer, e.expert) for e in info.experts),
            model=info.model,
            node=info.node,
            relative_speed=info.relative_speed or 1.0,
        )

    return list(await asyncio.gather(*(one(a) for a in addresses)))


def check_coverage(layers: Mapping[int, MoELayer], table: RoutingTable) -> None:
    """Every routed expert of every layer must have at least one host."""
    gaps = {layer: table.missing(layer, spec.num_experts) for layer, spec in layers.items()}
    gaps = {layer: missing for layer, missing in gaps.items() if missing}
    if gaps:
        detail = "; ".join(f"layer {layer}: experts {missing}" for layer, missing in sorted(gaps.items()))
        raise ValueError(f"no expert host serves {detail}")


class RouterServicer(pb_grpc.RouterServicer):
    """Forward, Route and GetTopology for one model."""

    def __init__(self, moe: SparseMoE, spec: ModelSpec, hosts: Sequence[HostDescription]):
        self.moe = moe
        self.spec = spec
        self.hosts = list(hosts)

    # -- validation: every message names the field and what was expected --------------------------

    def _layer(self, layer: int) -> MoELayer:
        spec = self.moe.layers.get(layer)
        if spec is None:
            raise codec.InvalidArgument(
                "layer", f"unknown MoE layer {layer}; expected one of {sorted(self.moe.layers)}"
            )
        return spec

    def _hidden(self, msg: pb.Tensor, has_field: bool, spec: MoELayer) -> torch.Tensor:
        if not has_field:
            raise codec.InvalidArgument("hidden", "required: a [tokens, hidden_size] tensor")
        hidden = codec.decode_tensor(msg, "hidden", rank=2)
        tokens, width = hidden.shape
        if tokens == 0:
            raise codec.InvalidArgument("hidden.shape", "expected at least 1 token, got an empty batch")
        if width != spec.hidden_size:
            raise codec.InvalidArgument(
                "hidden.shape", f"expected hidden size {spec.hidden_size} for layer {spec.layer}, got {width}"
            )
        return hidden

    @staticmethod
    def _check_finite(hidden: torch.Tensor) -> None:
        if not bool(torch.isfinite(hidden).all()):
            bad = int((~torch.isfinite(hidden)).any(dim=1).nonzero()[0])
            raise codec.InvalidArgument("hidden.data", f"expected finite values; token {bad} has NaN or Inf")

    async def _decode(self, request: pb.ForwardRequest | pb.RouteRequest):
        """layer, hidden and routing override of a Forward or Route request, all checked."""
        spec = self._layer(request.layer)
        hidden = self._hidden(request.hidden, request.HasField("hidden"), spec)
        policy = codec.decode_policy(request.routing, request.HasField("routing"))
        await self.moe.run(self._check_finite, hidden)
        return hidden, policy

    # -- RPCs ---------------------------------------------------------------------------------------

    async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        hidden, policy = await self._decode(request)
        result = await self.moe.forward(request.layer, hidden, policy, timeout=context.time_remaining())

        def encode() -> pb.ForwardResponse:
            reply = pb.ForwardResponse(hidden=codec.encode_tensor(result.hidden))
            if request.return_routing:
                reply.routing.CopyFrom(codec.encode_routing(result.routing))
            return reply

        return await self.moe.run(encode)

    async def Route(self, request: pb.RouteRequest, context) -> pb.RouteResponse:
        hidden, policy = await self._decode(request)
        routing = await self.moe.route(request.layer, hidden, policy)
        return pb.RouteResponse(routing=codec.encode_routing(routing))

    async def GetTopology(self, request: pb.GetTopologyRequest, context) -> pb.GetTopologyResponse:
        layers = [
            pb.LayerInfo(
                layer=ls.layer,
                num_experts=ls.num_experts,
                hidden_size=ls.hidden_size,
                top_k=self.spec.routing.top_k,
                routing_family=self.spec.family,
                shared_experts=1 if ls.shared_intermediate_size else 0,
                intermediate_size=ls.intermediate_size,
                tokens_routed=self.moe.tokens_routed[ls.layer].tolist(),
            )
            for ls in self.spec.layers
        ]
        hosts = [
            pb.HostInfo(
                host_id=h.host_id,
                address=h.address,
                device=h.device,
                dtype=h.dtype,
                experts=[pb.ExpertRef(layer=layer, expert=e) for layer, e in h.experts],
                node=h.node,
                relative_speed=h.relative_speed,
                healthy=not self.moe.health.is_down(h.host_id),
            )
            for h in self.hosts
        ]
        return pb.GetTopologyResponse(model=self.spec.name, layers=layers, hosts=hosts)

    def service(self) -> Service:
        return Service(SERVICE_NAME, lambda server: pb_grpc.add_RouterServicer_to_server(self, server))
