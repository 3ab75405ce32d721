"""Placement plans: which device hosts which experts, what each copy serves, and how plans are shown.

```
ModelSpec + ClusterSpec + ExpertLoad --placement_inputs-->  devices, shares, bytes per expert (fit checked)
per-device {expert: load served} --build_plan-->            PlacementPlan (table, JSON, report)
```

The placement algorithm is in lpt.py (`plan_placement`); `round_robin_placement` here is the
baseline it is compared with. The memory model: one routed expert takes
`3 * hidden * intermediate * dtype_bytes` (gate, up and down projections); a device offers its
memory less the cluster's `reserve_fraction`. Shared experts run with the router and are not placed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from moemesh.protos.spec import ExpertKey, ModelSpec, MoELayerSpec, format_experts

from .accelerators import GB
from .cluster import ClusterSpec, DeviceSlot
from .load import ExpertLoad


class PlacementError(ValueError):
    """The experts do not fit the cluster; the message names the shortfall."""


# --------------------------------------------------------------------------------------------
# Memory model
# --------------------------------------------------------------------------------------------


def expert_bytes(layer: MoELayerSpec, dtype_bytes: int = 2) -> int:
    """Bytes of one routed expert's weights: gate and up [I, H], down [H, I]."""
    return 3 * layer.hidden_size * layer.intermediate_size * dtype_bytes


def expert_sizes(spec: ModelSpec, dtype_bytes: float) -> dict[ExpertKey, int]:
    """Bytes of every routed expert, {(layer, expert): bytes}, at `dtype_bytes` per weight."""
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, (int, float)) or dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be > 0, got {dtype_bytes!r}")
    return {
        (ls.layer, e): math.ceil(expert_bytes(ls, 1) * dtype_bytes)
        for ls in spec.layers
        for e in range(ls.num_experts)
    }


def check_fits(
    spec: ModelSpec, cluster: ClusterSpec, slots: Sequence[DeviceSlot], sizes: Mapping[ExpertKey, int]
) -> None:
    """PlacementError naming the shortfall when one copy of every expert cannot fit."""
    need = math.fsum(sizes.values())
    have = sum(s.memory_bytes for s in slots)
    distinct = set(sizes.values())
    # With one expert size (every supported family), memory comes in whole expert slots.
    size = max(distinct)
    room = sum(s.memory_bytes // size for s in slots) if len(distinct) == 1 else None
    if need > have or (room is not None and room < len(sizes)):
        short_experts = len(sizes) - room if room is not None else math.ceil((need - have) / size)
        raise PlacementError(
            f"cluster {cluster.name!r} cannot hold model {spec.name!r}: {len(sizes)} experts of "
            f"{format_bytes(size)} need {format_bytes(int(need))}; its {len(slots)} devices offer "
            f"{format_bytes(have)} after the {cluster.reserve_fraction:.0%} reserve"
            + (f", room for {room} experts" if room is not None else "")
            + f"; short by {short_experts} experts ({format_bytes(short_experts * size)}). "
            f"Add devices or memory, or use a smaller dtype."
        )


def placement_inputs(
    spec: ModelSpec,
    cluster: ClusterSpec,
    load: ExpertLoad | None,
    dtype_bytes: int,
    accelerators: Mapping[str, Any] | None,
) -> tuple[tuple[DeviceSlot, ...], ExpertLoad, dict[ExpertKey, int]]:
    """The devices, the load (default uniform, checked against `spec`) and the bytes of every
    expert; PlacementError if one copy of every expert cannot fit."""
    slots = cluster.devices(accelerators)
    load = ExpertLoad.uniform(spec) if load is None else load
    load.check(spec)
    sizes = expert_sizes(spec, dtype_bytes)
    check_fits(spec, cluster, slots, sizes)
    return slots, load, sizes


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceAssignment:
    """What one device hosts under a plan."""

    slot: DeviceSlot
    experts: tuple[ExpertKey, ...]  # sorted (layer, expert)
    served: tuple[float, ...]  # per hosted expert: the load this copy is planned to serve
    load: float  # sum of `served`
    memory_used: int

    @property
    def time(self) -> float:
        """load / relative speed: the device's estimated busy time."""
        return self.load / self.slot.speed


@dataclass(frozen=True)
class PlacementPlan:
    """Devices and the experts each hosts, with the load each copy serves."""

    model: str
    cluster: str
    method: str  # "lpt" | "round-robin"
    devices: tuple[DeviceAssignment, ...]  # every device of the cluster, in device order
    load: ExpertLoad
    dtype_bytes: int
    expert_bytes: tuple[tuple[int, int], ...]  # (layer, bytes of one expert)
    replica_budget: int = 0  # extra replicas asked for (or the default)
    notes: tuple[str, ...] = field(default=())

    @cached_property
    def _replicas(self) -> dict[ExpertKey, tuple[DeviceSlot, ...]]:
        out: dict[ExpertKey, list[DeviceSlot]] = {key: [] for key, _ in self.load.shares}
        for dev in self.devices:
            for key in dev.experts:
                out[key].append(dev.slot)
        return {key: tuple(slots) for key, slots in out.items()}

    def replicas(self, layer: int, expert: int) -> tuple[DeviceSlot, ...]:
        """Devices that host (layer, expert), in device order."""
        return self._replicas[(layer, expert)]

    @property
    def replica_counts(self) -> dict[ExpertKey, int]:
        """(layer, expert) -> number of copies, sorted by key."""
        return {key: len(slots) for key, slots in sorted(self._replicas.items())}

    @property
    def extra_replicas(self) -> int:
        """Copies beyond one per expert."""
        return sum(len(s) - 1 for s in self._replicas.values())

    @property
    def makespan(self) -> float:
        """The largest device time."""
        return max(dev.time for dev in self.devices)

    @property
    def total_load(self) -> float:
        return math.fsum(dev.load for dev in self.devices)

    @property
    def lower_bound(self) -> float:
        """total load / total speed: the makespan if load could be split freely."""
        return self.total_load / math.fsum(dev.slot.speed for dev in self.devices)

    def hosts(self) -> tuple[DeviceAssignment, ...]:
        """The devices that host at least one expert (one expert host each), in device order."""
        return tuple(dev for dev in self.devices if dev.experts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plan: devices with their experts, and every expert with its replicas."""
        return {
            "model": self.model,
            "cluster": self.cluster,
            "method": self.method,
            "dtype_bytes": self.dtype_bytes,
            "expert_bytes": {str(layer): size for layer, size in self.expert_bytes},
            "makespan": self.makespan,
            "lower_bound": self.lower_bound,
            "total_load": self.total_load,
            "replica_budget": self.replica_budget,
            "extra_replicas": self.extra_replicas,
            "load_source": self.load.source,
            "notes": list(self.notes),
            "devices": [
                {
                    "device": dev.slot.label,
                    "node": dev.slot.node,
                    "node_id": dev.slot.node_id,
                    "index": dev.slot.index,
                    "accelerator": dev.slot.accelerator.name,
                    "relative_speed": dev.slot.speed,
                    "resource": dev.slot.resource,
                    "experts": format_experts(dev.experts) if dev.experts else "",
                    "expert_list": [list(k) for k in dev.experts],
                    "served": list(dev.served),
                    "memory_used_bytes": dev.memory_used,
                    "memory_usable_bytes": dev.slot.memory_bytes,
                    "load": dev.load,
                    "time": dev.time,
                }
                for dev in self.devices
            ],
            "experts": [
                {
                    "layer": layer,
                    "expert": expert,
                    "share": share,
                    "replicas": [s.label for s in self._replicas[(layer, expert)]],
                }
                for (layer, expert), share in self.load.shares
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def to_table(self, max_experts_width: int = 40) -> str:
        """A text table, one row per device, with a header line and a summary line."""
        sizes = sorted({size for _, size in self.expert_bytes})
        size_text = "/".join(format_bytes(s) for s in sizes)
        num_experts = len(self.load.shares)
        lines = [
            f"placement ({self.method}) of {self.model} on cluster {self.cluster}: {num_experts} experts in "
            f"{len(self.expert_bytes)} MoE layer(s), {size_text} each at {self.dtype_bytes} byte(s)/param, "
            f"{len(self.devices)} devices"
        ]
        header = (
            "device",
            "node",
            "accelerator",
            "speed",
            "experts",
            "copies",
            "memory used/avail",
            "est.load",
            "est.time",
        )
        rows = []
        for dev in self.devices:
            experts = format_experts(dev.experts) if dev.experts else "-"
            if len(experts) > max_experts_width:
                experts = experts[: max_experts_width - 3] + "..."
            rows.append(
                (
                    f"{dev.slot.accelerator.torch_device}:{dev.slot.index}",
                    dev.slot.node,
                    dev.slot.accelerator.name,
                    f"{dev.slot.speed:.3f}",
                    experts,
                    str(len(dev.experts)),
                    f"{format_bytes(dev.memory_used)} / {format_bytes(dev.slot.memory_bytes)}",
                    f"{dev.load:.4f}",
                    f"{dev.time:.4f}",
                )
            )
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        right = {3, 5, 6, 7, 8}

        def fmt(row: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
            ).rstrip()

        lines += [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
        replicated = sorted((key, n) for key, n in self.replica_counts.items() if n > 1)
        used = len(self.hosts())
        lines.append(
            f"makespan {self.makespan:.4f} (lower bound {self.lower_bound:.4f}); {used} of {len(self.devices)} "
            f"devices host experts; {self.extra_replicas} extra replica(s) (budget {self.replica_budget})"
        )
        if replicated:
            shown = ", ".join(f"{layer}:{e}x{n}" for (layer, e), n in replicated[:16])
            more = f", ... {len(replicated) - 16} more" if len(replicated) > 16 else ""
            lines.append(f"replicated (layer:expert x copies): {shown}{more}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    """Decimal units, one digit: 352.3 MB, 72.0 GB."""
    for unit, scale in (("GB", GB), ("MB", 1000**2), ("KB", 1000)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def build_plan(
    spec: ModelSpec,
    cluster: ClusterSpec,
    method: str,
    slots: Sequence[DeviceSlot],
    served: Sequence[Mapping[ExpertKey, float]],
    load: ExpertLoad,
    dtype_bytes: int,
    sizes: Mapping[ExpertKey, int],
    budget: int,
    notes: Sequence[str] = (),
) -> PlacementPlan:
    """The plan in which device `slots[d]` hosts the experts of `served[d]`, {(layer, expert): load served}."""
    assert len(served) == len(slots)
    devices = []
    for slot, items in zip(slots, served):
        keys = tuple(sorted(items))
        loads = tuple(items[k] for k in keys)
        memory_used = sum(sizes[k] for k in keys)
        assert memory_used <= slot.memory_bytes, f"{slot.label} over its memory"
        devices.append(
            DeviceAssignment(
                slot=slot,
                experts=keys,
                served=loads,
                # fsum in key order: the same total whatever order the copies arrived in.
                load=math.fsum(loads),
                memory_used=memory_used,
            )
        )
    layer_bytes = tuple((ls.layer, sizes[(ls.layer, 0)]) for ls in spec.layers)
    return PlacementPlan(
        model=spec.name,
        cluster=cluster.name,
        method=method,
        devices=tuple(devices),
        load=load,
        dtype_bytes=dtype_bytes,
        expert_bytes=layer_bytes,
        replica_budget=budget,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------
# The baseline and the comparison
# --------------------------------------------------------------------------------------------


def round_robin_placement(
    spec: ModelSpec,
    cluster: ClusterSpec,
    load: ExpertLoad | None = None,
    dtype_bytes: int = 2,
    accelerators: Mapping[str, Any] | None = None,
) -> PlacementPlan:
    """The baseline: the i-th expert (layer-major) on device i % n, one copy each, blind to speed and load.

    A full device passes its turn to the next one with room (same memory model as plan_placement).
    """
    slots, load, sizes = placement_inputs(spec, cluster, load, dtype_bytes, accelerators)
    share = dict(load.shares)
    free = [s.memory_bytes for s in slots]
    served: list[dict[ExpertKey, float]] = [{} for _ in slots]
    n = len(slots)
    for i, key in enumerate(spec.expert_keys()):
        for step in range(n):
            d = (i + step) % n
            if free[d] >= sizes[key]:
                served[d][key] = share[key]
                free[d] -= sizes[key]
                break
        else:
            raise PlacementError(
                f"cluster {cluster.name!r}: no device has room left for expert {key[0]}:{key[1]}"
            )
    return build_plan(spec, cluster, "round-robin", slots, served, load, dtype_bytes, sizes, 0)


def plan_report(plan: PlacementPlan, baseline: PlacementPlan) -> str:
    """The planned makespan against the baseline's (round-robin), as figures and a ratio."""
    ratio = plan.makespan / baseline.makespan if baseline.makespan > 0 else float("nan")
    speedup = baseline.makespan / plan.makespan if plan.makespan > 0 else float("inf")
    return "\n".join(
        [
            "est. makespan (time of the slowest device; 1.0 = one H100 doing all routed work of one layer):",
            f"  planned ({plan.method}){'':3s} {plan.makespan:10.4f}   (lower bound {plan.lower_bound:.4f})",
            f"  {baseline.method}{'':9s} {baseline.makespan:10.4f}",
            f"  planned / {baseline.method} = {ratio:.3f}  ({baseline.method} takes {speedup:.2f}x as long)",
        ]
    )
