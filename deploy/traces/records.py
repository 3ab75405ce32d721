"""Received spans as plain records, kept in memory and in `.jsonl` files.

This module owns:

- `SpanRecord` / `SpanEvent`: a received span as a plain frozen dataclass (ids in hex, OTLP
  `AnyValue`s flattened to Python values), the only span type the trace tooling passes around;
- `TraceStore`: spans in memory, grouped by trace id, thread-safe, with `wait_for` for tests;
- the `.jsonl` format (one span per line) that `moemesh trace serve --out` writes and
  `load_jsonl` reads back.

Nothing here needs OpenTelemetry or gRPC: a `.jsonl` file is read and shown without either.
"""

from __future__ import annotations

import asyncio
import json
import logging
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


class TraceStore:
    """Received spans in memory, by trace id. Thread-safe: the receiver adds from its event loop
    while tests and the CLI read or wait from other threads.

    A span received twice (an exporter retry after a lost reply) is kept once.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._traces: dict[str, dict[str, SpanRecord]] = {}
        self._last_received: dict[str, float] = {}

    def add(self, spans: Iterable[SpanRecord]) -> None:
        now = time.monotonic()
        with self._cond:
            for s in spans:
                self._traces.setdefault(s.trace_id, {})[s.span_id] = s
                self._last_received[s.trace_id] = now
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return sum(len(t) for t in self._traces.values())

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
    """Read a .jsonl file written by the receiver into a (new) TraceStore.

    A malformed last line is skipped: it is what a receiver killed mid-write leaves behind.
    A malformed line elsewhere raises ValueError naming the line.
    """
    store = store if store is not None else TraceStore()
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    spans = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            spans.append(SpanRecord.from_json(line))
        except (ValueError, KeyError, TypeError) as err:
            if i == last:
                log.warning("%s:%d: skipping a truncated last line", path, i + 1)
                continue
            raise ValueError(f"{path}:{i + 1}: not a span record: {err}") from err
    store.add(spans)
    return store
