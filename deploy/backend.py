"""One interface for every way to run a mesh, and the config they share.

| backend     | class                       | where the servers run                                   |
| ----------- | --------------------------- | ------------------------------------------------------- |
| `embedded`  | `local.EmbeddedMesh`        | this process, on a background event loop                |
| `processes` | `local.ProcessMesh`         | one OS process per expert host and one for the router   |
| `ray`       | `ray_mesh.RayMesh`          | Ray actors, on an embedded local Ray or a cluster       |

Each takes its placement from the planner and is used the same way:

    with make_backend("processes", MeshConfig("tiny-mixtral", num_hosts=3)) as mesh:
        Client(mesh.address).forward(...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from moemesh.protos.wire import DEFAULT_MAX_MESSAGE_BYTES
from moemesh.services.admission import HostLimits, RouterLimits
from moemesh.services.bootstrap import ServerConfig


class Backend(str, Enum):
    EMBEDDED = "embedded"
    PROCESSES = "processes"
    RAY = "ray"


@dataclass(frozen=True)
class MeshConfig:
    """What every backend needs: the model (preset or checkpoint dir), its hosts, device and dtype.

    num_hosts: expert hosts of the local backends (Ray plans from the cluster's devices instead).
    replicas: extra replicas of the hottest experts (None = the planner's default for Ray, none for
    the local backends). metrics_port: 0 = no /metrics; else the router serves it on this port and
    host i on port + 1 + i. env: extra environment for child processes and actors (e.g. OTEL_*).
    host_limits / router_limits: what each expert host queues and what the router takes on before
    answering RESOURCE_EXHAUSTED; max_concurrent_rpcs: calls each server runs at once.
    """

    model: str
    num_hosts: int = 3
    device: str | None = "auto"
    dtype: str = "float32"
    host: str = "127.0.0.1"
    router_port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int = 0
    replicas: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    host_limits: HostLimits = field(default_factory=HostLimits)
    router_limits: RouterLimits = field(default_factory=RouterLimits)
    max_concurrent_rpcs: int | None = ServerConfig.max_concurrent_rpcs


class MeshBackend(Protocol):
    """A whole mesh, started and stopped as one."""

    config: MeshConfig

    def start(self) -> MeshBackend:
        """Start every server; returns once the router serves. Stops what it started on failure."""
        ...

    @property
    def address(self) -> str:
        """The router's host:port."""
        ...

    @property
    def detached(self) -> bool:
        """True when the mesh outlives this process (Ray cluster deployments)."""
        ...

    def alive(self) -> bool:
        """False once the mesh has stopped (a server exited, or `moemesh down` removed it)."""
        ...

    def close(self) -> None:
        """Stop every server this backend started (idempotent)."""
        ...

    def __enter__(self) -> MeshBackend: ...

    def __exit__(self, *exc) -> None: ...


def make_backend(
    kind: Backend | str, config: MeshConfig, on_event: Callable[[str], None] = lambda msg: None
) -> MeshBackend:
    """The backend `kind` for `config` (a `ray_mesh.RayMeshConfig` for Ray-only settings)."""
    kind = Backend(kind)
    if kind is Backend.EMBEDDED:
        from .local import EmbeddedMesh

        return EmbeddedMesh(config, on_event=on_event)
    if kind is Backend.PROCESSES:
        from .local import ProcessMesh

        return ProcessMesh(config, on_event=on_event)
    from .ray_mesh import RayMesh, RayMeshConfig

    if not isinstance(config, RayMeshConfig):
        config = RayMeshConfig(**{f: getattr(config, f) for f in MeshConfig.__dataclass_fields__})
    return RayMesh(config, on_event=on_event)
