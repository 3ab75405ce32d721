"""Start an expert host or a router from typed configs. Used by the CLI, the local meshes and Ray actors.

host = await start_expert_host(ExpertHostConfig(model="tiny-mixtral", host_id="h0", experts=...))
router = await start_router(RouterConfig(model="tiny-mixtral", hosts=(host.address,)))
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import torch

from moemesh.experts.device import resolve_device, torch_executor
from moemesh.experts.ffn import ExpertBank, ffn
from moemesh.experts.weights import GateWeights, WeightSource, open_source
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.protos import wire
from moemesh.protos.spec import HostInfo, parse_dtype
from moemesh.protos.wire import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from moemesh.router.dispatch import RoutingTable
from moemesh.router.pipeline import MoELayer, SparseMoE
from moemesh.router.replicas import LeastLoadedReplica

from .admission import HostLimits, RouterLimits
from .bootstrap import RunningServer, ServerConfig, start_server
from .expert_service import ExpertServicer
from .router_service import RouterServicer
from .telemetry import HOST_ATTRIBUTE, PipelineTelemetry, Telemetry
from .transport import GrpcTransport


@dataclass(frozen=True)
class ExpertHostConfig:
    """One expert host: which experts of which model, on which device and dtype.

    model: a preset name or a checkpoint directory. device: "auto" picks an accelerator torch sees.
    limits: what the host queues before it answers RESOURCE_EXHAUSTED (defaults in HostLimits).
    """

    model: str
    host_id: str
    experts: tuple[tuple[int, int], ...]
    device: str = "auto"
    dtype: str = "float32"
    server: ServerConfig = field(default_factory=ServerConfig)
    node: str = ""  # where it runs, for topology and status
    relative_speed: float = 1.0  # vs the reference accelerator; the router favours faster replicas
    limits: HostLimits = field(default_factory=HostLimits)


@dataclass(frozen=True)
class RouterConfig:
    """The router: the model whose gates it runs and the expert hosts' addresses.

    limits: the Forward / Route work it takes on before it answers RESOURCE_EXHAUSTED (defaults
    in RouterLimits).
    """

    model: str
    hosts: tuple[str, ...]
    discover_timeout_s: float = 60.0
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: RouterLimits = field(default_factory=RouterLimits)


@dataclass
class ExpertHost:
    server: RunningServer
    servicer: ExpertServicer

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)
        self.servicer.close()


@dataclass
class RouterHost:
    server: RunningServer
    servicer: RouterServicer
    transport: GrpcTransport

    @property
    def address(self) -> str:
        return self.server.address

    async def register_host(self, address: str) -> HostInfo:
        """A host (new, or restarted on a new port) announces itself: route to it again.

        The routing table is rebuilt and swapped in whole; forwards in flight keep the old one.
        """
        (desc,) = await describe_hosts([address], timeout=10.0)
        hosts = [h for h in self.servicer.hosts if h.host_id != desc.host_id] + [desc]
        self.servicer.hosts = hosts
        self.transport.set_address(desc.host_id, desc.address)
        moe = self.servicer.moe
        moe.chooser.set_speed(desc.host_id, desc.relative_speed)
        moe.swap_table(RoutingTable.from_hosts(hosts))
        moe.health.mark_up(desc.host_id)
        return desc

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)
        await self.transport.close()
        self.servicer.moe.close()


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
        if not ls.router_gate:  # the caller routes (Dispatch); Forward and Route are refused
            layers[ls.layer] = MoELayer(
                layer=ls.layer, hidden_size=ls.hidden_size, gate=ls.gate, gate_weight=None
            )
            continue
        gw = source.gate(ls.layer)
        layers[ls.layer] = MoELayer(
            layer=ls.layer,
            hidden_size=ls.hidden_size,
            gate=ls.gate,
            gate_weight=gw.weight,
            correction_bias=gw.correction_bias,
            gate_bias=gw.gate_bias,
            shared=_shared_fn(gw, ls.activation),
        )
    return layers


async def describe_hosts(
    addresses: Sequence[str],
    timeout: float = 30.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    telemetry: Telemetry | None = None,
) -> list[HostInfo]:
    """Ask each expert host what it serves (waiting for it to come up, up to `timeout`)."""
    telemetry = telemetry or Telemetry()

    async def one(address: str) -> HostInfo:
        async with grpc.aio.insecure_channel(
            address,
            options=channel_options(max_message_bytes),
            interceptors=telemetry.client_interceptors(address),
        ) as channel:
            info = await pb_grpc.ExpertStub(channel).Info(
                pb.InfoRequest(), timeout=timeout, wait_for_ready=True
            )
        return wire.decode_info(info, address)

    return list(await asyncio.gather(*(one(a) for a in addresses)))


def load_bank(config: ExpertHostConfig) -> ExpertBank:
    source = open_source(config.model)
    return ExpertBank.from_source(
        source, config.experts, resolve_device(config.device), parse_dtype(config.dtype)
    )


async def start_expert_host(
    config: ExpertHostConfig, bank: ExpertBank | None = None, telemetry: Telemetry | None = None
) -> ExpertHost:
    """Load the host's experts (only those) and serve them. `telemetry`: where spans and metrics
    go (default: the global tracer provider, no metrics)."""
    bank = bank if bank is not None else load_bank(config)
    servicer = ExpertServicer(
        config.host_id,
        bank,
        str(config.model),
        node=config.node,
        relative_speed=config.relative_speed,
        telemetry=telemetry,
        limits=config.limits,
    )
    server = await start_server(
        config.server,
        [servicer.service()],
        telemetry=telemetry,
        span_attributes={HOST_ATTRIBUTE: config.host_id},
    )
    return ExpertHost(server, servicer)


async def start_router(
    config: RouterConfig, interceptors: Sequence = (), telemetry: Telemetry | None = None
) -> RouterHost:
    """Read the gates, ask every host what it serves, check coverage, serve. `telemetry`: where
    spans and metrics go (default: the global tracer provider, no metrics)."""
    source = open_source(config.model)
    layers = build_layers(source)
    hosts = await describe_hosts(
        config.hosts, config.discover_timeout_s, config.server.max_message_bytes, telemetry
    )
    table = RoutingTable.from_hosts(hosts)
    table.check_covers({layer: spec.num_experts for layer, spec in layers.items()})
    transport = GrpcTransport(
        {h.host_id: h.address for h in hosts}, config.server.max_message_bytes, telemetry
    )
    moe = SparseMoE(
        layers,
        table,
        transport,
        LeastLoadedReplica({h.host_id: h.relative_speed for h in hosts}),
        executor=torch_executor(2, "moemesh-router"),
        observer=PipelineTelemetry(telemetry or Telemetry()),
    )
    servicer = RouterServicer(moe, source.spec, hosts, config.limits)
    server = await start_server(config.server, [servicer.service()], interceptors, telemetry)
    return RouterHost(server, servicer, transport)
