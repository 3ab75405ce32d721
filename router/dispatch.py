"""Plan and combine: which rows go to which expert on which host, and how the results come back.

    Routing ──plan──▶ DispatchPlan (one HostBatch per expert host)
    (a caller's own Routing is checked first: check_routing)
    HostBatch ──pack──▶ rows [R, hidden] ──(transport)──▶ expert rows [R, hidden]
    expert rows ──combine──▶ out [tokens, hidden] (weighted scatter-add), add_shared

No transport here: a HostBatch is exactly what one `Compute` request carries.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from moemesh.protos.spec import ExpertKey, HostInfo, InvalidArgument, Routing, Segment


class NoReplica(LookupError):
    """No live host serves (layer, expert)."""

    def __init__(self, layer: int, expert: int, tried: Iterable[str] = ()):
        tried = sorted(tried)
        detail = f"; tried {', '.join(tried)}" if tried else ""
        super().__init__(f"no live replica for layer {layer} expert {expert}{detail}")
        self.layer = layer
        self.expert = expert


@dataclass(frozen=True)
class HostBatch:
    """All of one forward's work for one host.

    token_index: [R] int64, the token each packed row comes from
    weight:      [R] float32, the combine weight of each packed row
    """

    host: str
    segments: tuple[Segment, ...]
    token_index: torch.Tensor
    weight: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.token_index.numel())


@dataclass(frozen=True)
class DispatchPlan:
    """One forward of one layer, split by host.

    tokens_per_expert: [experts] int64, routed rows per expert (the load of this batch)
    """

    layer: int
    num_tokens: int
    batches: tuple[HostBatch, ...]
    tokens_per_expert: torch.Tensor


class RoutingTable:
    """(layer, expert) → the hosts that serve it, in preference order. Immutable; swap a new one in."""

    def __init__(self, replicas: Mapping[ExpertKey, Sequence[str]]):
        self._replicas = {key: tuple(hosts) for key, hosts in replicas.items()}
        for key, hosts in self._replicas.items():
            assert hosts, f"(layer, expert) {key} has no host"

    @classmethod
    def from_hosts(cls, hosts: Sequence[HostInfo]) -> RoutingTable:
        """Every expert to the hosts that hold it, in the order the hosts are given."""
        replicas: dict[ExpertKey, list[str]] = {}
        for host in hosts:
            for key in host.experts:
                replicas.setdefault(key, []).append(host.host_id)
        return cls(replicas)

    def check_covers(self, num_experts: Mapping[int, int]) -> None:
        """ValueError unless every expert of every layer ({layer: experts}) has a host."""
        gaps = {layer: self.missing(layer, n) for layer, n in sorted(num_experts.items())}
        detail = "; ".join(f"layer {layer}: experts {missing}" for layer, missing in gaps.items() if missing)
        if detail:
            raise ValueError(f"no expert host serves {detail}")

    def replicas(self, layer: int, expert: int) -> tuple[str, ...]:
        return self._replicas.get((layer, expert), ())

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host, in first-seen order."""
        seen: dict[str, None] = {}
        for hosts in self._replicas.values():
            seen.update(dict.fromkeys(hosts))
        return tuple(seen)

    def experts_of(self, host: str) -> tuple[ExpertKey, ...]:
        return tuple(sorted(key for key, hosts in self._replicas.items() if host in hosts))

    def missing(self, layer: int, num_experts: int) -> list[int]:
        """Experts of `layer` that no host serves."""
        return [e for e in range(num_experts) if (layer, e) not in self._replicas]

    def items(self) -> Iterable[tuple[ExpertKey, tuple[str, ...]]]:
        return self._replicas.items()


class ReplicaChooser(Protocol):
    """Picks one host among the live replicas of an expert; `rows` chosen are released once answered."""

    def choose(self, layer: int, expert: int, replicas: Sequence[str], rows: int) -> str: ...

    def release(self, host: str, rows: int) -> None: ...


class FirstReplica:
    """Always the first live replica (deterministic; the table's order is the preference)."""

    def choose(self, layer: int, expert: int, replicas: Sequence[str], rows: int) -> str:
        return replicas[0]

    def release(self, host: str, rows: int) -> None:
        pass


def check_routing(routing: Routing, num_tokens: int, num_experts: int) -> Routing:
    """A caller's routing (Router.Dispatch), checked and as the gate would give it.

    routing.experts: [num_tokens, K] any integer dtype, ids in [-1, num_experts), -1 = unused slot;
    routing.weights: [num_tokens, K] any float dtype, finite. K may be 0; a token with no used slot
    gets zeros. Returns experts int64 and weights float32 of the same shape; raises InvalidArgument
    naming the field ("routing.experts.data", ...) and the expected value.
    """
    experts, weights = routing.experts, routing.weights
    if experts.dtype.is_floating_point or experts.dtype.is_complex or experts.dtype == torch.bool:
        raise InvalidArgument(
            "routing.experts.dtype", f"expected an integer dtype (int32), got {experts.dtype}"
        )
    if not weights.dtype.is_floating_point:
        raise InvalidArgument(
            "routing.weights.dtype", f"expected a float dtype (float32), got {weights.dtype}"
        )
    if experts.dim() != 2:
        raise InvalidArgument(
            "routing.experts.shape", f"expected 2 dimensions [tokens, K], got {list(experts.shape)}"
        )
    if weights.shape != experts.shape:
        raise InvalidArgument(
            "routing.weights.shape",
            f"expected the shape of routing.experts {list(experts.shape)}, got {list(weights.shape)}",
        )
    if experts.shape[0] != num_tokens:
        raise InvalidArgument(
            "routing.experts.shape",
            f"expected {num_tokens} tokens (the first dimension of hidden), got {experts.shape[0]}",
        )
    bad = (experts < -1) | (experts >= num_experts)
    if bool(bad.any()):
        t, k = (int(i) for i in bad.nonzero()[0])
        raise InvalidArgument(
            "routing.experts.data",
            f"expected expert ids in [-1, {num_experts}) (-1 = unused slot); token {t} slot {k} has "
            f"{int(experts[t, k])}",
        )
    if not bool(torch.isfinite(weights).all()):
        t, k = (int(i) for i in (~torch.isfinite(weights)).nonzero()[0])
        raise InvalidArgument(
            "routing.weights.data", f"expected finite values; token {t} slot {k} has {float(weights[t, k])}"
        )
    return Routing(experts.to(torch.int64), weights.to(torch.float32))


def plan(
    routing: Routing,
    layer: int,
    num_experts: int,
    table: RoutingTable,
    chooser: ReplicaChooser | None = None,
    excluded: frozenset[str] = frozenset(),
) -> DispatchPlan:
    """Group the routed (token, slot) pairs by expert, then by host.

    routing.experts: [tokens, K] (-1 = unused slot); routing.weights: [tokens, K].
    Hosts in `excluded` are skipped; an expert with no other replica raises NoReplica.
    """
    chooser = chooser or FirstReplica()
    experts, weights = routing.experts, routing.weights
    num_tokens, k = experts.shape

    # Flatten the used slots: one row per (token, slot).
    used = experts >= 0
    flat_expert = experts[used]  # [N]
    flat_token = torch.arange(num_tokens).unsqueeze(1).expand(num_tokens, k)[used]  # [N]
    flat_weight = weights[used].to(torch.float32)  # [N]

    # Sort by expert so that each expert's rows are one contiguous run.
    order = torch.argsort(flat_expert, stable=True)
    flat_expert, flat_token, flat_weight = flat_expert[order], flat_token[order], flat_weight[order]
    tokens_per_expert = torch.bincount(flat_expert, minlength=num_experts)
    present = torch.nonzero(tokens_per_expert).flatten().tolist()
    counts = tokens_per_expert[present].tolist()

    # Choose a host per expert; collect each host's runs in expert order.
    runs: dict[str, list[tuple[int, int, int]]] = {}  # host -> [(expert, offset in flat, count)]
    offset = 0
    for expert, count in zip(present, counts):
        live = [h for h in table.replicas(layer, expert) if h not in excluded]
        if not live:
            # Give back what this plan reserved: nothing of it will be sent.
            for host, host_runs in runs.items():
                chooser.release(host, sum(c for _, _, c in host_runs))
            raise NoReplica(layer, expert, tried=set(table.replicas(layer, expert)) & excluded)
        host = chooser.choose(layer, expert, live, count)
        runs.setdefault(host, []).append((expert, offset, count))
        offset += count

    batches = []
    for host, host_runs in runs.items():
        segments, index_parts, start = [], [], 0
        for expert, at, count in host_runs:
            segments.append(Segment(layer, expert, start, count))
            index_parts.append(torch.arange(at, at + count))
            start += count
        pick = torch.cat(index_parts)
        batches.append(HostBatch(host, tuple(segments), flat_token[pick], flat_weight[pick]))
    return DispatchPlan(layer, num_tokens, tuple(batches), tokens_per_expert)


def replan(
    batch: HostBatch,
    table: RoutingTable,
    chooser: ReplicaChooser | None = None,
    excluded: frozenset[str] = frozenset(),
) -> list[HostBatch]:
    """Move a failed host's segments to other replicas; rows keep their tokens and weights."""
    chooser = chooser or FirstReplica()
    regrouped: dict[str, list[Segment]] = {}
    for seg in batch.segments:
        live = [h for h in table.replicas(seg.layer, seg.expert) if h not in excluded]
        if not live:
            for host, segs in regrouped.items():
                chooser.release(host, sum(s.count for s in segs))
            raise NoReplica(
                seg.layer, seg.expert, tried=set(table.replicas(seg.layer, seg.expert)) & excluded
            )
        regrouped.setdefault(chooser.choose(seg.layer, seg.expert, live, seg.count), []).append(seg)

    out = []
    for host, segs in regrouped.items():
        new_segments, picks, start = [], [], 0
        for seg in segs:
            new_segments.append(Segment(seg.layer, seg.expert, start, seg.count))
            picks.append(torch.arange(seg.start, seg.start + seg.count))
            start += seg.count
        pick = torch.cat(picks)
        out.append(HostBatch(host, tuple(new_segments), batch.token_index[pick], batch.weight[pick]))
    return out


def pack(hidden: torch.Tensor, batch: HostBatch) -> torch.Tensor:
    """hidden: [tokens, hidden] -> rows [R, hidden], the rows one host computes, contiguous."""
    return hidden.index_select(0, batch.token_index)


def combine(out: torch.Tensor, batch: HostBatch, expert_rows: torch.Tensor) -> None:
    """Scatter-add weighted expert outputs into the token rows, in place.

    out: [tokens, hidden] float32 accumulator; expert_rows: [R, hidden] for batch's rows.
    """
    assert expert_rows.shape == (batch.num_rows, out.shape[1]), (expert_rows.shape, batch.num_rows)
    out.index_add_(0, batch.token_index, expert_rows.to(out.dtype) * batch.weight.unsqueeze(1))


def add_shared(
    out: torch.Tensor,
    hidden: torch.Tensor,
    shared: Callable[[torch.Tensor], torch.Tensor],
    gated: Sequence[bool],
    sizes: Sequence[int],
) -> None:
    """out [T, H] float32 += shared(hidden [T, H]) on the rows of the gated requests, in place.

    The rows are requests' rows one after another (`sizes`, summing to T); a request with its own
    routing (`gated[j]` False) gets the routed experts only, as the experts interface computes.
    """
    if all(gated):
        out += shared(hidden).to(out.dtype)
        return
    starts = [0, *itertools.accumulate(sizes)]
    rows = [torch.arange(starts[j], starts[j + 1]) for j, is_gated in enumerate(gated) if is_gated]
    if rows:
        index = torch.cat(rows)
        out.index_add_(0, index, shared(hidden.index_select(0, index)).to(out.dtype))
