"""The demo: bring up a local mesh, push batches of hidden states through the SDK, report.

Report: which experts the first tokens used, the load per expert, the largest difference from a
single-process dense reference (every expert on every token, weighted), and tokens/s of the mesh
next to the same sparse layer computed in this process with no network (the compute limit).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from moemesh.client import Client
from moemesh.experts.device import resolve_device
from moemesh.experts.ffn import ExpertBank, ffn
from moemesh.experts.weights import WeightSource, open_source
from moemesh.protos.spec import parse_dtype
from moemesh.router.dispatch import RoutingTable
from moemesh.router.gating import route
from moemesh.router.pipeline import SparseMoE
from moemesh.services.launch import build_layers
from moemesh.services.transport import InProcessTransport

from .discovery import DEVICE_RESOURCE_PREFIX
from .ray_mesh import RayMesh, RayMeshConfig
from .report import balance, load_bars, print_topology

# Mesh vs single process: identical math, summation order differs (float32), or bf16 rounding.
TOLERANCE = {"float32": 1e-5, "float16": 5e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class DemoConfig:
    model: str = "tiny-mixtral"
    num_hosts: int = 3
    tokens: int = 512
    batches: int = 20
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    env: Mapping[str, str] = field(default_factory=dict)  # for the actors, e.g. OTEL_* settings


def dense_reference(source: WeightSource, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the dense [tokens, experts] routing matrix. float32."""
    spec = source.spec.layer(layer)
    moe = build_layers(source)[layer]
    x = hidden.to(torch.float32)
    routing = route(x, moe.gate_weight, moe.gate, None, moe.correction_bias)
    dense = torch.zeros(x.shape[0], spec.num_experts)
    used = routing.experts >= 0
    dense[torch.nonzero(used)[:, 0], routing.experts[used]] = routing.weights[used]
    out = sum(
        dense[:, e : e + 1] * ffn(x, source.expert(layer, e), spec.activation)
        for e in range(spec.num_experts)
    )
    if moe.shared is not None:
        out = out + moe.shared(x)
    return out


def run_demo(cfg: DemoConfig) -> int:
    torch.manual_seed(cfg.seed)
    source = open_source(cfg.model)
    layer = source.spec.layers[0].layer
    hidden_size = source.spec.layers[0].hidden_size
    dtype = parse_dtype(cfg.dtype)
    print(
        f"moemesh demo: {cfg.model}, {cfg.num_hosts} expert hosts, {cfg.tokens} tokens per batch, {cfg.dtype}"
    )
    mesh_cfg = RayMeshConfig(
        cfg.model,
        num_cpus=os.cpu_count() or 1,
        resources={f"{DEVICE_RESOURCE_PREFIX}CPU": cfg.num_hosts},
        device=cfg.device,
        dtype=cfg.dtype,
        env=cfg.env,
    )
    print("starting an embedded local Ray instance and the mesh on it")
    t0 = time.perf_counter()
    with (
        RayMesh(mesh_cfg, on_event=lambda m: print(f"  {m}", flush=True)) as mesh,
        Client(mesh.address) as client,
    ):
        print(f"mesh up in {time.perf_counter() - t0:.1f}s, router at {mesh.address}\n")
        print_topology(client.topology())

        hidden = torch.randn(cfg.tokens, hidden_size).to(dtype)
        out, routing = client.forward(hidden, layer=layer, return_routing=True)

        print(f"\nrouting of the first tokens (layer {layer}): expert:weight")
        for t in range(min(6, cfg.tokens)):
            picks = [
                f"{int(e)}:{float(w):.3f}" for e, w in zip(routing.experts[t], routing.weights[t]) if e >= 0
            ]
            print(f"  token {t}: {'  '.join(picks)}")

        used = routing.experts[routing.experts >= 0]
        load = torch.bincount(used, minlength=source.spec.layer(layer).num_experts)
        print(f"\nload per expert (tokens routed; max/mean = {balance(load):.2f})")
        print("\n".join(load_bars(load)))

        reference = dense_reference(source, layer, hidden)
        err = (out.to(torch.float32) - reference).abs().max().item()
        ok = err <= TOLERANCE[cfg.dtype]
        print(
            f"\nmax |mesh - single-process dense reference| = {err:.2e} "
            f"({'OK' if ok else 'MISMATCH'}, tolerance {TOLERANCE[cfg.dtype]:.0e})"
        )

        client.forward(hidden, layer=layer)  # warm
        t0 = time.perf_counter()
        for _ in range(cfg.batches):
            client.forward(hidden, layer=layer)
        mesh_tps = cfg.batches * cfg.tokens / (time.perf_counter() - t0)

    local_tps = asyncio.run(_in_process_tokens_per_s(source, layer, hidden, cfg))
    print(
        f"throughput: mesh {mesh_tps:,.0f} tokens/s; same layer in one process {local_tps:,.0f} tokens/s "
        f"(mesh/in-process = {mesh_tps / local_tps:.2f}, {cfg.batches} batches of {cfg.tokens} tokens)"
    )
    return 0 if ok else 1


async def _in_process_tokens_per_s(
    source: WeightSource, layer: int, hidden: torch.Tensor, cfg: DemoConfig
) -> float:
    """The compute limit: the same sparse path with every expert in this process, no network."""
    experts = source.spec.expert_keys()
    bank = ExpertBank.from_source(source, experts, resolve_device(cfg.device), parse_dtype(cfg.dtype))
    transport = InProcessTransport({"local": bank})
    moe = SparseMoE(build_layers(source), RoutingTable({key: ["local"] for key in experts}), transport)
    try:
        await moe.forward(layer, hidden)  # warm
        t0 = time.perf_counter()
        for _ in range(cfg.batches):
            await moe.forward(layer, hidden)
        return cfg.batches * cfg.tokens / (time.perf_counter() - t0)
    finally:
        moe.close()
        await transport.close()
