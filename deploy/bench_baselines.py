"""The systems `moemesh bench` measures side by side, all on the same weights (`open_source(model)`).

| system           | where the layer runs                                                | how clients call it         |
| ---------------- | ------------------------------------------------------------------- | --------------------------- |
| `single`         | this process: transformers `MixtralSparseMoeBlock`, else moemesh's   | one caller, sequential      |
|                  | own sparse path with every expert in one `ExpertBank` (no network)  | (the compute limit)         |
| `mesh-processes` | the mesh, one OS process per expert host and one for the router     | `AsyncClient`, asyncio tasks |
| `mesh-ray`       | the mesh as Ray actors on the bench's local Ray                     | `AsyncClient`, asyncio tasks |
| `naive-ray`      | experts as plain Ray actors (one `ExpertBank` per host, placed as   | threads, `ray.get` per host |
|                  | the mesh places them); gate, plan and combine in the caller; no gRPC |                             |
| `ray-serve`      | a Ray Serve router deployment calling expert deployments through    | the router's handle,        |
|                  | `DeploymentHandle`s                                                 | asyncio tasks               |

A system is `SyncSystem` (a thread-safe `forward`) or `AsyncSystem` (`session()` opens a caller on
the running event loop). Every system takes and returns hidden states [tokens, hidden] float32 on
CPU, for layer `layer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import torch

from moemesh.experts.ffn import ExpertBank
from moemesh.experts.weights import PRESETS, WeightSource, open_source, preset_config
from moemesh.protos.spec import ExpertKey, Segment
from moemesh.router.dispatch import DispatchPlan, RoutingTable, combine, pack, plan
from moemesh.router.gating import route

from .backend import MeshConfig, make_backend
from .local import local_placement

SYSTEMS = ("single", "mesh-processes", "mesh-ray", "naive-ray", "ray-serve")
RAY_SYSTEMS = frozenset({"mesh-ray", "naive-ray", "ray-serve"})
BENCH_NAMESPACE = "moemesh-bench"  # the bench's Ray actors; never another mesh's
_SERVE_APP = "moemesh-bench"

Call = Callable[[torch.Tensor, float | None], Awaitable[torch.Tensor]]  # (hidden, timeout) -> out


def host_threads(num_hosts: int) -> int:
    """torch threads per expert process: the cores split between the hosts and a router, as
    `ProcessMesh` splits them, so that every distributed system gets the same share."""
    return max(1, (os.cpu_count() or 1) // (num_hosts + 1))


class SyncSystem:
    name: str
    describe: str

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [tokens, hidden] -> [tokens, hidden]; safe to call from several threads."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class AsyncSystem:
    name: str
    describe: str

    def session(self):
        """An async context manager giving a `Call` bound to the running event loop."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- single process ------------------------------------------------------------------------------


def _config_dict(model: str) -> dict:
    if model in PRESETS:
        return preset_config(model)
    return json.loads((Path(model) / "config.json").read_text())


def transformers_mixtral_block(source: WeightSource, model: str, layer: int) -> torch.nn.Module:
    """transformers' `MixtralSparseMoeBlock` of `layer` holding the source's weights, float32, eval.

    Its experts are one fused tensor: gate_up_proj [E, 2I, H] (gate rows, then up rows) and
    down_proj [E, H, I].
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(MixtralConfig(**_config_dict(model))).eval()
    with torch.no_grad():
        block.gate.weight.copy_(source.gate(layer).weight)
        for e in range(source.spec.layer(layer).num_experts):
            w = source.expert(layer, e)
            block.experts.gate_up_proj[e].copy_(torch.cat([w.gate, w.up], dim=0))
            block.experts.down_proj[e].copy_(w.down)
    return block.float()


class SingleProcess(SyncSystem):
    """The layer in this process. Callers are serialised: it is the compute limit, not a server."""

    name = "single"

    def __init__(self, model: str, layer: int, device: str = "cpu"):
        source = open_source(model)
        self._block = None
        self._device = torch.device(device)
        try:
            if source.spec.family == "mixtral":
                self._block = transformers_mixtral_block(source, model, layer).to(self._device)
                self.describe = f"transformers MixtralSparseMoeBlock in this process ({device})"
        except ImportError:
            pass
        if self._block is None:
            self._start_pipeline(source, layer)
            self.describe = f"moemesh SparseMoE in process, every expert in one ExpertBank ({device})"

    def _start_pipeline(self, source: WeightSource, layer: int) -> None:
        from moemesh.router.pipeline import SparseMoE
        from moemesh.services.launch import build_layers
        from moemesh.services.transport import InProcessTransport

        keys = [k for k in source.spec.expert_keys() if k[0] == layer]
        bank = ExpertBank.from_source(source, keys, self._device, torch.float32)
        self._transport = InProcessTransport({"local": bank})
        self._moe = SparseMoE(
            build_layers(source), RoutingTable({k: ["local"] for k in keys}), self._transport
        )
        self._loop = asyncio.new_event_loop()
        self._layer = layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._block is not None:
            with torch.inference_mode():
                return self._block(hidden.to(self._device).unsqueeze(0)).squeeze(0).cpu()
        return self._loop.run_until_complete(self._moe.forward(self._layer, hidden)).hidden

    def close(self) -> None:
        if self._block is None:
            self._moe.close()
            self._loop.run_until_complete(self._transport.close())
            self._loop.close()


# -- the mesh ------------------------------------------------------------------------------------


class Mesh(AsyncSystem):
    """The mesh on one of its backends ("processes" | "ray"), called through the SDK's AsyncClient."""

    def __init__(self, backend: str, model: str, layer: int, num_hosts: int, device: str):
        self.name = f"mesh-{backend}"
        if backend == "ray":
            from .ray_mesh import RayMeshConfig

            config: MeshConfig = RayMeshConfig(
                model,
                num_hosts=num_hosts,
                device=device,
                namespace=BENCH_NAMESPACE,
                num_cpus=os.cpu_count() or 1,
                resources={"device:CPU": num_hosts},
            )
        else:
            config = MeshConfig(model, num_hosts=num_hosts, device=device)
        self.mesh = make_backend(backend, config).start()
        self.layer = layer
        self.describe = f"moemesh router + {num_hosts} expert hosts ({backend}), SDK AsyncClient over gRPC"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Call]:
        from moemesh.client import AsyncClient

        async with AsyncClient(self.mesh.address, timeout=None) as client:

            async def call(hidden: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
                return await client.forward(hidden, layer=self.layer, timeout=timeout)

            yield call

    def close(self) -> None:
        self.mesh.close()


# -- naive Ray -----------------------------------------------------------------------------------


def start_ray(num_hosts: int) -> None:
    """The bench's local Ray: every core, and `device:CPU` slots for the mesh's Ray placement."""
    from .ray_mesh import start_local_ray

    start_local_ray(os.cpu_count() or 1, {"device:CPU": num_hosts}, namespace=BENCH_NAMESPACE)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


class ExpertWorker:
    """The experts of one host in a Ray actor (naive-ray) or a Serve replica (ray-serve)."""

    def __init__(self, model: str, experts: Sequence[ExpertKey], threads: int, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.bank = ExpertBank.from_source(open_source(model), experts, torch.device(device), torch.float32)

    def compute(self, segments: Sequence[Segment], rows: torch.Tensor) -> torch.Tensor:
        """rows: [R, hidden] -> [R, hidden] unweighted expert outputs, on CPU."""
        return self.bank.compute(segments, rows).cpu()


class _Router:
    """gate → plan → pack and combine of one layer, without any transport (naive-ray, ray-serve)."""

    def __init__(self, model: str, layer: int, placement: Sequence[Sequence[ExpertKey]]):
        source = open_source(model)
        self.layer = layer
        self.gate = source.spec.layer(layer).gate
        self.gate_weight = source.gate(layer).weight  # [E, H]
        hosts = {f"host-{i}": experts for i, experts in enumerate(placement)}
        self.table = RoutingTable({key: [h] for h, experts in hosts.items() for key in experts})
        self.hosts = tuple(hosts)

    def prepare(self, hidden: torch.Tensor) -> tuple[DispatchPlan, list[torch.Tensor]]:
        """hidden: [tokens, H] -> the plan and each host's packed rows [R_h, H]."""
        routing = route(hidden, self.gate_weight, self.gate)
        p = plan(routing, self.layer, self.gate.num_experts, self.table)
        return p, [pack(hidden, b) for b in p.batches]

    @staticmethod
    def finish(hidden: torch.Tensor, p: DispatchPlan, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted scatter-add of each host's rows into [tokens, H]."""
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        for batch, rows in zip(p.batches, outputs, strict=True):
            combine(out, batch, rows)
        return out.to(hidden.dtype)


def _mesh_placement(model: str, num_hosts: int) -> list[tuple[ExpertKey, ...]]:
    return local_placement(MeshConfig(model, num_hosts=num_hosts, device="cpu"))


class NaiveRay(SyncSystem):
    """Experts as plain Ray actors; the caller gates, plans, `ray.get`s one call per host, combines."""

    name = "naive-ray"

    def __init__(self, model: str, layer: int, num_hosts: int, device: str = "cpu"):
        import ray

        placement = _mesh_placement(model, num_hosts)
        self._router = _Router(model, layer, placement)
        worker = ray.remote(ExpertWorker).options(num_cpus=0)
        threads = host_threads(num_hosts)
        self._actors = {
            h: worker.remote(model, experts, threads, device)
            for h, experts in zip(self._router.hosts, placement, strict=True)
        }
        ray.get([a.__ray_ready__.remote() for a in self._actors.values()], timeout=300)
        self.describe = f"{num_hosts} Ray actors holding the experts; gate/plan/combine in the caller"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        import ray

        p, packed = self._router.prepare(hidden)
        refs = [self._actors[b.host].compute.remote(b.segments, rows) for b, rows in zip(p.batches, packed)]
        return self._router.finish(hidden, p, ray.get(refs))

    def close(self) -> None:
        import ray

        for actor in self._actors.values():
            ray.kill(actor, no_restart=True)
        self._actors.clear()


# -- Ray Serve -----------------------------------------------------------------------------------


class ServeRouter:
    """The Serve router deployment: gates and combines in its replica, experts through handles."""

    def __init__(self, model: str, layer: int, placement, experts: dict):
        self.router = _Router(model, layer, placement)
        self.experts = experts  # host id -> DeploymentHandle of that host's expert deployment

    async def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        p, packed = self.router.prepare(hidden)
        outputs = await asyncio.gather(
            *(self.experts[b.host].compute.remote(b.segments, rows) for b, rows in zip(p.batches, packed))
        )
        return self.router.finish(hidden, p, outputs)


class RayServe(AsyncSystem):
    """A Ray Serve composition on the bench's Ray, no HTTP proxy; clients call the router's handle."""

    name = "ray-serve"

    def __init__(self, model: str, layer: int, num_hosts: int, max_clients: int, device: str = "cpu"):
        from ray import serve

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        placement = _mesh_placement(model, num_hosts)
        serve.start(proxy_location="Disabled")
        expert = serve.deployment(ExpertWorker, ray_actor_options={"num_cpus": 0})
        threads = host_threads(num_hosts)
        handles = {
            f"host-{i}": expert.options(name=f"expert-host-{i}").bind(model, experts, threads, device)
            for i, experts in enumerate(placement)
        }
        # Room for every client at the router: queueing in front of it would measure Serve's default
        # admission limit (max_ongoing_requests=5), not the composition.
        router = serve.deployment(
            ServeRouter, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max(max_clients, 8)
        )
        self._handle = serve.run(
            router.bind(model, layer, placement, handles), name=_SERVE_APP, route_prefix=None
        )
        self.describe = f"Serve router deployment + {num_hosts} expert deployments via DeploymentHandles"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Call]:
        async def call(hidden: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
            return await asyncio.wait_for(self._handle.remote(hidden), timeout)

        yield call

    def close(self) -> None:
        from ray import serve

        # The app's replicas go now; Serve's controller goes with the bench's Ray (`stop_ray`).
        # serve.shutdown() would kill the controller under the handle's pending long-poll, which
        # Ray reports on the driver's stdout as failed tasks.
        serve.delete(_SERVE_APP)


def start_system(
    name: str, model: str, layer: int, num_hosts: int, max_clients: int, device: str = "cpu"
) -> SyncSystem | AsyncSystem:
    """Start system `name` (one of SYSTEMS); Ray systems expect `start_ray` to have run."""
    if name == "single":
        return SingleProcess(model, layer, device)
    if name in ("mesh-processes", "mesh-ray"):
        return Mesh(name.removeprefix("mesh-"), model, layer, num_hosts, device)
    if name == "naive-ray":
        return NaiveRay(model, layer, num_hosts, device)
    if name == "ray-serve":
        return RayServe(model, layer, num_hosts, max_clients, device)
    raise ValueError(f"unknown system {name!r}; systems: {', '.join(SYSTEMS)}")
