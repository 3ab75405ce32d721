"""The sparse path of one MoE layer: gate → plan → dispatch → combine.

Two entry points share it: a request with hidden states only is gated here (Router.Forward); a
request that brings its own routing (Router.Dispatch, the `transformers` experts interface) skips
the gate, is checked instead, and gets the routed experts only (no shared experts).

`SparseMoE` runs it against an `ExpertTransport`, the small protocol for "where experts run":
in process (tests, the single-process compute limit) or over gRPC (services/transport.py).
Torch work runs on an executor so that an asyncio server's event loop only waits on I/O.
A `PipelineObserver` may watch each stage (the services trace them); by default nothing does.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moemesh.protos.spec import GateConfig, InvalidArgument, InvalidRouting, Routing, RoutingPolicy, Segment

from .dispatch import (
    DispatchPlan,
    HostBatch,
    ReplicaChooser,
    RoutingTable,
    add_shared,
    check_routing,
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

    gate_weight: [experts, hidden], or None when the layer's callers route (Dispatch only);
    correction_bias: [experts] or None; gate_bias: [experts] or None (added to the logits);
    shared: hidden [tokens, hidden] -> [tokens, hidden], the (already gated) shared experts, or None
    """

    layer: int
    hidden_size: int
    gate: GateConfig
    gate_weight: torch.Tensor | None
    correction_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    shared: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts


@dataclass(frozen=True)
class LayerRequest:
    """One caller's work for a layer.

    hidden: [tokens, hidden]. finish: run on the executor in the finish hop with the request's
    ForwardResult (e.g. to encode its reply); what it returns is `ForwardResult.finished`.
    routing: the caller's own routing (experts / weights [tokens, K], -1 = unused slot): no gate
    (`policy` is ignored), checked by `check_routing`, and no shared experts in the output.
    """

    hidden: torch.Tensor
    policy: RoutingPolicy | None = None
    finish: Callable[[ForwardResult], Any] | None = None
    routing: Routing | None = None


@dataclass(frozen=True)
class ForwardResult:
    """hidden: [tokens, hidden] in the input dtype; routing: this request's own; plan: of the merged
    batch it ran in (`batch_requests` requests)."""

    hidden: torch.Tensor
    routing: Routing
    plan: DispatchPlan
    retries: int = 0
    failed_hosts: tuple[str, ...] = field(default=())
    batch_requests: int = 1
    finished: Any = None


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
    tokens: int  # of every request in the batch
    policy: RoutingPolicy | None  # of the batch's first gated request (None: default or none gated)
    requests: int = 1  # requests merged into this forward
    routing: Routing | None = None  # after gate (merged)
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
        self._count_lock = threading.Lock()
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
        if spec.gate_weight is None:
            raise InvalidArgument(
                "layer", f"layer {layer} has no router gate: its model routes in the caller; use Dispatch"
            )
        return route(hidden, spec.gate_weight, spec.gate, policy, spec.correction_bias, spec.gate_bias)

    async def forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        policy: RoutingPolicy | None = None,
        timeout: float | None = None,
    ) -> ForwardResult:
        """hidden: [tokens, hidden] -> the MoE block's output [tokens, hidden] (one request alone)."""
        (result,) = await self.forward_batch(layer, [LayerRequest(hidden, policy)], timeout)
        if isinstance(result, BaseException):
            raise result
        return result

    async def forward_batch(
        self, layer: int, requests: Sequence[LayerRequest], timeout: float | None = None
    ) -> list[ForwardResult | BaseException]:
        """Several requests of one layer as one gate → plan → dispatch → combine.

        requests[i].hidden: [T_i, hidden], all of one dtype. Each request is checked and gated with
        its own policy, or checked with the routing it brings; their routed rows share one plan,
        one call per host and one combine (shared experts only on gated requests' rows); each
        gets its own rows of the output, identical to running it alone (up to float summation
        order). Returns, per request, its ForwardResult or the error that is its alone (bad input);
        an error of the shared work (no replica, deadline, a host error) is raised for all.
        Two executor hops: prepare (checks, gate, plan, pack) and finish (combine, shared experts,
        each request's `finish`). timeout: seconds for the whole batch (None = no deadline).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        spec = self.layers[layer]
        table = self._table
        gated = [i for i, r in enumerate(requests) if r.routing is None]
        facts = ForwardFacts(
            layer,
            sum(int(r.hidden.shape[0]) for r in requests),
            requests[gated[0]].policy if gated else None,
            len(requests),
        )
        observe = self.observer.stage
        outcome: list[ForwardResult | BaseException | None] = [None] * len(requests)

        # prepare: one executor hop.
        def prepare():
            with observe("gate", facts):
                checked = [  # (index, Routing or its own error): one gate call per distinct policy
                    pair
                    for group in _by_policy(requests, gated)
                    for pair in self._gate_group(layer, [requests[i] for i in group], group)
                ]
                checked += [
                    (i, _caller_routing(r, spec.num_experts))
                    for i, r in enumerate(requests)
                    if r.routing is not None
                ]
                routed = []  # (index, routing) of the requests that passed their checks, in order
                for i, routing in sorted(checked, key=lambda pair: pair[0]):
                    if isinstance(routing, Exception):
                        outcome[i] = routing
                    else:
                        routed.append((i, routing))
                if not routed:
                    return None
                merged = facts.routing = merge_routings([routing for _, routing in routed])
            with observe("plan", facts):
                hidden = (
                    torch.cat([requests[i].hidden for i, _ in routed])
                    if len(routed) > 1
                    else requests[routed[0][0]].hidden
                )
                dispatch_plan = facts.plan = plan(
                    merged, layer, spec.num_experts, table, self.chooser, self.health.down()
                )
                return routed, hidden, dispatch_plan, [pack(hidden, b) for b in dispatch_plan.batches]

        prepared = await self.run(prepare)
        if prepared is None:
            return outcome  # every request failed its own checks
        routed, hidden, dispatch_plan, packed = prepared

        # dispatch: one call per host, all concurrent; the first failure cancels the others.
        attempt = _Attempt()
        with observe("dispatch", facts):
            try:
                results = await _all(
                    self._dispatch(b, rows, hidden, table, deadline, attempt)
                    for b, rows in zip(dispatch_plan.batches, packed)
                )
            finally:
                facts.retries, facts.failed_hosts = attempt.retries, tuple(sorted(attempt.failed))

        # finish: combine (weighted scatter-add in float32), shared experts, split, each request's
        # own finishing work (e.g. encoding its reply); one executor hop.
        def finish() -> None:
            sizes = [int(requests[i].hidden.shape[0]) for i, _ in routed]
            out = torch.zeros(hidden.shape, dtype=torch.float32)
            for pairs in results:
                for batch, rows in pairs:
                    combine(out, batch, rows)
            if spec.shared is not None:  # on the rows of gated requests only
                add_shared(out, hidden, spec.shared, [requests[i].routing is None for i, _ in routed], sizes)
            with self._count_lock:  # load counts only work that succeeded
                self.tokens_routed[layer] += dispatch_plan.tokens_per_expert
            failed = tuple(sorted(attempt.failed))
            for (i, routing), part in zip(routed, out.split(sizes)):
                request = requests[i]
                result = ForwardResult(
                    part.to(request.hidden.dtype),
                    routing,
                    dispatch_plan,
                    attempt.retries,
                    failed,
                    len(routed),
                )
                try:
                    outcome[i] = (
                        result
                        if request.finish is None
                        else dataclasses.replace(result, finished=request.finish(result))
                    )
                except Exception as err:  # that request's own finishing failed, not its neighbours'
                    outcome[i] = err

        with observe("combine", facts):
            await self.run(finish)
        return outcome

    def _gate_group(self, layer: int, group: Sequence[LayerRequest], index: Sequence[int]):
        """(index, Routing or its own error) of requests sharing one policy: checked and gated
        together; when the batch has a NaN or Inf, each request alone, so only its owner fails."""
        hidden = torch.cat([r.hidden for r in group]) if len(group) > 1 else group[0].hidden
        try:
            check_finite(hidden)
            routing = self.gate(layer, hidden, group[0].policy)
        except (InvalidArgument, InvalidRouting) as err:
            if len(group) == 1:
                return [(index[0], err)]
            return [pair for i, r in zip(index, group) for pair in self._gate_group(layer, [r], [i])]
        sizes = [int(r.hidden.shape[0]) for r in group]
        parts = zip(routing.experts.split(sizes), routing.weights.split(sizes), strict=True)
        return [(i, _trimmed(Routing(e, w))) for i, (e, w) in zip(index, parts)]

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
            excluded = frozenset(attempt.failed) | self.health.down()
        finally:
            self.chooser.release(batch.host, batch.num_rows)

        def move() -> list[tuple[HostBatch, torch.Tensor]]:  # torch work: on the executor
            return [(b, pack(hidden, b)) for b in replan(batch, table, self.chooser, excluded)]

        moved = await self.run(move)
        attempt.retries += len(moved)
        DISPATCH_RETRY.set(True)
        nested = await _all(self._dispatch(b, rows, hidden, table, deadline, attempt) for b, rows in moved)
        return [pair for pairs in nested for pair in pairs]

    async def run(self, fn: Callable, *args):
        """Run torch work `fn(*args)` on the router executor, off the event loop, in the caller's
        contextvars context (so that observers there see the caller's current span)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False)


async def _all(coros: Iterable[Awaitable]) -> list:
    """Await every coroutine concurrently; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def check_finite(hidden: torch.Tensor) -> None:
    """InvalidArgument naming the first token with a NaN or Inf."""
    if not bool(torch.isfinite(hidden).all()):
        bad = int((~torch.isfinite(hidden)).any(dim=1).nonzero()[0])
        raise InvalidArgument("hidden.data", f"expected finite values; token {bad} has NaN or Inf")


def _by_policy(requests: Sequence[LayerRequest], indices: Sequence[int]) -> list[list[int]]:
    """`indices` of `requests` grouped by routing policy, in order of first appearance."""
    groups: dict[RoutingPolicy | None, list[int]] = {}
    for i in indices:
        groups.setdefault(requests[i].policy, []).append(i)
    return list(groups.values())


def _caller_routing(request: LayerRequest, num_experts: int) -> Routing | InvalidArgument:
    """The routing a request brought, checked (with its hidden states), or its own error."""
    try:
        check_finite(request.hidden)
        return check_routing(request.routing, int(request.hidden.shape[0]), num_experts)
    except InvalidArgument as err:
        return err


def _trimmed(routing: Routing) -> Routing:
    """A request's part of a group's routing without the slots only its neighbours use (dynamic
    modes pad every token to the batch's largest count): what it would get alone."""
    used = int((routing.experts >= 0).sum(dim=1).max()) if routing.experts.numel() else 1
    k = max(1, used)
    if k == routing.experts.shape[1]:
        return routing
    return Routing(routing.experts[:, :k].contiguous(), routing.weights[:, :k].contiguous())


def merge_routings(routings: Sequence[Routing]) -> Routing:
    """Routings of several requests as one: experts / weights [sum T_i, max K_i]; a request with
    fewer slots is padded with unused slots (expert -1, weight 0)."""
    if len(routings) == 1:
        return routings[0]
    k = max(r.experts.shape[1] for r in routings)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        return t if t.shape[1] == k else torch.nn.functional.pad(t, (0, k - t.shape[1]), value=value)

    return Routing(
        experts=torch.cat([pad(r.experts, -1) for r in routings]),
        weights=torch.cat([pad(r.weights, 0.0) for r in routings]),
    )
