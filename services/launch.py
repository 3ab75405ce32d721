"""Start an expert host or a router from typed configs. Used by the CLI, the local meshes and Ray actors.

host = await start_expert_host(ExpertHostConfig(model="tiny-mixtral", host_id="h0", experts=...))
router = await start_router(RouterConfig(model="tiny-mixtral", hosts=(host.address,)))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from moemesh.experts.device import parse_dtype, resolve_device
from moemesh.experts.ffn import ExpertBank
from moemesh.experts.weights import open_source
from moemesh.router.pipeline import SparseMoE
from moemesh.router.replicas import LeastLoadedReplica

from .bootstrap import RunningServer, ServerConfig, start_server
from .expert_service import ExpertServicer
from .router_service import (
    HostDescription,
    RouterServicer,
    build_layers,
    check_coverage,
    describe_hosts,
    routing_table,
)
from .telemetry import HOST_ATTRIBUTE, PipelineTelemetry, Telemetry
from .transport import GrpcTransport


@dataclass(frozen=True)
class ExpertHostConfig:
    """One expert host: which experts of which model, on which device and dtype.

    model: a preset name or a checkpoint directory. device: "auto" picks an accelerator torch sees.
    """

    model: str
    host_id: str
    experts: tuple[tuple[int, int], ...]
    device: str = "auto"
    dtype: str = "float32"
    server: ServerConfig = field(default_factory=ServerConfig)
    node: str = ""  # where it runs, for topology and status
    relative_speed: float = 1.0  # vs the reference accelerator; the router favours faster replicas


@dataclass(frozen=True)
class RouterConfig:
    """The router: the model whose gates it runs and the expert hosts' addresses."""

    model: str
    hosts: tuple[str, ...]
    discover_timeout_s: float = 60.0
    server: ServerConfig = field(default_factory=ServerConfig)


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

    async def register_host(self, address: str) -> HostDescription:
        """A host (new, or restarted on a new port) announces itself: route to it again.

        The routing table is rebuilt and swapped in whole; forwards in flight keep the old one.
        """
        (desc,) = await describe_hosts([address], timeout=10.0)
        hosts = [h for h in self.servicer.hosts if h.host_id != desc.host_id] + [desc]
        self.servicer.hosts = hosts
        self.transport.set_address(desc.host_id, desc.address)
        moe = self.servicer.moe
        moe.chooser.set_speed(desc.host_id, desc.relative_speed)
        moe.swap_table(routing_table(hosts))
        moe.health.mark_up(desc.host_id)
        return desc

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)
        await self.transport.close()
        self.servicer.moe.close()


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
    table = routing_table(hosts)
    check_coverage(layers, table)
    transport = GrpcTransport(
        {h.host_id: h.address for h in hosts}, config.server.max_message_bytes, telemetry
    )
    moe = SparseMoE(
        layers,
        table,
        transport,
        LeastLoadedReplica({h.host_id: h.relative_speed for h in hosts}),
        observer=PipelineTelemetry(telemetry or Telemetry()),
    )
    servicer = RouterServicer(moe, source.spec, hosts)
    server = await start_server(config.server, [servicer.service()], interceptors, telemetry)
    return RouterHost(server, servicer, transport)
