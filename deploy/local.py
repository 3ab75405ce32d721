"""A whole mesh on this machine, two of the `MeshBackend`s (backend.py).

- `EmbeddedMesh`: expert hosts and router in this process, served by a background event loop
  (tests, notebooks, `offload_experts`). Real gRPC servers on 127.0.0.1, port 0.
- `ProcessMesh`: one OS process per expert host and one for the router, without Ray
  (`moemesh up --backend processes`). Each child gets one `ProcessSpec` as a JSON file
  (`moemesh serve --spec FILE`), binds port 0 and reports its address through a ready file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import TypeAdapter

from moemesh.experts.weights import open_source
from moemesh.protos.spec import ExpertKey, describe_experts, dtype_info
from moemesh.services.bootstrap import ServerConfig
from moemesh.services.launch import (
    ExpertHost,
    ExpertHostConfig,
    RouterConfig,
    RouterHost,
    start_expert_host,
    start_router,
)
from moemesh.services.telemetry import Telemetry

from .backend import MeshConfig
from .cluster import ClusterSpec, NodeGroup
from .lpt import plan_placement


def local_placement(config: MeshConfig) -> list[tuple[ExpertKey, ...]]:
    """The experts of each of `config.num_hosts` CPU hosts on this machine, from the planner (no extra
    replicas unless `config.replicas` asks for them)."""
    if config.num_hosts < 1:
        raise ValueError(f"num_hosts must be >= 1, got {config.num_hosts}")
    cluster = ClusterSpec(
        name="local", groups=(NodeGroup(name="local", accelerator="CPU", devices_per_node=config.num_hosts),)
    )
    spec = open_source(config.model).spec
    plan = plan_placement(
        spec, cluster, replicas_budget=config.replicas or 0, dtype_bytes=dtype_info(config.dtype).itemsize
    )
    return [assignment.experts for assignment in plan.hosts()]


@dataclass(frozen=True)
class ProcessSpec:
    """Everything one mesh process serves, parsed once: from `serve-expert` / `serve-router` flags,
    or from the JSON file a ProcessMesh writes for its child (`moemesh serve --spec FILE`).
    Exactly one of `expert` and `router` is set."""

    expert: ExpertHostConfig | None = None
    router: RouterConfig | None = None
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    metrics_port: int = 0  # 0 = no /metrics

    def __post_init__(self) -> None:
        if (self.expert is None) == (self.router is None):
            raise ValueError("a ProcessSpec serves exactly one of an expert host and a router")

    def to_json(self) -> bytes:
        return _SPEC.dump_json(self)

    @staticmethod
    def from_json(data: str | bytes) -> ProcessSpec:
        return _SPEC.validate_json(data)


class LoopThread:
    """An asyncio event loop on a daemon thread, for gRPC servers inside sync code (tests, Ray actors)."""

    def __init__(self, name: str = "moemesh-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def _quiet(message: str) -> None:
    """The default progress callback: say nothing."""


class _LocalMesh:
    """What both local meshes share: their config, a progress callback, use as a context manager."""

    detached = False  # the mesh lives as long as this object

    def __init__(self, config: MeshConfig, on_event: Callable[[str], None]):
        self.config = config
        self.on_event = on_event

    def start(self):
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class EmbeddedMesh(_LocalMesh):
    """Expert hosts + router in this process. Use as a context manager or call start()/close()."""

    def __init__(
        self, config: MeshConfig, telemetry: Telemetry | None = None, on_event: Callable[[str], None] = _quiet
    ):
        """telemetry: where every server of the mesh reports spans and metrics (default: the
        global tracer provider, no metrics)."""
        super().__init__(config, on_event)
        self.telemetry = telemetry
        self.hosts: list[ExpertHost] = []
        self.router: RouterHost | None = None
        self._loop: LoopThread | None = None

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the mesh's event loop and wait for its result."""
        assert self._loop is not None, "mesh not started"
        return self._loop.call(coro, timeout)

    def start(self) -> EmbeddedMesh:
        self._loop = LoopThread("moemesh-mesh")
        try:
            self.call(self._start())
        except BaseException:
            self.close()
            raise
        return self

    async def _start(self) -> None:
        for host_cfg in host_configs(self.config):
            self.on_event(
                f"starting expert host {host_cfg.host_id} with {describe_experts(host_cfg.experts)}"
            )
            self.hosts.append(await start_expert_host(host_cfg, telemetry=self.telemetry))
        self.on_event("starting router")
        self.router = await start_router(
            router_config(self.config, [h.address for h in self.hosts]), telemetry=self.telemetry
        )

    def alive(self) -> bool:
        return self._loop is not None and self._loop.alive

    @property
    def address(self) -> str:
        assert self.router is not None, "mesh not started"
        return self.router.address

    def close(self) -> None:
        if self._loop is None or not self._loop.alive:
            return

        async def stop_all():
            if self.router is not None:
                await self.router.stop(0.5)
            await asyncio.gather(*(h.stop(0.5) for h in self.hosts))

        try:
            self.call(stop_all(), timeout=30)
        finally:
            self._loop.stop()


def host_configs(config: MeshConfig) -> list[ExpertHostConfig]:
    """One expert host per placement entry, each on port 0 of `config.host`."""
    server = ServerConfig(
        host=config.host,
        port=0,
        max_message_bytes=config.max_message_bytes,
        max_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    return [
        ExpertHostConfig(
            config.model,
            f"host-{i}",
            experts,
            config.device or "auto",
            config.dtype,
            server,
            limits=config.host_limits,
        )
        for i, experts in enumerate(local_placement(config))
    ]


def router_config(config: MeshConfig, host_addresses: list[str]) -> RouterConfig:
    server = ServerConfig(
        host=config.host,
        port=config.router_port,
        max_message_bytes=config.max_message_bytes,
        max_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    return RouterConfig(config.model, tuple(host_addresses), server=server, limits=config.router_limits)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    ready_file: Path
    info: dict = field(default_factory=dict)


class ProcessMesh(_LocalMesh):
    """One process per expert host plus a router process, all on this machine. The children get
    this process's environment plus `config.env` (e.g. OTEL_EXPORTER_OTLP_ENDPOINT)."""

    def __init__(
        self, config: MeshConfig, on_event: Callable[[str], None] = _quiet, log_dir: Path | None = None
    ):
        super().__init__(config, on_event)
        self.env = dict(config.env)
        self._tmp = tempfile.TemporaryDirectory(prefix="moemesh-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name)
        self.children: list[_Child] = []
        self.router: _Child | None = None

    def _spawn(self, name: str, spec: ProcessSpec) -> _Child:
        work = Path(self._tmp.name)
        spec_file, ready = work / f"{name}.spec.json", work / f"{name}.ready.json"
        spec_file.write_bytes(spec.to_json())
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - owned by the child
        cmd = [sys.executable, "-m", "moemesh.deploy.cli", "serve", "--spec", str(spec_file)]
        proc = subprocess.Popen(
            [*cmd, "--ready-file", str(ready)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        return _Child(name, proc, ready)

    def _metrics_port(self, offset: int) -> int:
        return self.config.metrics_port + offset if self.config.metrics_port else 0

    def _wait_ready(self, children: list[_Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(children)
        while pending:
            for child in list(pending):
                if child.ready_file.exists():
                    child.info = json.loads(child.ready_file.read_text())
                    pending.remove(child)
                    self.on_event(f"{child.name} ready at {child.info['address']}")
                elif child.proc.poll() is not None:
                    log = (self.log_dir / f"{child.name}.log").read_text()[-2000:]
                    raise RuntimeError(
                        f"{child.name} exited with {child.proc.returncode} before ready:\n{log}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f}s: {[c.name for c in pending]}")
            time.sleep(0.05)

    def start(self, timeout: float = 120.0) -> ProcessMesh:
        cfg = self.config
        try:
            # Split the cores: one share per expert host and one for the router.
            threads = max(1, (os.cpu_count() or 1) // (cfg.num_hosts + 1))
            for i, host_cfg in enumerate(host_configs(cfg)):
                self.on_event(
                    f"starting expert host {host_cfg.host_id} with {describe_experts(host_cfg.experts)}"
                )
                spec = ProcessSpec(expert=host_cfg, threads=threads, metrics_port=self._metrics_port(1 + i))
                self.children.append(self._spawn(host_cfg.host_id, spec))
            self._wait_ready(self.children, timeout)
            self.on_event("starting router")
            router = router_config(cfg, [c.info["address"] for c in self.children])
            self.router = self._spawn(
                "router", ProcessSpec(router=router, threads=threads, metrics_port=self._metrics_port(0))
            )
            self._wait_ready([self.router], timeout)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def address(self) -> str:
        assert self.router is not None, "mesh not started"
        return self.router.info["address"]

    def alive(self) -> bool:
        return self.router is not None and self.router.proc.poll() is None

    def close(self, timeout: float = 15.0) -> None:
        everyone = ([self.router] if self.router else []) + self.children
        for child in everyone:  # router first: it drains before the hosts go away
            if child.proc.poll() is None:
                child.proc.terminate()
                try:
                    child.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
        self.children.clear()
        self.router = None
        self._tmp.cleanup()


_SPEC = TypeAdapter(ProcessSpec)
