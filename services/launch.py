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

from .bootstrap import RunningServer, ServerConfig, start_server
from .expert_service import ExpertServicer
from .router_service import RouterServicer, build_layers, check_coverage, describe_hosts, routing_table
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

    async def stop(self, grace_s: float | None = None) -> None:
        await self.server.stop(grace_s)
        await self.transport.close()
        self.servicer.moe.close()


def load_bank(config: ExpertHostConfig) -> ExpertBank:
    source = open_source(config.model)
    return ExpertBank.from_source(
        source, config.experts, resolve_device(config.device), parse_dtype(config.dtype)
    )


async def start_expert_host(config: ExpertHostConfig, bank: ExpertBank | None = None) -> ExpertHost:
    """Load the host's experts (only those) and serve them."""
    bank = bank if bank is not None else load_bank(config)
    servicer = ExpertServicer(config.host_id, bank, str(config.model))
    server = await start_server(config.server, [servicer.service()])
    return ExpertHost(server, servicer)


async def start_router(config: RouterConfig, interceptors: Sequence = ()) -> RouterHost:
    """Read the gates, ask every host what it serves, check coverage, serve."""
    source = open_source(config.model)
    layers = build_layers(source)
    hosts = await describe_hosts(config.hosts, config.discover_timeout_s, config.server.max_message_bytes)
    table = routing_table(hosts)
    check_coverage(layers, table)
    transport = GrpcTransport({h.host_id: h.address for h in hosts}, config.server.max_message_bytes)
    moe = SparseMoE(layers, table, transport)
    servicer = RouterServicer(moe, source.spec, hosts)
    server = await start_server(config.server, [servicer.service()], interceptors)
    return RouterHost(server, servicer, transport)
