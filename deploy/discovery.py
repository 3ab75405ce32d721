"""A ClusterSpec from a live Ray cluster: which devices each alive node offers to expert hosts.

Ray names devices by resources: "GPU" and "HPU" counts, typed by `accelerator_type:<type>`
resources or the `ray.io/accelerator-type` label. Custom resources named `device:<accelerator>`
stand for devices of that type, one unit per device (how tests simulate a mixed cluster on a CPU
machine, e.g. `ray.init(resources={"device:H100": 2})`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .accelerators import GB, Accelerator, canonical_name, merge_accelerators
from .cluster import DEFAULT_RESERVE_FRACTION, ClusterSpec, NodeGroup, overridden_accelerators

DEVICE_RESOURCE_PREFIX = "device:"
RAY_ACCELERATOR_PREFIX = "accelerator_type:"
RAY_ACCELERATOR_LABEL = "ray.io/accelerator-type"


def _whole(value: Any) -> int:
    """Ray resource quantity -> whole devices (Ray reports floats, e.g. 2.0)."""
    return int(math.floor(float(value) + 1e-9))


def _pick_type(types: Iterable[str], table: Mapping[str, Accelerator], kinds: tuple[str, ...]) -> str | None:
    """The most specific of a node's accelerator type strings that the table knows, of one of `kinds`.

    A node labelled both "A100" (detected) and "A100-80G" (added by hand) is an A100-80G: exact
    table keys beat aliases, then longer names beat shorter ones.
    """
    found = []
    for t in types:
        key = canonical_name(t, table)
        if key is not None and table[key].kind in kinds:
            found.append((t not in table, -len(t), t, key))
    return min(found)[3] if found else None


def cluster_from_ray_resources(
    nodes: Sequence[Mapping[str, Any]],
    *,
    name: str = "ray",
    accelerators: Mapping[str, Any] | None = None,
    device_resources: Mapping[str, str] | None = None,
    include_cpu_nodes: bool = True,
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
) -> ClusterSpec:
    """A ClusterSpec from `ray.nodes()`-style dicts (`NodeID`, `Alive`, `NodeName`, `Resources`, `Labels`).

    Per alive node: "GPU" devices typed by its `accelerator_type:<type>` resources (or the
    `ray.io/accelerator-type` label), "HPU" devices likewise; custom resources named
    `device:<accelerator>`, or listed in `device_resources` (resource name -> accelerator), add that
    many devices of that accelerator (how tests stand in for device types on a CPU machine). A node
    with none of these and at least one CPU is one CPU expert host, with Ray's "memory" resource as
    its memory when present. `accelerators` overrides the table, as in a cluster file.
    Raises ValueError for a node whose device type the table does not know.
    """
    overrides = dict(accelerators or {})
    table = merge_accelerators(overrides)
    device_resources = dict(device_resources or {})
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]

    def base_name(node: Mapping[str, Any]) -> str:
        return str(node.get("NodeName") or node.get("NodeManagerAddress") or node.get("NodeID") or "node")

    alive.sort(key=lambda n: (base_name(n), str(n.get("NodeID") or "")))
    names = [base_name(n) for n in alive]
    groups: list[NodeGroup] = []
    for i, node in enumerate(alive):
        node_id = node.get("NodeID")
        # Local multi-node Ray clusters give every node the same address: make names unique.
        node_name = names[i]
        if names.count(node_name) > 1:
            node_name = f"{node_name}-{str(node_id)[:8]}" if node_id else f"{node_name}-{i}"
        res: Mapping[str, Any] = node.get("Resources") or node.get("resources") or {}
        labels: Mapping[str, Any] = node.get("Labels") or {}
        types = sorted(
            {k[len(RAY_ACCELERATOR_PREFIX) :] for k in res if k.startswith(RAY_ACCELERATOR_PREFIX)}
        )
        if labels.get(RAY_ACCELERATOR_LABEL):
            types = sorted({*types, str(labels[RAY_ACCELERATOR_LABEL])})
        cpus = _whole(res.get("CPU", 0))
        # (accelerator, devices, Ray resource, memory_gb) per kind of device on the node
        found: list[tuple[str, int, str | None, float | None]] = []
        for resource, kinds in (("GPU", ("gpu", "xpu")), ("HPU", ("hpu",))):
            count = _whole(res.get(resource, 0))
            if count:
                acc = _pick_type(types, table, kinds)
                if acc is None:
                    raise ValueError(
                        f"Ray node {node_name}: {count} {resource} device(s) with accelerator type(s) "
                        f"{types or 'none reported'}, none of which the accelerator table knows as {'/'.join(kinds)}; "
                        f"add the type under `accelerators`"
                    )
                found.append((acc, count, resource, None))
        for resource in sorted(res):
            if resource in device_resources or resource.startswith(DEVICE_RESOURCE_PREFIX):
                acc_name = device_resources.get(resource, resource[len(DEVICE_RESOURCE_PREFIX) :])
                acc = canonical_name(acc_name, table)
                if acc is None:
                    raise ValueError(
                        f"Ray node {node_name}: resource {resource!r} names unknown accelerator {acc_name!r}"
                    )
                count = _whole(res[resource])
                memory_gb = None
                if table[acc].kind == "cpu" and res.get("memory"):
                    memory_gb = float(res["memory"]) / GB / max(count, 1)
                if count:
                    found.append((acc, count, resource, memory_gb))
        if not found and include_cpu_nodes and cpus >= 1:
            memory_gb = float(res["memory"]) / GB if res.get("memory") else None
            found.append((canonical_name("CPU", table) or "CPU", 1, None, memory_gb))
        for acc, count, resource, memory_gb in found:
            groups.append(
                NodeGroup(
                    name=node_name if len(found) == 1 else f"{node_name}/{acc}",
                    count=1,
                    accelerator=acc,
                    devices_per_node=count,
                    memory_gb=memory_gb,
                    cpus=cpus,
                    node_id=str(node_id) if node_id else None,
                    resource=resource,
                )
            )
    if not groups:
        raise ValueError(f"cluster {name!r}: no alive Ray node offers a device or a CPU to host experts")
    return ClusterSpec(
        name=name,
        groups=tuple(groups),
        reserve_fraction=reserve_fraction,
        accelerators=overridden_accelerators(table),
    )
