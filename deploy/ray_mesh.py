"""The mesh on Ray: one actor per expert host (one device each), one router actor.

    RayMesh.start():
        ray.init (embedded local instance, or the cluster at `address`)
        read the cluster's devices ─▶ plan placement (speed- and memory-aware, hot experts replicated)
        ─▶ print the plan ─▶ start ExpertHostActors (each starts an Expert gRPC server on its node,
        port chosen at start) ─▶ start the RouterActor (discovers the hosts, builds the routing table)

Failover: a host actor that dies is restarted by Ray (`max_restarts`), reloads its experts, starts
a new server and re-registers with the router, which routes to it again. Meanwhile the router
retries the dead host's segments on other replicas. A host whose device stops working exits so
that Ray restarts it.

Clients find the router by name: `find_router()` returns its gRPC address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from moemesh.experts.device import device_healthy
from moemesh.protos.spec import dtype_info
from moemesh.services.bootstrap import ServerConfig
from moemesh.services.launch import ExpertHostConfig, RouterConfig, start_expert_host, start_router
from moemesh.services.telemetry import (
    HOST_ATTRIBUTE,
    Telemetry,
    TelemetryConfig,
    flush_tracing,
    start_telemetry,
)

from .backend import MeshConfig
from .cluster import ClusterSpec
from .discovery import cluster_from_ray_resources
from .local import LoopThread
from .lpt import plan_placement
from .plan import PlacementPlan
from .plan_command import model_spec

log = logging.getLogger(__name__)

NAMESPACE = "moemesh"
ROUTER_NAME = "moemesh-router"
HOST_PREFIX = "moemesh-host-"


@dataclass(frozen=True)
class RayMeshConfig(MeshConfig):
    """`MeshConfig` plus how to deploy on Ray. With `address=None` an embedded local Ray instance is
    started.

    num_cpus / resources: the embedded instance's resources (custom resources named
    `device:<accelerator>` stand for devices on a CPU-only machine). device: torch device for every
    host (None = the accelerator's own, e.g. cuda for H100). max_restarts: how often Ray restarts a
    dead host. Placement comes from the cluster's devices (`num_hosts` is not used).
    """

    device: str | None = None
    address: str | None = None
    namespace: str = NAMESPACE
    num_cpus: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    cluster: ClusterSpec | None = None
    max_restarts: int = 3
    threads_per_host: int = 1
    health_interval_s: float = 5.0
    accelerators: Mapping[str, Any] = field(default_factory=dict)  # overrides of the accelerator table


def start_local_ray(num_cpus: int | None, resources: Mapping[str, float], namespace: str = NAMESPACE) -> None:
    """Start an embedded local Ray instance, tried twice: on a loaded small machine the raylet
    can miss Ray's fixed 30 s registration window ("The current node timed out during startup")."""
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=num_cpus,
                resources=dict(resources),
                namespace=namespace,
                include_dashboard=False,
                log_to_driver=False,
            )
            return
        except Exception as err:
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
            log.warning("local Ray did not start in time; trying once more")
            ray.shutdown()


def _advertised_host(bind: str) -> str:
    return ray.util.get_node_ip_address() if bind == "0.0.0.0" else bind


class DeviceWatchdog(threading.Thread):
    """Exits the process when its device stops working, so that Ray restarts the actor.

    A host whose process lives on with a broken device would keep failing every call; exiting
    turns that into the failure Ray knows how to handle.
    """

    EXIT_CODE = 70

    def __init__(
        self,
        check: Callable[[], bool],
        interval_s: float,
        exit_fn: Callable[[int], None] = os._exit,
    ):
        super().__init__(name="moemesh-device-watchdog", daemon=True)
        self.check, self.interval_s, self.exit_fn = check, interval_s, exit_fn
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            if not self.check():
                log.error("device failed its health check; exiting so Ray restarts this host")
                self.exit_fn(self.EXIT_CODE)
                return

    def stop(self) -> None:
        self._stopping.set()


def _telemetry(service: str, bind: str, metrics_port: int, host_id: str | None = None) -> Telemetry:
    """Each actor is its own process: it configures its tracing (from OTEL_*) and metrics once."""
    resource = ((HOST_ATTRIBUTE, host_id),) if host_id else ()
    return start_telemetry(TelemetryConfig(service, resource, bind, metrics_port))


class ExpertHostActor:
    """A Ray actor that serves some experts over gRPC on its node (one device)."""

    def __init__(
        self,
        config: ExpertHostConfig,
        namespace: str,
        threads: int,
        health_interval_s: float,
        metrics_port: int = 0,
    ):
        torch.set_num_threads(threads)
        self.config = config
        telemetry = _telemetry("moemesh-expert", config.server.host, metrics_port, config.host_id)
        self._loop = LoopThread("moemesh-host")
        self._host = self._loop.call(start_expert_host(config, telemetry=telemetry))
        self._address = f"{_advertised_host(config.server.host)}:{self._host.server.port}"
        device = self._host.servicer.bank.device
        self._watchdog = DeviceWatchdog(lambda: device_healthy(device), health_interval_s)
        self._watchdog.start()
        self._register(namespace)

    def _register(self, namespace: str) -> None:
        """After a restart the router exists and must learn the new address; at first start it does not."""
        try:
            router = ray.get_actor(ROUTER_NAME, namespace=namespace)
        except ValueError:
            return
        ray.get(router.register_host.remote(self._address), timeout=60)

    def address(self) -> str:
        return self._address

    def stop(self) -> None:
        """Drain the server and flush this process's spans, before Ray kills the actor (a killed
        process never runs its exit hooks, and the batched spans would be lost)."""
        self._watchdog.stop()
        self._loop.call(self._host.stop(0.5), timeout=30)
        flush_tracing()

    def describe(self) -> dict:
        servicer = self._host.servicer
        return {
            "host_id": self.config.host_id,
            "address": self._address,
            "node": self.config.node,
            "device": str(servicer.bank.device),
            "experts": servicer.bank.experts,
            "rows_served": servicer.rows_served,
            "pid": os.getpid(),
        }


class RouterActor:
    """A Ray actor that serves the router; the hosts' current addresses are looked up by name."""

    def __init__(
        self, config: RouterConfig, host_names: list[str], namespace: str, threads: int, metrics_port: int = 0
    ):
        torch.set_num_threads(threads)
        telemetry = _telemetry("moemesh-router", config.server.host, metrics_port)
        # On a restart the hosts may have moved: ask each host actor for its address now.
        addresses = ray.get([ray.get_actor(n, namespace=namespace).address.remote() for n in host_names])
        config = dataclasses.replace(config, hosts=tuple(addresses))
        self._loop = LoopThread("moemesh-router")
        self._router = self._loop.call(start_router(config, telemetry=telemetry))
        self._address = f"{_advertised_host(config.server.host)}:{self._router.server.port}"

    def address(self) -> str:
        return self._address

    def stop(self) -> None:
        """See ExpertHostActor.stop."""
        self._loop.call(self._router.stop(0.5), timeout=30)
        flush_tracing()

    def register_host(self, address: str) -> str:
        return self._loop.call(self._router.register_host(address), timeout=60).host_id


def find_router(address: str | None = "auto", namespace: str = NAMESPACE) -> str:
    """The router's gRPC address, found through its Ray name (connects to Ray if needed)."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    router = ray.get_actor(ROUTER_NAME, namespace=namespace)
    return ray.get(router.address.remote(), timeout=30)


def _actor_options(slot, name: str, config: RayMeshConfig, detached: bool) -> dict:
    options: dict = {
        "name": name,
        "namespace": config.namespace,
        "max_restarts": config.max_restarts,
        "max_task_retries": 0,
        "num_cpus": config.threads_per_host if slot.resource is None else 0,
    }
    if slot.resource == "GPU":
        options["num_gpus"] = 1
    elif slot.resource is not None:
        options["resources"] = {slot.resource: 1}
    if slot.node_id:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.node_id, soft=False)
    if detached:
        options["lifetime"] = "detached"
    if config.env:
        options["runtime_env"] = {"env_vars": dict(config.env)}
    return options


class RayMesh:
    """Deploys (start) and removes (close) a whole mesh on Ray (a `MeshBackend`)."""

    def __init__(self, config: RayMeshConfig, on_event: Callable[[str], None] = lambda msg: None):
        self.config = config
        self.on_event = on_event
        self.plan: PlacementPlan | None = None
        self.host_names: list[str] = []
        # Handles keep non-detached actors alive: Ray collects an actor whose handles are all gone.
        self._handles: list = []
        self._started_ray = False
        self._address: str | None = None

    @property
    def embedded(self) -> bool:
        return self.config.address is None

    @property
    def detached(self) -> bool:
        """A mesh on a Ray cluster outlives `moemesh up`; `moemesh down` removes it."""
        return not self.embedded

    def alive(self) -> bool:
        return ray.is_initialized() and ROUTER_NAME in mesh_actor_names(self.config.namespace)

    def _init_ray(self) -> None:
        cfg = self.config
        if ray.is_initialized():
            return
        if self.embedded:
            start_local_ray(cfg.num_cpus, cfg.resources, cfg.namespace)
        else:
            ray.init(address=cfg.address, namespace=cfg.namespace, log_to_driver=False)
        self._started_ray = True

    def make_plan(self) -> PlacementPlan:
        cfg = self.config
        overrides = dict(cfg.accelerators)
        cluster = cfg.cluster or cluster_from_ray_resources(ray.nodes(), accelerators=overrides)
        dtype_bytes = dtype_info(cfg.dtype).itemsize
        return plan_placement(
            model_spec(cfg.model),
            cluster,
            replicas_budget=cfg.replicas,
            dtype_bytes=dtype_bytes,
            accelerators=overrides,
        )

    def start(self, timeout_s: float = 300.0) -> RayMesh:
        self._init_ray()
        try:
            self.plan = self.make_plan()
            self.on_event("placement plan:\n" + self.plan.to_table())
            self._start_actors(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def _start_actors(self, timeout_s: float) -> None:
        cfg = self.config
        bind = "127.0.0.1" if self.embedded else "0.0.0.0"
        server = ServerConfig(bind, 0, cfg.max_message_bytes, max_concurrent_rpcs=cfg.max_concurrent_rpcs)
        host_cls = ray.remote(ExpertHostActor)
        hosts = []
        for i, assignment in enumerate(self.plan.hosts()):
            slot = assignment.slot
            name = f"{HOST_PREFIX}{i}"
            host_cfg = ExpertHostConfig(
                model=cfg.model,
                host_id=f"host-{i}",
                experts=assignment.experts,
                device=cfg.device or slot.accelerator.torch_device,
                dtype=cfg.dtype,
                server=server,
                node=slot.node,
                relative_speed=slot.speed,
                limits=cfg.host_limits,
            )
            options = _actor_options(slot, name, cfg, detached=not self.embedded)
            host_metrics = cfg.metrics_port + 1 + i if cfg.metrics_port else 0
            hosts.append(
                host_cls.options(**options).remote(
                    host_cfg, cfg.namespace, cfg.threads_per_host, cfg.health_interval_s, host_metrics
                )
            )
            self.host_names.append(name)
            self.on_event(
                f"starting {name} on {slot.label} ({slot.accelerator.name}) with {len(assignment.experts)} experts"
            )
        self._handles.extend(hosts)
        addresses = ray.get([h.address.remote() for h in hosts], timeout=timeout_s)
        for name, address in zip(self.host_names, addresses):
            self.on_event(f"{name} serving at {address}")

        router_cfg = RouterConfig(
            cfg.model,
            tuple(addresses),
            server=ServerConfig(
                bind, cfg.router_port, cfg.max_message_bytes, max_concurrent_rpcs=cfg.max_concurrent_rpcs
            ),
            limits=cfg.router_limits,
        )
        router_options = {
            "name": ROUTER_NAME,
            "namespace": cfg.namespace,
            "max_restarts": cfg.max_restarts,
            "num_cpus": 0,
        }
        if cfg.env:
            router_options["runtime_env"] = {"env_vars": dict(cfg.env)}
        if not self.embedded:
            router_options["lifetime"] = "detached"
        router = (
            ray.remote(RouterActor)
            .options(**router_options)
            .remote(router_cfg, self.host_names, cfg.namespace, cfg.threads_per_host, cfg.metrics_port)
        )
        self._handles.append(router)
        self._address = ray.get(router.address.remote(), timeout=timeout_s)
        self.on_event(f"router serving at {self._address}")

    @property
    def address(self) -> str:
        assert self._address is not None, "mesh not started"
        return self._address

    def host(self, index: int):
        return ray.get_actor(self.host_names[index], namespace=self.config.namespace)

    def close(self) -> None:
        if ray.is_initialized():
            remove(self.config.namespace)
        self._handles.clear()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> RayMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def mesh_actor_names(namespace: str = NAMESPACE) -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"]
        for a in names
        if a.get("namespace") == namespace and (a["name"] == ROUTER_NAME or a["name"].startswith(HOST_PREFIX))
    )


def remove(namespace: str = NAMESPACE, wait_s: float = 30.0) -> list[str]:
    """Stop the router and every host actor of the mesh (drained, spans flushed), then kill them
    (no restarts); returns the names removed."""
    removed, names = [], mesh_actor_names(namespace)
    stops = []
    for name in sorted(names, key=lambda n: n != ROUTER_NAME):  # the router first: it drains
        with contextlib.suppress(ValueError):
            stops.append(ray.get_actor(name, namespace=namespace).stop.remote())
    with contextlib.suppress(Exception):  # a dead or stuck actor is killed all the same
        ray.get(stops, timeout=wait_s)
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
            removed.append(name)
        except ValueError:
            pass
    deadline = time.monotonic() + wait_s
    while mesh_actor_names(namespace) and time.monotonic() < deadline:
        time.sleep(0.2)
    return removed
