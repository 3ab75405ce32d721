"""Prometheus metrics of one moemesh process: one `Metrics` object, one registry, no globals.

The entry point builds one `Metrics` per process and hands it to the servers it starts (through
`moemesh.services.telemetry.Telemetry`); tests build their own, so nothing is shared between
them. `serve(host, port)` exposes `/metrics` over HTTP (port 0 binds any free port; limits on
connections and idle clients in `metrics_http`).

| metric | type | labels | what |
| --- | --- | --- | --- |
| moemesh_rpc_requests_total | counter | service, method, code | RPCs handled by this process's servers, by final status (rejected requests included) |
| moemesh_rpc_duration_seconds | histogram | service, method | server-side time of each RPC, from the decoded request to the reply |
| moemesh_forward_tokens_total | counter | layer | tokens that entered a router forward (gated) |
| moemesh_tokens_routed_total | counter | layer, expert | rows the router sent to each expert (tokens × k for top-k) |
| moemesh_load_balance_ratio | gauge | layer | max over mean tokens per expert over the last `balance_window` forwards (1 = even) |
| moemesh_compute_batch_rows | histogram | | rows per expert-host compute round (the concurrent Compute calls merged into it) |
| moemesh_queue_depth | gauge | | compute calls on this host waiting for or running in a compute round |
| moemesh_queue_wait_seconds | histogram | | time from a decoded Compute request until its compute round starts |
| moemesh_wire_bytes_total | counter | direction | serialized request (`received`) and reply (`sent`) bytes of this process's moemesh RPCs |
| moemesh_device_memory_bytes | gauge | device | memory in use on the device (torch's allocator on accelerators; the expert weights on CPU) |
| moemesh_gpu_temperature_celsius | gauge | gpu, uuid | GPU temperature, from NVML, only where NVML and a GPU exist |
| moemesh_gpu_utilization_ratio | gauge | gpu, uuid | GPU busy fraction over NVML's last sample period (0-1), same condition |
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .metrics_http import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS, MetricsServer, serve_registry

log = logging.getLogger(__name__)

RPC_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
QUEUE_SECONDS_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
ROWS_BUCKETS = tuple(float(2**i) for i in range(17))  # 1 .. 65536 rows
DEFAULT_BALANCE_WINDOW = 32


class Metrics:
    """Every moemesh metric, registered in one registry (a new one unless given)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, balance_window: int = DEFAULT_BALANCE_WINDOW
    ):
        assert balance_window >= 1, balance_window
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        counter, gauge, histogram = (
            functools.partial(kind, registry=r) for kind in (Counter, Gauge, Histogram)
        )
        self.rpc_requests = counter(
            "moemesh_rpc_requests",
            "RPCs handled by this process's servers, by final gRPC status code",
            ["service", "method", "code"],
        )
        self.rpc_duration = histogram(
            "moemesh_rpc_duration_seconds",
            "Server-side duration of an RPC, from the decoded request to the reply",
            ["service", "method"],
            buckets=RPC_SECONDS_BUCKETS,
        )
        self.forward_tokens = counter(
            "moemesh_forward_tokens", "Tokens gated by the router's forwards", ["layer"]
        )
        self.tokens_routed = counter(
            "moemesh_tokens_routed",
            "Rows the router sent to each expert (a token counts once per expert it is routed to)",
            ["layer", "expert"],
        )
        self.load_balance_ratio = gauge(
            "moemesh_load_balance_ratio",
            f"Max over mean tokens per expert of a layer, summed over its last {balance_window} "
            "forwards (1 = perfectly even; the number of experts = all on one expert)",
            ["layer"],
        )
        self.compute_batch_rows = histogram(
            "moemesh_compute_batch_rows",
            "Rows per expert-host compute round (concurrent Compute calls merged into one)",
            buckets=ROWS_BUCKETS,
        )
        self.queue_depth = gauge(
            "moemesh_queue_depth", "Compute calls on this host waiting for or running in a compute round"
        )
        self.queue_wait = histogram(
            "moemesh_queue_wait_seconds",
            "Time from a decoded Compute request until its compute round starts",
            buckets=QUEUE_SECONDS_BUCKETS,
        )
        self.wire_bytes = counter(
            "moemesh_wire_bytes",
            "Serialized message bytes of this process's moemesh RPCs: requests received, replies sent",
            ["direction"],
        )
        self.device_memory = _DeviceMemoryCollector()
        r.register(self.device_memory)
        self._gpus: _NvmlCollector | None = None
        self._balance_window = balance_window
        self._balance: dict[int, _LoadWindow] = {}
        self._lock = threading.Lock()

    # -- recording ----------------------------------------------------------------------------------

    def observe_rpc(self, service: str, method: str, code: str, seconds: float) -> None:
        """One finished RPC: `code` is the gRPC status name (OK, INVALID_ARGUMENT, ...)."""
        self.rpc_requests.labels(service, method, code).inc()
        self.rpc_duration.labels(service, method).observe(seconds)

    def observe_wire(self, received: int, sent: int) -> None:
        if received:
            self.wire_bytes.labels("received").inc(received)
        if sent:
            self.wire_bytes.labels("sent").inc(sent)

    def observe_routing(self, layer: int, tokens: int, tokens_per_expert: Sequence[int]) -> None:
        """One forward's routing: `tokens_per_expert[e]` rows went to expert e (every expert listed)."""
        name = str(layer)
        self.forward_tokens.labels(name).inc(tokens)
        with self._lock:
            window = self._balance.get(layer)
            if window is None or window.num_experts != len(tokens_per_expert):
                window = self._balance[layer] = _LoadWindow(len(tokens_per_expert), self._balance_window)
                # Every expert's series exists from the first forward on: an unused expert shows
                # as 0 rather than as absent (and a mean over experts counts it).
                window.routed = [self.tokens_routed.labels(name, str(e)) for e in range(window.num_experts)]
            ratio = window.add(tokens_per_expert)
            routed = window.routed
        for child, count in zip(routed, tokens_per_expert):
            if count:
                child.inc(count)
        self.load_balance_ratio.labels(name).set(ratio)

    def observe_queue_wait(self, queue_wait_s: float) -> None:
        """One compute call started after `queue_wait_s` in the queue."""
        self.queue_wait.observe(max(0.0, queue_wait_s))

    def observe_round(self, rows: int) -> None:
        """One compute round started, over `rows` rows of one or more merged calls."""
        self.compute_batch_rows.observe(rows)

    def track_device(self, device: torch.device, weight_bytes: Callable[[], int]) -> None:
        """Report memory in use on `device` (and its GPUs' temperature and utilisation, where NVML
        works). `weight_bytes` is what a CPU device reports: torch keeps no per-device count there."""
        device = torch.device(device)
        self.device_memory.track(device, weight_bytes)
        if device.type == "cuda" and self._gpus is None:
            gpus = _NvmlCollector.open()
            if gpus is not None:
                self._gpus = gpus
                self.registry.register(gpus)

    # -- exposition ---------------------------------------------------------------------------------

    def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> MetricsServer:
        """Serve `/metrics` on a daemon thread; port 0 binds any free port (read `.port` back).
        A client has `idle_timeout_s` to send its request; `max_connections` are served at once
        and more get 503 (see `metrics_http.serve_registry`)."""
        return serve_registry(self.registry, host, port, idle_timeout_s, max_connections)

    def exposed_names(self) -> frozenset[str]:
        """Every sample name these metrics can expose (`_total`, `_bucket`, `_sum`, `_count` included),
        whether or not a sample exists yet: what dashboards and alerts may reference."""
        names: set[str] = set()
        for metric in (
            self.rpc_requests,
            self.rpc_duration,
            self.forward_tokens,
            self.tokens_routed,
            self.load_balance_ratio,
            self.compute_batch_rows,
            self.queue_depth,
            self.queue_wait,
            self.wire_bytes,
        ):
            for family in metric.describe():
                names.update(_sample_names(family.name, family.type))
        names.update(_DeviceMemoryCollector.NAMES)
        names.update(_NvmlCollector.NAMES)
        return frozenset(names)


def _sample_names(name: str, kind: str) -> Iterable[str]:
    if kind == "counter":
        return (f"{name}_total", f"{name}_created")
    if kind == "histogram":
        return (f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created")
    return (name,)


class _LoadWindow:
    """Tokens per expert summed over the last `size` forwards of one layer."""

    def __init__(self, num_experts: int, size: int):
        self.num_experts = num_experts
        self._recent: deque[Sequence[int]] = deque()
        self._size = size
        self._sum = [0] * num_experts
        self.routed: list = []  # the tokens_routed counter of each expert, labels bound once

    def add(self, counts: Sequence[int]) -> float:
        """Add one forward's counts; return max / mean of the window (1.0 while it is empty)."""
        self._recent.append(counts)
        self._sum = [a + b for a, b in zip(self._sum, counts)]
        if len(self._recent) > self._size:
            old = self._recent.popleft()
            self._sum = [a - b for a, b in zip(self._sum, old)]
        total = sum(self._sum)
        return max(self._sum) * self.num_experts / total if total else 1.0


class _DeviceMemoryCollector(Collector):
    """moemesh_device_memory_bytes{device}, read when scraped."""

    NAMES = ("moemesh_device_memory_bytes",)

    def __init__(self) -> None:
        # device name -> (device, what each host on it holds); several hosts may share a process.
        self._devices: dict[str, tuple[torch.device, list[Callable[[], int]]]] = {}

    def track(self, device: torch.device, weight_bytes: Callable[[], int]) -> None:
        self._devices.setdefault(str(device), (device, []))[1].append(weight_bytes)

    def describe(self):
        return [GaugeMetricFamily(self.NAMES[0], _DEVICE_MEMORY_HELP, labels=["device"])]

    def collect(self):
        family = GaugeMetricFamily(self.NAMES[0], _DEVICE_MEMORY_HELP, labels=["device"])
        for name, (device, holders) in sorted(self._devices.items()):
            try:
                family.add_metric([name], float(memory_in_use(device, functools.partial(_total, holders))))
            except RuntimeError as err:  # a lost device must not fail the whole scrape
                log.warning("cannot read memory of %s: %s", name, err)
        yield family


def _total(sizes: Iterable[Callable[[], int]]) -> int:
    return sum(size() for size in sizes)


_DEVICE_MEMORY_HELP = (
    "Bytes in use on the device: torch's allocator on accelerators, the expert weights on CPU"
)


def memory_in_use(device: torch.device, weight_bytes: Callable[[], int]) -> int:
    """Bytes torch has allocated on an accelerator; on CPU (no per-device count) `weight_bytes()`."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "xpu" and hasattr(torch, "xpu"):
        return int(torch.xpu.memory_allocated(device))
    if device.type == "mps" and hasattr(torch, "mps"):
        return int(torch.mps.current_allocated_memory())
    return int(weight_bytes())


class _NvmlCollector(Collector):
    """GPU temperature and utilisation of every GPU NVML sees, read when scraped.

    Every process on a machine reports the same GPUs: aggregate by `uuid` (e.g. `max by (uuid)`)
    rather than summing across instances.
    """

    NAMES = ("moemesh_gpu_temperature_celsius", "moemesh_gpu_utilization_ratio")

    def __init__(self, nvml) -> None:
        self._nvml = nvml

    @classmethod
    def open(cls, nvml=None) -> _NvmlCollector | None:
        """A collector over `nvml` (the `pynvml` module unless given); None when NVML cannot be
        imported or initialised or sees no GPU. Never raises."""
        try:
            if nvml is None:
                import pynvml as nvml  # nvidia-ml-py
            nvml.nvmlInit()
            if nvml.nvmlDeviceGetCount() == 0:
                return None
        except Exception:  # no library, no driver, no GPU: GPU gauges are simply absent
            return None
        return cls(nvml)

    def describe(self):
        return list(self._families())

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["gpu", "uuid"]
        return (
            GaugeMetricFamily(self.NAMES[0], "GPU temperature (NVML)", labels=labels),
            GaugeMetricFamily(
                self.NAMES[1], "Fraction of the last sample period the GPU was busy (NVML)", labels=labels
            ),
        )

    def collect(self):
        temperature, utilization = self._families()
        nvml = self._nvml
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                labels = [str(index), uuid]
                temperature.add_metric(
                    labels, float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
                )
                utilization.add_metric(labels, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        except Exception as err:  # a GPU that fell off the bus must not fail the whole scrape
            log.warning("NVML read failed: %s", err)
        yield temperature
        yield utilization
