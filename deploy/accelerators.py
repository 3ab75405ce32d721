"""The table of accelerators the placement planner knows: speed relative to an H100, memory, torch device.

Keys are Ray's accelerator type strings where Ray defines them (`ray.util.accelerators`, and the
names Ray's accelerator managers detect on a node: "H100", "AMD-Instinct-MI300X-OAM",
"Intel-GPU-Max-1550", "Intel-GAUDI2"), so a live cluster's `accelerator_type:<key>` resources
resolve without translation; `ACCELERATOR_ALIASES` adds the names people type ("MI300X", "Gaudi2").

One entry is one device as torch and Ray count it: an MI250X card shows up as two GCDs and an
Intel Max 1550 (FLAT mode, the driver default) as two stacks, so those entries describe half a card.

`relative_speed` is the geometric mean of the dense BF16 (FP16 where the chip has no BF16) tensor
throughput ratio and the memory bandwidth ratio against an H100 SXM (989 TFLOPS, 3.35 TB/s), from
vendors' public datasheets. An expert FFN is bandwidth-bound at small batches (every weight is
streamed once per batch) and compute-bound at large ones; the geometric mean weighs both equally.
These are planning estimates, not benchmarks: override them from config with measured figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

GiB = 1024**3
GB = 1000**3

KINDS: tuple[str, ...] = ("gpu", "cpu", "hpu", "xpu")
TORCH_DEVICES: tuple[str, ...] = ("cuda", "xpu", "hpu", "cpu")

# torch device type of each kind of accelerator (AMD GPUs are "cuda" in ROCm builds of torch).
DEFAULT_TORCH_DEVICE: Mapping[str, str] = MappingProxyType(
    {"gpu": "cuda", "xpu": "xpu", "hpu": "hpu", "cpu": "cpu"}
)

# The reference device (relative_speed 1.0): NVIDIA H100 SXM5.
REFERENCE_BF16_TFLOPS = 989.0
REFERENCE_MEMORY_TBPS = 3.35


def speed_from_specs(bf16_tflops: float, memory_tbps: float) -> float:
    """Relative speed of a device from its dense BF16 TFLOPS and memory bandwidth (TB/s); H100 = 1.0."""
    if bf16_tflops <= 0 or memory_tbps <= 0:
        raise ValueError(f"bf16_tflops and memory_tbps must be > 0, got {bf16_tflops}, {memory_tbps}")
    return math.sqrt((bf16_tflops / REFERENCE_BF16_TFLOPS) * (memory_tbps / REFERENCE_MEMORY_TBPS))


@dataclass(frozen=True)
class Accelerator:
    """One kind of device an expert host can run on."""

    name: str  # canonical key in the table (Ray's accelerator type string where Ray has one)
    vendor: str
    kind: str  # "gpu" | "cpu" | "hpu" | "xpu"
    relative_speed: float  # expert FFN throughput relative to an H100 (1.0)
    memory_bytes: int  # device memory (for "cpu": the node's memory unless a cluster says otherwise)
    torch_device: str  # "cuda" | "xpu" | "hpu" | "cpu"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"accelerator {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.torch_device not in TORCH_DEVICES:
            raise ValueError(
                f"accelerator {self.name!r}: torch_device must be one of {TORCH_DEVICES}, got {self.torch_device!r}"
            )
        if not (isinstance(self.relative_speed, (int, float)) and self.relative_speed > 0):
            raise ValueError(
                f"accelerator {self.name!r}: relative_speed must be > 0, got {self.relative_speed!r}"
            )
        if (
            isinstance(self.memory_bytes, bool)
            or not isinstance(self.memory_bytes, int)
            or self.memory_bytes <= 0
        ):
            raise ValueError(
                f"accelerator {self.name!r}: memory_bytes must be an integer > 0, got {self.memory_bytes!r}"
            )


def _gpu(
    name: str, vendor: str, tflops: float, tbps: float, memory_bytes: int, kind: str = "gpu"
) -> Accelerator:
    return Accelerator(
        name=name,
        vendor=vendor,
        kind=kind,
        relative_speed=round(speed_from_specs(tflops, tbps), 4),
        memory_bytes=memory_bytes,
        torch_device=DEFAULT_TORCH_DEVICE[kind],
    )


_TABLE: tuple[Accelerator, ...] = (
    # NVIDIA H100 SXM5 80 GB: 989 TFLOPS dense BF16, 3.35 TB/s HBM3 -> 1.0 (the reference).
    _gpu("H100", "nvidia", 989.0, 3.35, 80 * GB),
    # NVIDIA H200 SXM 141 GB: same compute as H100, 4.8 TB/s HBM3e -> 1.197.
    _gpu("H200", "nvidia", 989.0, 4.8, 141 * GB),
    # NVIDIA A100 SXM4 80 GB: 312 TFLOPS dense BF16, 2.039 TB/s -> 0.438.
    _gpu("A100-80G", "nvidia", 312.0, 2.039, 80 * GB),
    # NVIDIA A100 SXM4 40 GB: 312 TFLOPS dense BF16, 1.555 TB/s -> 0.383.
    _gpu("A100-40G", "nvidia", 312.0, 1.555, 40 * GB),
    # NVIDIA L40S 48 GB: 362 TFLOPS dense BF16 (733 with sparsity), 0.864 TB/s GDDR6 -> 0.307.
    _gpu("L40S", "nvidia", 362.0, 0.864, 48 * GB),
    # NVIDIA A10G 24 GB (AWS G5): ~70 TFLOPS dense BF16, 0.6 TB/s -> 0.113.
    _gpu("A10G", "nvidia", 70.0, 0.6, 24 * GB),
    # NVIDIA T4 16 GB: 65 TFLOPS FP16 tensor (no BF16), 0.32 TB/s -> 0.079.
    _gpu("T4", "nvidia", 65.0, 0.32, 16 * GB),
    # NVIDIA V100 SXM2: 125 TFLOPS FP16 tensor (no BF16), 0.9 TB/s -> 0.184. Ray labels the 16 and
    # 32 GB parts alike; the smaller is assumed so that a plan never overfills one.
    _gpu("V100", "nvidia", 125.0, 0.9, 16 * GB),
    # AMD Instinct MI300X OAM 192 GB: 1307 TFLOPS dense BF16, 5.3 TB/s -> 1.446.
    _gpu("AMD-Instinct-MI300X-OAM", "amd", 1307.0, 5.3, 192 * GB),
    # AMD Instinct MI250X, one GCD (ROCm and Ray count each of the two GCDs as a GPU):
    # 383/2 TFLOPS dense BF16, 3.2/2 TB/s, 128/2 GB -> 0.304.
    _gpu("AMD-Instinct-MI250X", "amd", 191.5, 1.6, 64 * GB),
    # Intel Data Center GPU Max 1550, one stack (FLAT mode shows each of the two stacks as a device):
    # 832/2 TFLOPS BF16 XMX, 3.28/2 TB/s, 128/2 GB -> 0.449.
    _gpu("Intel-GPU-Max-1550", "intel", 416.0, 1.64, 64 * GB, kind="xpu"),
    # Intel Gaudi2 96 GB: 432 TFLOPS BF16 (MME), 2.46 TB/s -> 0.566.
    _gpu("Intel-GAUDI2", "intel", 432.0, 2.46, 96 * GB, kind="hpu"),
    # Intel Gaudi3 128 GB: 1835 TFLOPS BF16 (MME), 3.7 TB/s -> 1.431.
    _gpu("Intel-GAUDI3", "intel", 1835.0, 3.7, 128 * GB, kind="hpu"),
    # A CPU node as one expert host: a 32-core server socket does a few TFLOPS BF16 (more with
    # AMX) at ~0.2-0.3 TB/s, sqrt(0.003 * 0.07) ~= 0.015; 0.02 credits AMX. Memory is the node's,
    # so clusters should say it (`memory_gb`, or Ray's "memory" resource); 64 GiB is a placeholder.
    Accelerator("CPU", "generic", "cpu", 0.02, 64 * GiB, "cpu"),
)

KNOWN_ACCELERATORS: Mapping[str, Accelerator] = MappingProxyType({a.name: a for a in _TABLE})

# Other names for table entries: the names people type, and other Ray type strings that the
# planner treats as the same device.
ACCELERATOR_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        # Ray's NVIDIA detection labels both A100 sizes "A100"; the smaller is assumed (see V100).
        "A100": "A100-40G",
        "MI300X": "AMD-Instinct-MI300X-OAM",
        "AMD-Instinct-MI300X-HF": "AMD-Instinct-MI300X-OAM",
        "MI250X": "AMD-Instinct-MI250X",
        # MI250 (Ray: "AMD-Instinct-MI250X-MI250") has ~5% less compute than MI250X; close enough to plan.
        "MI250": "AMD-Instinct-MI250X",
        "AMD-Instinct-MI250X-MI250": "AMD-Instinct-MI250X",
        "Max-1550": "Intel-GPU-Max-1550",
        "Intel-Max-1550": "Intel-GPU-Max-1550",
        "Gaudi2": "Intel-GAUDI2",
        # Ray's INTEL_GAUDI constant names the family; first-generation Gaudi is not in the table.
        "Intel-GAUDI": "Intel-GAUDI2",
        "Gaudi3": "Intel-GAUDI3",
    }
)


def canonical_name(name: str, table: Mapping[str, Accelerator] | None = None) -> str | None:
    """The table key that `name` stands for (exact key, alias, then either case-insensitively), or None."""
    table = KNOWN_ACCELERATORS if table is None else table
    if name in table:
        return name
    if name in ACCELERATOR_ALIASES and ACCELERATOR_ALIASES[name] in table:
        return ACCELERATOR_ALIASES[name]
    folded = name.casefold()
    for key in sorted(table):
        if key.casefold() == folded:
            return key
    for alias in sorted(ACCELERATOR_ALIASES):
        if alias.casefold() == folded and ACCELERATOR_ALIASES[alias] in table:
            return ACCELERATOR_ALIASES[alias]
    return None


def lookup_accelerator(name: str, table: Mapping[str, Accelerator] | None = None) -> Accelerator:
    """The entry for `name` (key or alias, any case); KeyError listing the known names otherwise."""
    table = KNOWN_ACCELERATORS if table is None else table
    key = canonical_name(name, table)
    if key is None:
        known = sorted(set(table) | {a for a, k in ACCELERATOR_ALIASES.items() if k in table})
        raise KeyError(
            f"unknown accelerator {name!r}; known: {', '.join(known)} "
            f"(add it under `accelerators:` in the cluster file)"
        )
    return table[key]


_FIELDS = {f.name for f in fields(Accelerator)} - {"name"}
_OVERRIDE_KEYS = _FIELDS | {"memory_gb", "bf16_tflops", "memory_tbps"}


def _entry(name: str, value: Mapping[str, Any] | Accelerator, base: Accelerator | None) -> Accelerator:
    """One table entry from an override: a whole Accelerator, or fields over `base` (or a new entry)."""
    if isinstance(value, Accelerator):
        return replace(value, name=name)
    if not isinstance(value, Mapping):
        raise ValueError(f"accelerators.{name}: expected a mapping of fields, got {type(value).__name__}")
    unknown = sorted(set(value) - _OVERRIDE_KEYS)
    if unknown:
        raise ValueError(f"accelerators.{name}: unknown field(s) {unknown}; known: {sorted(_OVERRIDE_KEYS)}")
    values: dict[str, Any] = {k: v for k, v in value.items() if k in _FIELDS}
    if "memory_gb" in value:
        if "memory_bytes" in value:
            raise ValueError(f"accelerators.{name}: give memory_gb or memory_bytes, not both")
        values["memory_bytes"] = round(float(value["memory_gb"]) * GB)
    if "bf16_tflops" in value or "memory_tbps" in value:
        if "relative_speed" in value or not ("bf16_tflops" in value and "memory_tbps" in value):
            raise ValueError(f"accelerators.{name}: give relative_speed, or both bf16_tflops and memory_tbps")
        values["relative_speed"] = speed_from_specs(float(value["bf16_tflops"]), float(value["memory_tbps"]))
    if base is not None:
        return replace(base, **values)
    kind = values.get("kind")
    missing = [k for k in ("kind", "relative_speed", "memory_bytes") if k not in values]
    if missing:
        raise ValueError(
            f"accelerators.{name}: a new accelerator needs kind, relative_speed (or bf16_tflops and "
            f"memory_tbps) and memory_gb; missing {missing}"
        )
    return Accelerator(
        name=name,
        vendor=values.get("vendor", "unknown"),
        kind=kind,
        relative_speed=float(values["relative_speed"]),
        memory_bytes=values["memory_bytes"],
        torch_device=values.get("torch_device", DEFAULT_TORCH_DEVICE.get(kind, "cpu")),
    )


def merge_accelerators(
    overrides: Mapping[str, Mapping[str, Any] | Accelerator] | None,
    base: Mapping[str, Accelerator] | None = None,
) -> dict[str, Accelerator]:
    """`base` (default: KNOWN_ACCELERATORS) with `overrides` merged over it, as a new dict.

    An override keyed by a known name or alias changes the fields it gives of that entry
    (`{"MI300X": {"relative_speed": 1.2}}`); another key adds an entry, which needs `kind`,
    `relative_speed` (or `bf16_tflops` + `memory_tbps`) and `memory_gb` (or `memory_bytes`).
    Overrides apply in sorted key order, so the result does not depend on mapping order.
    """
    table = dict(KNOWN_ACCELERATORS if base is None else base)
    for name in sorted(overrides or {}):
        key = canonical_name(name, table)
        if key is None:
            table[name] = _entry(name, overrides[name], None)
        else:
            table[key] = _entry(key, overrides[name], table[key])
    return table
