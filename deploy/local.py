"""A whole mesh on this machine, two ways.

- `EmbeddedMesh`: expert hosts and router in this process, served by a background event loop
  (tests, notebooks, `offload_experts`). Real gRPC servers on 127.0.0.1, port 0.
- `ProcessMesh`: one OS process per expert host and one for the router, without Ray
  (`moemesh up --backend processes`).
  Children bind port 0 and report the address through a ready file.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from moemesh.experts.weights import open_source
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

from .placement import contiguous_placement, format_experts


@dataclass(frozen=True)
class MeshConfig:
    """A local mesh: model (preset or checkpoint dir), number of expert hosts, device and dtype."""

    model: str
    num_hosts: int = 3
    device: str = "auto"
    dtype: str = "float32"
    host: str = "127.0.0.1"
    router_port: int = 0
    max_message_bytes: int = ServerConfig.max_message_bytes
    # ProcessMesh only: 0 = no /metrics; else the router serves it on this port, host i on port + 1 + i.
    metrics_port: int = 0


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


class EmbeddedMesh:
    """Expert hosts + router in this process. Use as a context manager or call start()/close()."""

    def __init__(self, config: MeshConfig, telemetry: Telemetry | None = None):
        """telemetry: where every server of the mesh reports spans and metrics (default: the
        global tracer provider, no metrics)."""
        self.config = config
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
        cfg = self.config
        spec = open_source(cfg.model).spec
        server = ServerConfig(host=cfg.host, port=0, max_message_bytes=cfg.max_message_bytes)
        for i, experts in enumerate(contiguous_placement(spec, cfg.num_hosts)):
            host_cfg = ExpertHostConfig(cfg.model, f"host-{i}", experts, cfg.device, cfg.dtype, server)
            self.hosts.append(await start_expert_host(host_cfg, telemetry=self.telemetry))
        router_server = ServerConfig(
            host=cfg.host, port=cfg.router_port, max_message_bytes=cfg.max_message_bytes
        )
        self.router = await start_router(
            RouterConfig(cfg.model, tuple(h.address for h in self.hosts), server=router_server),
            telemetry=self.telemetry,
        )

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

    def __enter__(self) -> EmbeddedMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    ready_file: Path
    info: dict = field(default_factory=dict)


class ProcessMesh:
    """One process per expert host plus a router process, all on this machine."""

    def __init__(
        self,
        config: MeshConfig,
        log_dir: Path | None = None,
        on_event: Callable[[str], None] = lambda msg: None,
        env: Mapping[str, str] | None = None,
    ):
        """env: more environment variables for the children (e.g. OTEL_EXPORTER_OTLP_ENDPOINT),
        on top of this process's own."""
        self.config = config
        self.on_event = on_event
        self.env = dict(env or {})
        self._tmp = tempfile.TemporaryDirectory(prefix="moemesh-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name)
        self.children: list[_Child] = []
        self.router: _Child | None = None

    def _spawn(self, name: str, args: list[str]) -> _Child:
        ready = Path(self._tmp.name) / f"{name}.ready.json"
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - owned by the child
        cmd = [sys.executable, "-m", "moemesh.deploy.cli", *args, "--ready-file", str(ready)]
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        return _Child(name, proc, ready)

    def _metrics_args(self, offset: int) -> list[str]:
        port = self.config.metrics_port
        return ["--metrics-port", str(port + offset)] if port else []

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
        spec = open_source(cfg.model).spec
        common = [
            "--model",
            str(cfg.model),
            "--host",
            cfg.host,
            "--max-message-mb",
            str(cfg.max_message_bytes // (1024 * 1024)),
        ]
        try:
            # Split the cores: one share per expert host and one for the router.
            threads = str(max(1, (os.cpu_count() or 1) // (cfg.num_hosts + 1)))
            for i, experts in enumerate(contiguous_placement(spec, cfg.num_hosts)):
                self.on_event(f"starting expert host host-{i} with experts {format_experts(experts)}")
                self.children.append(
                    self._spawn(
                        f"host-{i}",
                        [
                            "serve-expert",
                            *common,
                            "--host-id",
                            f"host-{i}",
                            "--experts",
                            format_experts(experts),
                            "--device",
                            cfg.device,
                            "--dtype",
                            cfg.dtype,
                            "--port",
                            "0",
                            "--threads",
                            threads,
                            *self._metrics_args(1 + i),
                        ],
                    )
                )
            self._wait_ready(self.children, timeout)
            addresses = ",".join(c.info["address"] for c in self.children)
            self.on_event("starting router")
            self.router = self._spawn(
                "router",
                [
                    "serve-router",
                    *common,
                    "--experts-at",
                    addresses,
                    "--port",
                    str(cfg.router_port),
                    "--threads",
                    threads,
                    *self._metrics_args(0),
                ],
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

    def __enter__(self) -> ProcessMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
