"""Batching on the expert host, without sockets: `ExpertBank.compute_many` against `compute`, and
the ExpertServicer's batcher and queue limits, called directly on an event loop.

A held round (tests/fakes.py: the bank's `compute_many`, its first call waiting for an Event)
makes every scenario deterministic: calls that arrive while it runs wait in the queue, and the test
waits on conditions, never on time.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import wire
from moemesh.protos.spec import Segment
from moemesh.router.pipeline import DeadlineExceeded
from moemesh.services.admission import HostLimits
from moemesh.services.errors import Overloaded
from moemesh.services.expert_service import ExpertServicer
from moemesh.services.metrics import Metrics
from moemesh.services.telemetry import Telemetry
from tests.fakes import Context, HeldRounds, tiny_bank
from tests.fakes import until as _until

MODEL, H = "tiny-mixtral", 64  # 2 MoE layers, 8 experts


@pytest.fixture(scope="module")
def bank():
    return tiny_bank(MODEL)


def _rows(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- ExpertBank.compute_many -------------------------------------------------------------------------


REQUESTS = [
    ([Segment(0, 1, 0, 3), Segment(0, 5, 3, 2)], 5),
    ([Segment(0, 5, 0, 4), Segment(1, 2, 4, 1), Segment(0, 1, 6, 2)], 8),  # rows 5 uncovered
    ([Segment(0, 1, 0, 1)], 1),
    ([Segment(1, 2, 2, 6), Segment(0, 5, 0, 2)], 8),
]


def test_compute_many_equals_each_request_alone(bank):
    requests = [(segments, _rows(n, seed)) for seed, (segments, n) in enumerate(REQUESTS)]
    merged = bank.compute_many(requests)
    assert len(merged) == len(requests)
    for (segments, rows), out in zip(requests, merged):
        assert out.shape == rows.shape and out.dtype == rows.dtype
        torch.testing.assert_close(out, bank.compute(segments, rows), rtol=0.0, atol=1e-6)
    assert torch.equal(merged[1][5], torch.zeros(H))  # uncovered rows stay zero


def test_compute_many_runs_each_expert_once(bank, monkeypatch):
    requests = [(segments, _rows(n, seed)) for seed, (segments, n) in enumerate(REQUESTS)]
    experts = {s.key for segments, _ in requests for s in segments}
    linear = F.linear
    rows_seen: list[int] = []

    def counting(x, w, *args):
        rows_seen.append(int(x.shape[0]))
        return linear(x, w, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    bank.compute_many(requests)
    # gate_up and down per expert: two matmuls each, over the rows of every request together.
    assert len(rows_seen) == 2 * len(experts)
    assert sum(rows_seen) == 2 * sum(s.count for segments, _ in requests for s in segments)


def test_compute_many_keeps_each_requests_dtype(bank):
    requests = [([Segment(0, 3, 0, 4)], _rows(4, 0, torch.bfloat16)), ([Segment(0, 3, 0, 2)], _rows(2, 1))]
    low, full = bank.compute_many(requests)
    assert (low.dtype, full.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(full, bank.compute(*requests[1]), rtol=0.0, atol=1e-6)
    torch.testing.assert_close(low, bank.compute(*requests[0]), rtol=0.0, atol=1e-6)


def test_compute_many_checks_every_request_before_computing(bank, monkeypatch):
    ran: list[int] = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: ran.append(1))
    good = ([Segment(0, 1, 0, 2)], _rows(2, 0))
    bad = ([Segment(0, 1, 1, 4)], _rows(2, 1))  # rows [1, 5) of 2
    with pytest.raises(ValueError, match=r"segments\[0\]"):
        bank.compute_many([good, bad])
    assert ran == []


# -- the expert host's batcher -------------------------------------------------------------------------


@pytest.fixture
def host(bank, monkeypatch):
    """An ExpertServicer over `bank` whose first round is held; yields (servicer, held)."""

    def make(**limits) -> tuple[ExpertServicer, HeldRounds]:
        held = HeldRounds(bank)
        monkeypatch.setattr(bank, "compute_many", held)
        servicer = ExpertServicer("h0", bank, MODEL, limits=HostLimits(**limits))
        made.append((servicer, held))
        return servicer, held

    made: list[tuple[ExpertServicer, HeldRounds]] = []
    yield make
    for servicer, held in made:
        held.release.set()
        servicer.close()


def _request(segments, rows) -> pb.ComputeRequest:
    return wire.encode_compute(segments, rows)


def _out(reply: pb.ComputeResponse) -> torch.Tensor:
    return wire.decode_tensor(reply.rows, "rows", rank=2)


async def _hold_first_round(servicer: ExpertServicer, held: HeldRounds) -> asyncio.Future:
    first = asyncio.ensure_future(servicer.Compute(_request([Segment(0, 0, 0, 2)], _rows(2, 99)), Context()))
    await _until(held.entered.is_set, "the first round started")
    return first


def test_concurrent_calls_merge_into_one_round_and_equal_solo_results(bank, host):
    servicer, held = host()
    requests = [(segments, _rows(n, seed)) for seed, (segments, n) in enumerate(REQUESTS)]

    async def scenario():
        first = await _hold_first_round(servicer, held)
        calls = [asyncio.ensure_future(servicer.Compute(_request(*r), Context())) for r in requests]
        await _until(lambda: servicer.batcher.waiting == len(requests), "every call queued")
        held.release.set()
        return await asyncio.gather(first, *calls)

    replies = asyncio.run(scenario())[1:]
    assert [len(r) for r in held.rounds] == [1, len(requests)]  # the waiting calls made one round
    for (segments, rows), reply in zip(requests, replies):
        torch.testing.assert_close(_out(reply), held.inner([(segments, rows)])[0], rtol=0.0, atol=1e-6)
    assert (servicer.queue.rows, servicer.queue.requests) == (0, 0)


def test_rounds_take_the_oldest_calls_up_to_the_row_cap(host):
    servicer, held = host(max_batch_rows=5)
    sizes = [3, 2, 4, 6, 1]

    async def scenario():
        first = await _hold_first_round(servicer, held)
        calls = []
        for i, n in enumerate(sizes):  # queued in this order
            calls.append(
                asyncio.ensure_future(
                    servicer.Compute(_request([Segment(0, 2, 0, n)], _rows(n, i)), Context())
                )
            )
            await _until(lambda n=i + 1: servicer.batcher.waiting == n, f"call {i} queued")
        held.release.set()
        await asyncio.gather(first, *calls)

    asyncio.run(scenario())
    # [3, 2] fill 5 rows; 4 alone; 6 is over the cap and runs alone; then 1.
    assert held.sizes()[1:] == [[3, 2], [4], [6], [1]]


def test_full_queue_is_overloaded_at_once_naming_the_limit(host):
    servicer, held = host(max_queue_rows=8, max_request_rows=8, max_queue_requests=3)

    async def scenario():
        first = await _hold_first_round(servicer, held)  # 2 rows, computing
        waiting = asyncio.ensure_future(
            servicer.Compute(_request([Segment(0, 1, 0, 5)], _rows(5, 1)), Context())
        )
        await _until(lambda: servicer.batcher.waiting == 1, "second call queued")
        with pytest.raises(
            Overloaded, match=r"expert host h0: queue full \(7 of 8 rows queued, 2 more asked\)"
        ):
            await servicer.Compute(_request([Segment(0, 1, 0, 2)], _rows(2, 2)), Context())
        small = asyncio.ensure_future(
            servicer.Compute(_request([Segment(0, 1, 0, 1)], _rows(1, 3)), Context())
        )
        await _until(lambda: servicer.batcher.waiting == 2, "third call queued")
        with pytest.raises(Overloaded, match=r"queue full \(3 of 3 requests queued\)"):
            await servicer.Compute(_request([Segment(0, 1, 0, 1)], _rows(1, 4)), Context())
        held.release.set()
        await asyncio.gather(first, waiting, small)

    asyncio.run(scenario())
    assert len(held.rounds) == 2 and (servicer.queue.rows, servicer.queue.requests) == (0, 0)


@pytest.mark.parametrize(
    "segments, rows, message",
    [
        ([Segment(0, e, e, 1) for e in range(5)], 5, "a request of 5 segments exceeds the limit of 4 segments per request"),
        ([Segment(0, 1, 0, 9)], 9, "a request of 9 rows exceeds the limit of 8 rows per request"),
    ],
)  # fmt: skip
def test_request_limits_reject_before_decoding_or_compute(host, segments, rows, message):
    servicer, held = host(max_segments=4, max_request_rows=8, max_queue_rows=8)
    request = _request(segments, _rows(rows, 0))
    if len(segments) > 4:
        request.rows.data = b""  # not even decodable: the segment limit is read from the message's counts
    # (a row count is trusted only when the data matches the shape: see wire.claimed_rows)
    with pytest.raises(Overloaded, match=message):
        asyncio.run(servicer.Compute(request, Context()))
    assert held.rounds == [] and (servicer.queue.rows, servicer.queue.requests) == (0, 0)


def test_cancelled_and_expired_calls_are_dropped_and_leave_batch_mates_exact(host):
    servicer, held = host()
    mates = [([Segment(0, 4, 0, 3)], _rows(3, 1)), ([Segment(1, 6, 0, 2)], _rows(2, 2))]

    async def scenario():
        first = await _hold_first_round(servicer, held)
        a = asyncio.ensure_future(servicer.Compute(_request(*mates[0]), Context()))
        gone = asyncio.ensure_future(
            servicer.Compute(_request([Segment(0, 4, 0, 7)], _rows(7, 3)), Context())
        )
        late = asyncio.ensure_future(
            servicer.Compute(_request([Segment(0, 4, 0, 5)], _rows(5, 4)), Context(0.0))
        )
        b = asyncio.ensure_future(servicer.Compute(_request(*mates[1]), Context()))
        await _until(lambda: servicer.batcher.waiting == 4, "four calls queued")
        gone.cancel()
        await _until(lambda: servicer.batcher.waiting == 3, "the cancelled call left the queue")
        held.release.set()
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await late
        return await asyncio.gather(first, a, b)

    replies = asyncio.run(scenario())[1:]
    assert held.sizes()[1:] == [[3, 2]]
    for (segments, rows), reply in zip(mates, replies):
        torch.testing.assert_close(_out(reply), held.inner([(segments, rows)])[0], rtol=0.0, atol=1e-6)
    assert (servicer.queue.rows, servicer.queue.requests) == (0, 0)


def test_merged_calls_report_their_queue_wait_and_round(bank, monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = Metrics()
    held = HeldRounds(bank)
    monkeypatch.setattr(bank, "compute_many", held)
    servicer = ExpertServicer("h0", bank, MODEL, telemetry=Telemetry(provider, metrics))
    requests = [(segments, _rows(n, seed)) for seed, (segments, n) in enumerate(REQUESTS)]
    try:

        async def scenario():
            first = await _hold_first_round(servicer, held)
            calls = [asyncio.ensure_future(servicer.Compute(_request(*r), Context())) for r in requests]
            await _until(lambda: servicer.batcher.waiting == len(requests), "every call queued")
            held.release.set()
            await asyncio.gather(first, *calls)

        asyncio.run(scenario())
    finally:
        held.release.set()
        servicer.close()
    spans = exporter.get_finished_spans()
    waits = sorted((s for s in spans if s.name == "moemesh.queue_wait"), key=lambda s: s.start_time)
    computes = sorted((s for s in spans if s.name == "moemesh.compute"), key=lambda s: s.start_time)
    assert len(waits) == len(computes) == 1 + len(requests)
    merged_rows = sum(int(rows.shape[0]) for _, rows in requests)
    # Each call's wait ends when its round starts.
    assert sorted(w.end_time for w in waits) == sorted(c.start_time for c in computes)
    assert computes[0].attributes["moemesh.round.calls"] == 1
    for compute in computes[1:]:
        assert compute.attributes["moemesh.round.calls"] == len(requests)
        assert compute.attributes["moemesh.round.rows"] == merged_rows
    value = metrics.registry.get_sample_value
    assert value("moemesh_compute_batch_rows_count") == 2  # rounds, not calls
    assert value("moemesh_compute_batch_rows_sum") == 2 + merged_rows
    assert value("moemesh_queue_wait_seconds_count") == 1 + len(requests)
    assert value("moemesh_queue_depth") == 0


def test_an_invalid_call_is_refused_alone_and_gives_its_room_back(host):
    servicer, held = host(max_queue_requests=2)

    async def scenario():
        first = await _hold_first_round(servicer, held)
        with pytest.raises(wire.InvalidArgument, match=r"segments\[0\]"):
            await servicer.Compute(_request([Segment(0, 1, 1, 4)], _rows(4, 0)[:2]), Context())
        good = asyncio.ensure_future(
            servicer.Compute(_request([Segment(0, 1, 0, 2)], _rows(2, 5)), Context())
        )
        await _until(lambda: servicer.batcher.waiting == 1, "the good call queued")
        held.release.set()
        return await asyncio.gather(first, good)

    asyncio.run(scenario())
    assert (servicer.queue.rows, servicer.queue.requests) == (0, 0)
