"""The bounded trace store: a span count and a byte estimate that hold however many spans arrive,
least recently updated traces dropped first and counted, and an estimate that errs high against
what tracemalloc measures."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import pytest

from moemesh.deploy.cli import build_parser, main
from moemesh.deploy.traces.records import (
    DEFAULT_MAX_MB,
    DEFAULT_MAX_SPANS,
    MIB,
    SpanEvent,
    SpanRecord,
    StoreLimits,
    TraceStore,
    dump_jsonl,
    load_jsonl,
)

FED = 200_000  # tiny spans fed to one store
BATCH = 512  # the OTLP exporters' default batch


def tiny(i: int, trace: int | None = None) -> SpanRecord:
    """A span with nothing but ids and times; its own trace unless `trace` is given."""
    t = i if trace is None else trace
    return SpanRecord(f"{t:032x}", f"{i:016x}", None, "x", "INTERNAL", i, i + 1)


def rich(i: int) -> SpanRecord:
    """A span as a .jsonl file gives it back: its own resource dict, attributes and an event."""
    span = SpanRecord(
        trace_id=f"{i // 3:032x}",
        span_id=f"{i:016x}",
        parent_span_id=f"{i + 1:016x}",
        name="moemesh.v1.Expert/Compute",
        kind="SERVER",
        start_ns=i,
        end_ns=i + 5,
        attributes={"moemesh.experts": (1, 2, 3), "moemesh.layer": i, "rpc.method": "Compute"},
        resource={"service.name": "moemesh-expert", "telemetry.sdk.version": "1.30.0"},
        status_code="ERROR",
        status_message="boom",
        events=(SpanEvent("retry", i, {"moemesh.replica": 1}),),
        scope="moemesh.services",
    )
    return SpanRecord.from_json(span.to_json())


def batches(make, count: int) -> Iterator[list[SpanRecord]]:
    for start in range(0, count, BATCH):
        yield [make(i) for i in range(start, min(count, start + BATCH))]


def _assert_within(store: TraceStore) -> None:
    assert len(store) <= store.limits.max_spans
    assert store.size_bytes <= store.limits.max_bytes


def test_200k_tiny_spans_stay_within_the_span_bound_and_the_drops_are_counted():
    store = TraceStore(StoreLimits(max_spans=10_000, max_bytes=64 * MIB))
    for batch in batches(tiny, FED):
        store.add(batch)
        _assert_within(store)
    assert len(store) == 10_000
    assert store.dropped_spans == store.dropped_traces == FED - 10_000  # one span per trace: whole traces
    # The latest spans are the ones kept.
    assert {s.span_id for s in store.all_spans()} == {f"{i:016x}" for i in range(FED - 10_000, FED)}
    assert f"dropped {FED - 10_000} spans" in store.usage()


def test_200k_tiny_spans_stay_within_the_byte_bound_in_measured_memory():
    limits = StoreLimits(max_spans=FED, max_bytes=8 * MIB)
    store = TraceStore(limits)
    spans = batches(tiny, FED)
    traced = 20_000  # the last spans fed, allocated under tracemalloc: more than the store keeps
    for _ in range((FED - traced) // BATCH):
        store.add(next(spans))
        _assert_within(store)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in spans:
            store.add(batch)
            _assert_within(store)
        del batch
        # Everything the store holds now was allocated while traced (older spans were dropped,
        # which tracemalloc does not subtract), so this is the store's memory, and then some.
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    kept = len(store)
    assert 0 < kept < traced
    assert store.dropped_spans == FED - kept
    assert held <= store.size_bytes <= limits.max_bytes
    assert store.size_bytes < 2 * held  # high, but not so high that the bound wastes most of itself


@pytest.mark.parametrize("make", [tiny, rich, lambda i: tiny(i, trace=0)], ids=["tiny", "rich", "one-trace"])
def test_the_byte_estimate_errs_high(make):
    spans = [make(i) for i in range(2000)]
    tracemalloc.start()
    try:
        store = TraceStore(StoreLimits(max_spans=10**9, max_bytes=10**12))
        before = tracemalloc.get_traced_memory()[0]
        # Fresh copies, so that only what the store keeps is counted.
        store.add(SpanRecord.from_json(s.to_json()) for s in spans)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= store.size_bytes <= 2 * held


def test_least_recently_updated_traces_go_first_and_whole():
    store = TraceStore(StoreLimits(max_spans=6))
    for trace in range(3):  # traces 0, 1, 2 with two spans each: full
        store.add([tiny(10 * trace, trace), tiny(10 * trace + 1, trace)])
    store.add([tiny(2, 0)])  # trace 0 gets a late span: now trace 1 is the stalest
    assert [t.trace_id for t in store.traces()] == [f"{t:032x}" for t in (0, 2)]
    assert (len(store), store.dropped_spans, store.dropped_traces) == (5, 2, 1)
    assert set(store.last_received()) == {f"{t:032x}" for t in (0, 2)}
    assert store.span_counts() == {f"{2:032x}": 2, f"{0:032x}": 3}
    assert store.summary(f"{1:032x}") is None and store.summary(f"{0:032x}").span_count == 3


def test_a_trace_over_the_bound_by_itself_loses_its_earliest_spans():
    store = TraceStore(StoreLimits(max_spans=100))
    store.add(tiny(i, trace=7) for i in range(250))
    assert [s.span_id for s in store.spans(f"{7:032x}")] == [f"{i:016x}" for i in range(150, 250)]
    assert (store.dropped_spans, store.dropped_traces) == (150, 0)


def test_a_retried_span_is_counted_once_in_spans_and_bytes():
    store = TraceStore()
    spans = [rich(i) for i in range(9)]
    store.add(spans)
    size = store.size_bytes
    store.add(spans[3:])
    assert (len(store), store.size_bytes, store.dropped_spans) == (9, size, 0)


def test_a_span_larger_than_the_byte_bound_is_dropped_and_the_next_one_kept():
    store = TraceStore(StoreLimits(max_bytes=2000))
    huge = SpanRecord("a" * 32, "b" * 16, None, "huge", "INTERNAL", 0, 1, {"blob": "x" * 5000})
    store.add([huge, tiny(1)])
    assert [s.name for s in store.all_spans()] == ["x"]
    assert store.dropped_spans == 1
    _assert_within(store)


def test_a_file_larger_than_the_store_keeps_its_latest_traces(tmp_path):
    path = tmp_path / "spans.jsonl"
    dump_jsonl((rich(i) for i in range(3000)), path)
    store = load_jsonl(path, TraceStore(StoreLimits(max_spans=300)))
    assert len(store) == 300
    assert store.dropped_spans == 2700
    assert min(s.start_ns for s in store.all_spans()) == 2700


def test_limits_are_validated_and_read_in_cli_units():
    assert StoreLimits() == StoreLimits(DEFAULT_MAX_SPANS, DEFAULT_MAX_MB * MIB)
    assert StoreLimits.from_mb(10, 1.5) == StoreLimits(10, 3 * MIB // 2)
    for bad in ({"max_spans": 0}, {"max_bytes": 0}):
        with pytest.raises(ValueError, match="span store"):
            StoreLimits(**bad)
    with pytest.raises(ValueError, match="--max-spans"):
        StoreLimits.from_mb(0, 1)
    for mb in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--max-mb"):
            StoreLimits.from_mb(10, mb)


def test_trace_serve_takes_the_limits_and_refuses_bad_ones_before_binding():
    args = build_parser().parse_args(["trace", "serve", "--max-spans", "50", "--max-mb", "2.5"])
    assert StoreLimits.from_mb(args.max_spans, args.max_mb) == StoreLimits(50, 5 * MIB // 2)
    defaults = build_parser().parse_args(["trace", "serve"])
    assert StoreLimits.from_mb(defaults.max_spans, defaults.max_mb) == StoreLimits()
    # A bad limit is one line and exit 1, before any socket (the unit-test guard would fail it).
    assert main(["trace", "serve", "--port", "0", "--max-spans", "0"]) == 1
    assert main(["trace", "serve", "--port", "0", "--max-mb", "0"]) == 1
