"""The sparse path of one MoE layer: gate → plan → dispatch → combine.

`SparseMoE` runs it against an `ExpertTransport`, the small protocol for "where experts run":
in process (tests, the single-process compute limit) or over gRPC (services/transport.py).
Torch work runs on an executor so that an asyncio server's event loop only waits on I/O.
A `PipelineObserver` may watch each stage (the services trace them); by default nothing does.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moemesh.protos.spec import GateConfig, Routing, RoutingPolicy, Segment

from .dispatch import (
    DispatchPlan,
    HostBatch,
    ReplicaChooser,
    RoutingTable,
    combine,
    pack,
    plan,
    replan,
)
from .gating import route
from .replicas import HostHealth, LeastLoadedReplica


class HostUnavailable(ConnectionError):
    """The host could not be reached or is shutting down; its work may be retried elsewhere."""

    def __init__(self, host: str, detail: str = ""):
        super().__init__(f"expert host {host} unavailable{': ' + detail if detail else ''}")
        self.host = host


class DeadlineExceeded(TimeoutError):
    """The caller's deadline passed before the experts answered."""


class ExpertTransport(Protocol):
    """Runs a HostBatch's rows through the host's experts."""

    async def compute(
        self, host: str, segments: Sequence[Segment], rows: torch.Tensor, timeout: float | None
    ) -> torch.Tensor:
        """rows: [R, hidden] -> [R, hidden] unweighted expert outputs, same dtype.

        Raises HostUnavailable (retry elsewhere) or DeadlineExceeded.
        """
        ...


@dataclass(frozen=True)
class MoELayer:
    """What the router holds for one layer.

    gate_weight: [experts, hidden]; correction_bias: [experts] or None;
    shared: hidden [tokens, hidden] -> [tokens, hidden], the (already gated) shared experts, or None
    """

    layer: int
    hidden_size: int
    gate: GateConfig
    gate_weight: torch.Tensor
    correction_bias: torch.Tensor | None = None
    shared: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts


@dataclass(frozen=True)
class ForwardResult:
    """hidden: [tokens, hidden] in the input dtype."""

    hidden: torch.Tensor
    routing: Routing
    plan: DispatchPlan
    retries: int = 0
    failed_hosts: tuple[str, ...] = field(default=())


@dataclass
class _Attempt:
    """Hosts that failed during one forward, and how many host batches were re-sent."""

    failed: set[str] = field(default_factory=set)
    retries: int = 0


# True inside the transport calls that re-send a failed host's rows to another replica (a task
# copies the context it starts in, so the re-sent batches' calls see it); transports may report it.
DISPATCH_RETRY: contextvars.ContextVar[bool] = contextvars.ContextVar("moemesh_dispatch_retry", default=False)

STAGES = ("gate", "plan", "dispatch", "combine")


@dataclass
class ForwardFacts:
    """What one forward has decided so far, filled in stage by stage for observers."""

    layer: int
    tokens: int
    policy: RoutingPolicy | None
    routing: Routing | None = None  # after gate
    plan: DispatchPlan | None = None  # after plan
    retries: int = 0  # after dispatch: host batches re-sent to other replicas
    failed_hosts: tuple[str, ...] = ()  # after dispatch


class PipelineObserver(Protocol):
    """Sees each stage of a forward (e.g. to trace it); the default observes nothing."""

    def stage(self, name: str, facts: ForwardFacts) -> AbstractContextManager[object]:
        """Wraps stage `name` (one of STAGES); `facts` holds the stage's decisions when it exits.

        Entered on the thread that runs the stage, in the forward's contextvars context.
        """
        ...


class NoObserver:
    def stage(self, name: str, facts: ForwardFacts) -> AbstractContextManager[object]:
        return nullcontext()


class SparseMoE:
    """Serves the MoE layers of one model against a transport."""

    def __init__(
        self,
        layers: Mapping[int, MoELayer],
        table: RoutingTable,
        transport: ExpertTransport,
        chooser: ReplicaChooser | None = None,
        executor: Executor | None = None,
        health: HostHealth | None = None,
        observer: PipelineObserver | None = None,
    ):
        self.layers = dict(layers)
        self.observer = observer if observer is not None else NoObserver()
        self._table = table
        self.transport = transport
        self.chooser = chooser if chooser is not None else LeastLoadedReplica()
        self.health = health if health is not None else HostHealth()
        # Rows routed per expert since start: [experts] int64 per layer (load for status and placement).
        self.tokens_routed = {
            layer: torch.zeros(spec.num_experts, dtype=torch.int64) for layer, spec in layers.items()
        }
        # Where torch work runs; servers pass `moemesh.experts.device.torch_executor`.
        self._executor = executor or ThreadPoolExecutor(2, thread_name_prefix="moemesh-router")

    @property
    def table(self) -> RoutingTable:
        return self._table

    def swap_table(self, table: RoutingTable) -> None:
        """Replace the routing table; forwards already planned keep the one they started with."""
        self._table = table

    def gate(self, layer: int, hidden: torch.Tensor, policy: RoutingPolicy | None = None) -> Routing:
        """hidden: [tokens, hidden] -> the routing decision (sync, runs torch)."""
        spec = self.layers[layer]
        return route(hidden, spec.gate_weight, spec.gate, policy, spec.correction_bias)

    async def route(self, layer: int, hidden: torch.Tensor, policy: RoutingPolicy | None = None) -> Routing:
        return await self.run(self.gate, layer, hidden, policy)

    async def forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        policy: RoutingPolicy | None = None,
        timeout: float | None = None,
    ) -> ForwardResult:
        """hidden: [tokens, hidden] -> the MoE block's output [tokens, hidden]."""
        deadline = None if timeout is None else time.monotonic() + timeout
        spec = self.layers[layer]
        table = self._table
        facts = ForwardFacts(layer, int(hidden.shape[0]), policy)
        observe = self.observer.stage

        # gate + plan + pack: one executor hop.
        def prepare() -> tuple[Routing, DispatchPlan, list[torch.Tensor]]:
            with observe("gate", facts):
                routing = facts.routing = self.gate(layer, hidden, policy)
            with observe("plan", facts):
                dispatch_plan = plan(
                    routing, layer, spec.num_experts, table, self.chooser, self.health.down()
                )
                self.tokens_routed[layer] += dispatch_plan.tokens_per_expert
                facts.plan = dispatch_plan
                return routing, dispatch_plan, [pack(hidden, b) for b in dispatch_plan.batches]

        routing, dispatch_plan, packed = await self.run(prepare)

        # dispatch: one call per host, all concurrent; shared experts meanwhile on the executor.
        shared = asyncio.ensure_future(self.run(spec.shared, hidden)) if spec.shared else None
        attempt = _Attempt()
        try:
            with observe("dispatch", facts):
                try:
                    results = await asyncio.gather(
                        *(
                            self._dispatch(b, rows, hidden, table, deadline, attempt)
                            for b, rows in zip(dispatch_plan.batches, packed)
                        )
                    )
                finally:
                    facts.retries, facts.failed_hosts = attempt.retries, tuple(sorted(attempt.failed))
        except BaseException:
            if shared is not None:
                shared.cancel()
            raise
        shared_out = await shared if shared is not None else None

        # combine: weighted scatter-add in float32, then back to the input dtype.
        def finish() -> torch.Tensor:
            out = torch.zeros(hidden.shape, dtype=torch.float32)
            for pairs in results:
                for batch, rows in pairs:
                    combine(out, batch, rows)
            if shared_out is not None:
                out += shared_out.to(torch.float32)
            return out.to(hidden.dtype)

        with observe("combine", facts):
            out = await self.run(finish)
        return ForwardResult(out, routing, dispatch_plan, attempt.retries, tuple(sorted(attempt.failed)))

    async def _dispatch(
        self,
        batch: HostBatch,
        rows: torch.Tensor,
        hidden: torch.Tensor,
        table: RoutingTable,
        deadline: float | None,
        attempt: _Attempt,
    ) -> list[tuple[HostBatch, torch.Tensor]]:
        """Run one host's batch; if the host is unavailable, re-plan its segments on other replicas."""
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before calling expert host {batch.host}")
        try:
            out = await self.transport.compute(batch.host, batch.segments, rows, remaining)
            return [(batch, out)]
        except HostUnavailable:
            self.health.mark_down(batch.host)
            attempt.failed.add(batch.host)
            moved = replan(batch, table, self.chooser, frozenset(attempt.failed) | self.health.down())
            attempt.retries += len(moved)
            DISPATCH_RETRY.set(True)
        finally:
            self.chooser.release(batch.host, batch.num_rows)
        nested = await asyncio.gather(
            *(self._dispatch(b, pack(hidden, b), hidden, table, deadline, attempt) for b in moved)
        )
        return [pair for pairs in nested for pair in pairs]

    async def run(self, fn: Callable, *args):
        """Run torch work `fn(*args)` on the router executor, off the event loop, in the caller's
        contextvars context (so that observers there see the caller's current span)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
