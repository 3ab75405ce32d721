"""The cluster a placement is planned for: node groups, the devices they offer, and cluster files.

```
cluster file (YAML/JSON) --ClusterFile (validated schema)-->  ClusterSpec (node groups)
ray.nodes() --cluster_from_ray_resources (discovery.py)-->    ClusterSpec
ClusterSpec + accelerator table --devices-->                  DeviceSlot per device (speed, usable memory)
```

A cluster file is `{name?, reserve_fraction?, accelerators?, nodes: [{name, accelerator, count?,
devices_per_node?, memory_gb?, cpus?, node_id?, resource?}, ...]}`; see deploy/clusters/ for
examples. `accelerators` adds entries to, or changes entries of, the accelerator table
(accelerators.py). Every problem in a file is reported as a ValueError that names the file and
the field as a path into it (`nodes[1].count`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .accelerators import GB, KNOWN_ACCELERATORS, Accelerator, lookup_accelerator, merge_accelerators

DEFAULT_RESERVE_FRACTION = 0.10
CLUSTERS_DIR = Path(__file__).resolve().parent / "clusters"

# The Ray resource one device of each kind takes (Ray's Intel GPU manager also uses "GPU").
_RESOURCE_BY_KIND: Mapping[str, str | None] = {"gpu": "GPU", "xpu": "GPU", "hpu": "HPU", "cpu": None}

# Memory kept free on every device for the runtime (CUDA context), activations and request buffers.
ReserveFraction = Annotated[float, Field(strict=True, ge=0.0, lt=1.0, allow_inf_nan=False)]


class NodeGroup(BaseModel):
    """`count` identical nodes, each with `devices_per_node` devices of one accelerator type.

    One entry of a cluster file's `nodes` list; discovery builds the same from a live Ray cluster.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(strict=True, min_length=1)
    count: int = Field(1, strict=True, ge=1)
    accelerator: str = Field(strict=True, min_length=1)  # key or alias in the accelerator table
    devices_per_node: int = Field(1, strict=True, ge=1)
    # Per device; None = the accelerator table's memory.
    memory_gb: float | None = Field(None, strict=True, gt=0, allow_inf_nan=False)
    cpus: int | None = Field(None, strict=True, ge=0)  # CPU cores per node (informational)
    node_id: str | None = Field(None, strict=True)  # Ray node id, when read from a live cluster
    # Ray resource one device takes; None = by kind ("GPU", "HPU", none for CPU).
    resource: str | None = Field(None, strict=True)


@dataclass(frozen=True)
class DeviceSlot:
    """One device an expert host can run on, with the memory experts may use."""

    node: str
    index: int  # device index on the node
    accelerator: Accelerator
    memory_bytes: int  # usable by experts, after the cluster's reserve fraction
    node_id: str | None = None
    resource: str | None = None  # Ray resource the host's actor requests (one unit), None = CPU only

    @property
    def label(self) -> str:
        """Node and torch device, e.g. "h100-0/cuda:1"."""
        return f"{self.node}/{self.accelerator.torch_device}:{self.index}"

    @property
    def speed(self) -> float:
        return self.accelerator.relative_speed


class ClusterSpec(BaseModel):
    """A cluster as node groups; devices are ordered by group, node, then device index."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(strict=True)
    groups: tuple[NodeGroup, ...] = Field(min_length=1)
    reserve_fraction: ReserveFraction = DEFAULT_RESERVE_FRACTION
    # Entries this cluster adds to or changes in the accelerator table.
    accelerators: tuple[Accelerator, ...] = ()

    @model_validator(mode="after")
    def _groups_are_unique_and_known(self) -> ClusterSpec:
        names = [g.name for g in self.groups]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"cluster {self.name!r}: node group names must be unique; repeated: {duplicates}"
            )
        table = self.table()
        for group in self.groups:
            try:
                lookup_accelerator(group.accelerator, table)
            except KeyError as err:
                raise ValueError(f"cluster {self.name!r}, node group {group.name!r}: {err.args[0]}") from None
        return self

    def table(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Accelerator]:
        """The known accelerators, with this cluster's entries and then `overrides` merged over them."""
        table = merge_accelerators({a.name: a for a in self.accelerators})
        return merge_accelerators(overrides, table) if overrides else table

    def devices(self, accelerators: Mapping[str, Any] | None = None) -> tuple[DeviceSlot, ...]:
        """Every device of the cluster, in device order; `accelerators` overrides the table."""
        table = self.table(accelerators)
        slots = []
        for group in self.groups:
            acc = lookup_accelerator(group.accelerator, table)
            memory = round(group.memory_gb * GB) if group.memory_gb is not None else acc.memory_bytes
            usable = int(memory * (1.0 - self.reserve_fraction))
            resource = group.resource if group.resource is not None else _RESOURCE_BY_KIND[acc.kind]
            for n in range(group.count):
                node = group.name if group.count == 1 else f"{group.name}-{n}"
                for index in range(group.devices_per_node):
                    slots.append(DeviceSlot(node, index, acc, usable, group.node_id, resource))
        return tuple(slots)

    @classmethod
    def from_dict(cls, data: Any, source: str = "cluster") -> ClusterSpec:
        """Parse the cluster file schema (ClusterFile); the name defaults to `source`'s stem.

        Raises ValueError naming `source` and the field (`nodes[2].count`) for anything malformed
        or unknown.
        """
        try:
            return ClusterFile.model_validate(data).to_spec(default_name=Path(source).stem)
        except ValidationError as err:
            raise ValueError(f"{source}: {_explain(err)}") from None

    def to_dict(self) -> dict[str, Any]:
        """The form `from_dict` reads (fields left at their defaults are omitted)."""
        nodes = []
        for g in self.groups:
            item = g.model_dump(exclude_none=True)
            if item["devices_per_node"] == 1:
                del item["devices_per_node"]
            nodes.append(item)
        out: dict[str, Any] = {"name": self.name, "reserve_fraction": self.reserve_fraction, "nodes": nodes}
        if self.accelerators:
            out["accelerators"] = {
                a.name: {
                    "vendor": a.vendor,
                    "kind": a.kind,
                    "relative_speed": a.relative_speed,
                    "memory_bytes": a.memory_bytes,
                    "torch_device": a.torch_device,
                }
                for a in self.accelerators
            }
        return out


class ClusterFile(BaseModel):
    """The schema of a cluster file (YAML or JSON); `to_spec` turns it into a ClusterSpec."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, strict=True)  # None or empty = the file's stem
    reserve_fraction: ReserveFraction = DEFAULT_RESERVE_FRACTION
    # Accelerator table overrides, name -> fields, as `merge_accelerators` reads them.
    accelerators: dict[str, dict[str, Any]] | None = None
    nodes: list[NodeGroup] = Field(min_length=1)

    @field_validator("accelerators")
    @classmethod
    def _overrides_merge(cls, value: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        merge_accelerators(value)  # ValueError naming the entry (`accelerators.MyNPU: ...`)
        return value

    def to_spec(self, default_name: str = "cluster") -> ClusterSpec:
        """The ClusterSpec this file describes; ValidationError if its node groups clash or are unknown."""
        return ClusterSpec(
            name=self.name or default_name,
            groups=tuple(self.nodes),
            reserve_fraction=self.reserve_fraction,
            accelerators=overridden_accelerators(merge_accelerators(self.accelerators)),
        )


# Keys a cluster file may hold at each level, for "unknown key" messages.
_KNOWN_KEYS: Mapping[tuple[str, ...], tuple[str, ...]] = {
    (): tuple(ClusterFile.model_fields),
    ("nodes",): tuple(NodeGroup.model_fields),
}


def _path(loc: Sequence[str | int]) -> str:
    """A pydantic error location as a path into the file: ("nodes", 1, "count") -> "nodes[1].count"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(err: ValidationError) -> str:
    """Every problem pydantic found, each as "<field path>: <what is wrong>", joined by "; "."""
    problems = []
    for e in err.errors(include_url=False):
        loc, kind, value = tuple(e["loc"]), e["type"], e.get("input")
        where = _path(loc)
        if kind == "extra_forbidden":
            where = _path(loc[:-1])
            known = _KNOWN_KEYS.get(tuple(p for p in loc[:-1] if isinstance(p, str)), ())
            text = f"unknown key {loc[-1]!r}; known: {list(known)}"
        elif kind == "missing":
            text = "required"
        elif kind in ("model_type", "dict_type"):
            text = f"expected a mapping, got {type(value).__name__}"
        elif kind == "too_short":
            text = "must be a non-empty list"
        elif kind == "value_error":
            # Raised by our validators, whose messages name the field or group themselves.
            where, text = "", str(e["ctx"]["error"])
        else:
            text = f"{e['msg'][:1].lower()}{e['msg'][1:]}, got {value!r}"
        problems.append(f"{where}: {text}" if where else text)
    return "; ".join(problems)


def overridden_accelerators(table: Mapping[str, Accelerator]) -> tuple[Accelerator, ...]:
    """The entries of `table` that KNOWN_ACCELERATORS lacks or has otherwise, by name."""
    return tuple(a for name, a in sorted(table.items()) if KNOWN_ACCELERATORS.get(name) != a)


def bundled_clusters() -> list[str]:
    """Names of the example cluster files shipped in deploy/clusters/ ("mixed-gpu", ...)."""
    return sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml"))


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read a cluster description from a YAML or JSON file, or a bundled example by name ("mixed-gpu")."""
    p = Path(path)
    if not p.is_file() and (CLUSTERS_DIR / f"{path}.yaml").is_file():
        p = CLUSTERS_DIR / f"{path}.yaml"
    if not p.is_file():
        raise FileNotFoundError(
            f"cluster file {str(path)!r} does not exist; bundled examples: {', '.join(bundled_clusters())}"
        )
    return ClusterSpec.from_dict(_read_mapping(p), source=str(p))


def _read_mapping(p: Path) -> Any:
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        return json.loads(text)
    try:
        import yaml
    except ImportError as err:
        raise RuntimeError(f"reading {p} needs PyYAML (pip install pyyaml), or give a .json file") from err
    return yaml.safe_load(text)


def load_accelerator_overrides(path: str | Path) -> dict[str, Any]:
    """Accelerator table overrides from YAML/JSON: `{NAME: {relative_speed: .., memory_gb: ..}}`,
    at the top level or under `accelerators:` (so a cluster file works too). Checked at once."""
    data = _read_mapping(Path(path)) or {}
    overrides = data.get("accelerators", data) if isinstance(data, Mapping) else None
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{path}: expected a mapping of accelerator names to fields")
    merge_accelerators(overrides)  # raises ValueError naming a bad entry
    return dict(overrides)
