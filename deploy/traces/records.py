"""Received spans as plain records, kept in memory and in `.jsonl` files.

This module owns:

- `SpanRecord` / `SpanEvent`: a received span as a plain frozen dataclass (ids in hex, OTLP
  `AnyValue`s flattened to Python values), the only span type the trace tooling passes around;
- `TraceStore`: spans in memory, grouped by trace id, thread-safe, with `wait_for` for tests,
  bounded by `StoreLimits` (a span count and an estimate of their bytes; least recently
  updated traces are dropped first, and counted);
- the `.jsonl` format (one span per line) that `moemesh trace serve --out` writes and
  `load_jsonl` reads back.

Nothing here needs OpenTelemetry or gRPC: a `.jsonl` file is read and shown without either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SpanMatch = str | Callable[["SpanRecord"], bool] | None


@dataclass(frozen=True)
class SpanEvent:
    """A timestamped event on a span (e.g. an exception or a retry)."""

    name: str
    time_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpanRecord:
    """One received span.

    trace_id: 32 hex digits; span_id, parent_span_id: 16 hex digits (parent None for a root).
    kind: "INTERNAL" | "SERVER" | "CLIENT" | "PRODUCER" | "CONSUMER" | "UNSPECIFIED".
    status_code: "UNSET" | "OK" | "ERROR". Times are Unix nanoseconds.
    attributes / resource: flattened OTLP values: str, bool, int, float, tuple (array),
    dict (key-value list); bytes become hex strings. resource holds `service.name`.
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    status_code: str = "UNSET"
    status_message: str = ""
    events: tuple[SpanEvent, ...] = ()
    scope: str = ""

    @property
    def service_name(self) -> str:
        return str(self.resource.get("service.name", ""))

    @property
    def duration_ns(self) -> int:
        # A clock step between start and end can make this negative; a span never lasts < 0.
        return max(0, self.end_ns - self.start_ns)

    def to_json(self) -> str:
        """One line of the .jsonl format (no newline)."""
        return json.dumps(
            {
                "trace_id": self.trace_id,
                "span_id": self.span_id,
                "parent_span_id": self.parent_span_id,
                "name": self.name,
                "kind": self.kind,
                "start_ns": self.start_ns,
                "end_ns": self.end_ns,
                "attributes": self.attributes,
                "resource": self.resource,
                "status_code": self.status_code,
                "status_message": self.status_message,
                "events": [
                    {"name": e.name, "time_ns": e.time_ns, "attributes": e.attributes} for e in self.events
                ],
                "scope": self.scope,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str) -> SpanRecord:
        d = json.loads(line)
        return cls(
            trace_id=d["trace_id"],
            span_id=d["span_id"],
            parent_span_id=d.get("parent_span_id"),
            name=d["name"],
            kind=d.get("kind", "UNSPECIFIED"),
            start_ns=int(d["start_ns"]),
            end_ns=int(d["end_ns"]),
            attributes=_thaw_attrs(d.get("attributes", {})),
            resource=_thaw_attrs(d.get("resource", {})),
            status_code=d.get("status_code", "UNSET"),
            status_message=d.get("status_message", ""),
            events=tuple(
                SpanEvent(e["name"], int(e["time_ns"]), _thaw_attrs(e.get("attributes", {})))
                for e in d.get("events", ())
            ),
            scope=d.get("scope", ""),
        )


def _thaw_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON turns arrays into lists; records hold tuples, so a round trip compares equal."""

    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return tuple(fix(x) for x in v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return {k: fix(v) for k, v in attrs.items()}


@dataclass(frozen=True)
class TraceSummary:
    """One line's worth about a trace: its root (or earliest span when the root is missing)."""

    trace_id: str
    root_name: str
    has_root: bool
    span_count: int
    start_ns: int
    end_ns: int
    services: tuple[str, ...]
    error_count: int

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


# --- the store ---------------------------------------------------------------------------------

MIB = 1024 * 1024
DEFAULT_MAX_SPANS = 200_000
DEFAULT_MAX_MB = 256

# What a span costs in memory beyond its strings and attribute values: the record, its field
# dict, the two times and its entry in its trace's dict; a trace adds its own dict and index
# entries. Measured with tracemalloc (tests/unit/test_trace_store.py checks the sum errs high).
SPAN_BYTES = 240
TRACE_BYTES = 320


def value_bytes(value: Any) -> int:
    """About what a flattened attribute value (or a str) holds in memory, a little high."""
    if isinstance(value, str):
        return 49 + len(value) if value.isascii() else 80 + 4 * len(value)
    if isinstance(value, dict):
        if not value:
            return 64
        return 232 + sum(40 + value_bytes(k) + value_bytes(v) for k, v in value.items())
    if isinstance(value, tuple | list):
        return 56 + sum(8 + value_bytes(v) for v in value)
    return 32  # int, float; bool and None are shared objects and cost nothing more


def span_bytes(span: SpanRecord) -> int:
    """An estimate of the memory one record holds (a resource dict shared by spans counts in
    full for each: the estimate errs high)."""
    size = SPAN_BYTES + value_bytes(span.attributes) + value_bytes(span.resource)
    for text in (span.trace_id, span.span_id, span.parent_span_id or "", span.name, span.kind):
        size += value_bytes(text)
    for text in (span.status_code, span.status_message, span.scope):
        size += value_bytes(text)
    for event in span.events:
        size += 96 + value_bytes(event.name) + value_bytes(event.attributes)
    return size


@dataclass(frozen=True)
class StoreLimits:
    """How much a `TraceStore` keeps: at most `max_spans` spans and about `max_bytes` bytes of
    them (`span_bytes`, an estimate that errs high). Defaults: 200,000 spans, 256 MiB."""

    max_spans: int = DEFAULT_MAX_SPANS
    max_bytes: int = DEFAULT_MAX_MB * MIB

    def __post_init__(self) -> None:
        if self.max_spans < 1:
            raise ValueError(f"the span store needs room for at least 1 span, not {self.max_spans}")
        if self.max_bytes < 1:
            raise ValueError(f"the span store needs at least 1 byte, not {self.max_bytes}")

    @classmethod
    def from_mb(cls, max_spans: int = DEFAULT_MAX_SPANS, max_mb: float = DEFAULT_MAX_MB) -> StoreLimits:
        """From the CLI's units (`--max-spans`, `--max-mb`); ValueError naming the flag."""
        if max_spans < 1:
            raise ValueError(f"--max-spans must be at least 1, not {max_spans}")
        if not math.isfinite(max_mb) or max_mb <= 0:
            raise ValueError(f"--max-mb must be a positive number of MiB, not {max_mb}")
        return cls(max_spans=max_spans, max_bytes=max(1, round(max_mb * MIB)))

    def __str__(self) -> str:
        return f"{self.max_spans} spans, {self.max_bytes / MIB:.4g} MiB"


class TraceStore:
    """Received spans in memory, by trace id. Thread-safe: the receiver adds from its event loop
    while tests and the CLI read or wait from other threads.

    A span received twice (an exporter retry after a lost reply) is kept once. Over either of
    `limits`, whole traces are dropped, least recently updated first, so that the traces kept are
    complete; a trace that alone is over a bound loses its earliest received spans. What was
    dropped is counted in `dropped_spans` / `dropped_traces` (and `usage()` says it).
    """

    def __init__(self, limits: StoreLimits | None = None) -> None:
        self.limits = limits if limits is not None else StoreLimits()
        self._cond = threading.Condition()
        # Ordered by the latest arrival: the first trace is the one to drop next.
        self._traces: dict[str, dict[str, SpanRecord]] = {}
        self._last_received: dict[str, float] = {}
        self._count = 0
        self._bytes = 0
        self.dropped_spans = 0
        self.dropped_traces = 0

    def add(self, spans: Iterable[SpanRecord]) -> None:
        now = time.monotonic()
        with self._cond:
            tid, trace = None, None
            for s in spans:
                if s.trace_id != tid:
                    tid = s.trace_id
                    # Moved to the end: the most recently updated trace is dropped last.
                    trace = self._traces.pop(tid, None)
                    if trace is None:
                        trace = {}
                        self._bytes += TRACE_BYTES
                    self._traces[tid] = trace
                    self._last_received[tid] = now
                old = trace.get(s.span_id)
                if old is None:
                    self._count += 1
                else:
                    self._bytes -= span_bytes(old)
                trace[s.span_id] = s
                self._bytes += span_bytes(s)
                if self._count > self.limits.max_spans or self._bytes > self.limits.max_bytes:
                    self._evict()
                    if tid not in self._traces:  # the newest span alone was over the byte bound
                        tid = None
            self._cond.notify_all()

    def _evict(self) -> None:
        """Drop the least recently updated traces until both bounds hold (under the lock)."""
        limits = self.limits
        if not self.dropped_spans:
            log.warning("span store full (%s): dropping the least recently updated traces", limits)
        while self._traces and (self._count > limits.max_spans or self._bytes > limits.max_bytes):
            tid = next(iter(self._traces))
            trace = self._traces[tid]
            # The one trace left is over a bound by itself: its earliest received spans go.
            gone = list(trace.values()) if len(self._traces) > 1 else [trace[next(iter(trace))]]
            for s in gone:
                del trace[s.span_id]
                self._bytes -= span_bytes(s)
            self._count -= len(gone)
            self.dropped_spans += len(gone)
            if not trace:
                del self._traces[tid], self._last_received[tid]
                self._bytes -= TRACE_BYTES
                self.dropped_traces += 1

    @property
    def size_bytes(self) -> int:
        """The estimated memory of the spans held (`span_bytes` each, plus each trace's own)."""
        return self._bytes

    def usage(self) -> str:
        """One line: what is held, and what was dropped to stay within the limits."""
        with self._cond:
            traces, count, size = len(self._traces), self._count, self._bytes
            dropped, dropped_traces = self.dropped_spans, self.dropped_traces
        line = f"{traces} traces, {count} spans (~{size / MIB:.1f} MiB)"
        if dropped:
            line += (
                f"; dropped {dropped} spans ({dropped_traces} whole traces), least recently updated "
                f"first, to stay within {self.limits}"
            )
        return line

    def __len__(self) -> int:
        return self._count

    def spans(self, trace_id: str) -> list[SpanRecord]:
        """The spans of one trace sorted by start time; [] for an unknown trace."""
        with self._cond:
            spans = list(self._traces.get(trace_id, {}).values())
        return sorted(spans, key=lambda s: (s.start_ns, s.end_ns))

    def all_spans(self) -> list[SpanRecord]:
        with self._cond:
            spans = [s for t in self._traces.values() for s in t.values()]
        return sorted(spans, key=lambda s: (s.start_ns, s.end_ns))

    def traces(self) -> list[TraceSummary]:
        """A summary of every trace, oldest first (by the earliest span start)."""
        with self._cond:
            traces = {tid: list(t.values()) for tid, t in self._traces.items()}
        return sorted((_summarize(tid, spans) for tid, spans in traces.items()), key=lambda t: t.start_ns)

    def span_counts(self) -> dict[str, int]:
        """trace id → spans held: what changed, without summarising every trace."""
        with self._cond:
            return {tid: len(t) for tid, t in self._traces.items()}

    def summary(self, trace_id: str) -> TraceSummary | None:
        """One trace's summary; None for a trace not held (never received, or dropped)."""
        with self._cond:
            spans = list(self._traces.get(trace_id, {}).values())
        return _summarize(trace_id, spans) if spans else None

    def last_received(self) -> dict[str, float]:
        """trace id → `time.monotonic()` when its latest span arrived (spans loaded from a file
        count as arriving when loaded). Lets a watcher tell that a trace has gone quiet."""
        with self._cond:
            return dict(self._last_received)

    def _matching(self, match: SpanMatch) -> list[SpanRecord]:
        if isinstance(match, str):
            spans = list(self._traces.get(match, {}).values())
        else:
            spans = [s for t in self._traces.values() for s in t.values()]
            if match is not None:
                spans = [s for s in spans if match(s)]
        return sorted(spans, key=lambda s: (s.start_ns, s.end_ns))

    def wait_for(self, match: SpanMatch = None, count: int = 1, timeout: float = 10.0) -> list[SpanRecord]:
        """Block until at least `count` spans match, then return them (sorted by start).

        match: a trace id, a predicate on SpanRecord, or None for any span.
        Raises TimeoutError naming what was received if `timeout` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._matching(match)
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    have = sorted(
                        {f"{s.name}@{s.service_name}" for t in self._traces.values() for s in t.values()}
                    )
                    raise TimeoutError(
                        f"waited {timeout:.1f}s for {count} spans matching {match!r}, found {len(found)}; "
                        f"received {len(have)} distinct name@service: {', '.join(have[:20])}"
                    )
                self._cond.wait(left)

    async def wait_for_async(
        self, match: SpanMatch = None, count: int = 1, timeout: float = 10.0
    ) -> list[SpanRecord]:
        """`wait_for` for coroutines: waits on a worker thread so the receiver's event loop (often
        the same loop) keeps serving Export calls meanwhile."""
        return await asyncio.to_thread(self.wait_for, match, count, timeout)


def _summarize(trace_id: str, spans: list[SpanRecord]) -> TraceSummary:
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_span_id is None]
    # Without a true root (its exporter was lost or has not flushed yet) the earliest span whose
    # parent is missing names the trace.
    candidates = roots or [s for s in spans if s.parent_span_id not in ids] or spans
    head = min(candidates, key=lambda s: (s.start_ns, -s.end_ns))
    return TraceSummary(
        trace_id=trace_id,
        root_name=head.name,
        has_root=bool(roots),
        span_count=len(spans),
        start_ns=min(s.start_ns for s in spans),
        end_ns=max(s.end_ns for s in spans),
        services=tuple(sorted({s.service_name for s in spans if s.service_name})),
        error_count=sum(s.status_code == "ERROR" for s in spans),
    )


# --- .jsonl ------------------------------------------------------------------------------------


def dump_jsonl(spans: Iterable[SpanRecord], path: str | Path) -> None:
    """Append spans to a .jsonl file, one span per line."""
    text = "".join(s.to_json() + "\n" for s in spans)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def load_jsonl(path: str | Path, store: TraceStore | None = None) -> TraceStore:
    """Read a .jsonl file written by the receiver into a (new) TraceStore, line by line: a file
    larger than the store's limits keeps its most recently written traces (see `usage()`).

    A malformed last line is skipped: it is what a receiver killed mid-write leaves behind.
    A malformed line elsewhere raises ValueError naming the line.
    """
    store = store if store is not None else TraceStore()
    bad: tuple[int, Exception] | None = None  # a malformed line, an error unless it is the last
    batch: list[SpanRecord] = []
    with open(path, encoding="utf-8") as lines:
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if bad is not None:
                raise ValueError(f"{path}:{bad[0]}: not a span record: {bad[1]}") from bad[1]
            try:
                batch.append(SpanRecord.from_json(line))
            except (ValueError, KeyError, TypeError) as err:
                bad = (i, err)
            if len(batch) >= 1024:
                store.add(batch)
                batch = []
    store.add(batch)
    if bad is not None:
        log.warning("%s:%d: skipping a truncated last line", path, bad[0])
    if store.dropped_spans:
        log.warning("%s is larger than the span store: %s", path, store.usage())
    return store
