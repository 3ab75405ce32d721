"""A small OTLP/gRPC trace receiver, so that traces of the mesh can be inspected with no other
software (no collector, no Jaeger).

This module owns:

- `SpanRecord` / `SpanEvent`: a received span as a plain frozen dataclass (ids in hex, OTLP
  `AnyValue`s flattened to Python values), the only span type the trace tooling passes around;
- `TraceStore`: spans in memory, grouped by trace id, thread-safe, with `wait_for` for tests;
- `TraceReceiver`: the `opentelemetry.proto...TraceService` servicer (`Export`);
- `start_receiver` (asyncio) and `ReceiverThread` (a receiver on its own thread, for synchronous
  callers such as tests that use the blocking OTLP exporter);
- the `.jsonl` format (one span per line) written with `--out` and read back by `load_jsonl`.

    server, port, store = await start_receiver(jsonl_path="spans.jsonl")
    # processes export with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>
    spans = await store.wait_for_async(trace_id, count=7)
    await server.stop(0.5)

Rendering (waterfall text, PNG timeline) lives in `moemesh.deploy.trace_view`.
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

import grpc

from .bootstrap import channel_options

try:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
    from opentelemetry.proto.trace.v1 import trace_pb2

    _ServicerBase: type = trace_service_pb2_grpc.TraceServiceServicer
except ImportError:  # the `otel` extra is absent: records and .jsonl files still work, serving does not
    trace_service_pb2 = trace_service_pb2_grpc = trace_pb2 = None
    _ServicerBase = object

log = logging.getLogger(__name__)

# OTLP exporters batch up to 512 spans by default; a span with many attributes is a few KiB, so
# this leaves room for large batches without accepting unbounded requests.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

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


# --- OTLP protobuf → records -----------------------------------------------------------------


def _any_value(v) -> Any:
    """Flatten an OTLP AnyValue into a plain Python value."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(_any_value(x) for x in v.array_value.values)
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def _attrs(key_values) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in key_values}


def _enum_name(enum, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix)
    except ValueError:  # a newer sender's enum value: keep the number rather than fail the export
        return str(value)


def spans_from_request(request) -> list[SpanRecord]:
    """All spans of an `ExportTraceServiceRequest`, each with its resource's attributes."""
    out: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource = _attrs(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for s in scope_spans.spans:
                out.append(
                    SpanRecord(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() or None,
                        name=s.name,
                        kind=_enum_name(trace_pb2.Span.SpanKind, s.kind, "SPAN_KIND_"),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=_attrs(s.attributes),
                        resource=resource,
                        status_code=_enum_name(trace_pb2.Status.StatusCode, s.status.code, "STATUS_CODE_"),
                        status_message=s.status.message,
                        events=tuple(
                            SpanEvent(e.name, e.time_unix_nano, _attrs(e.attributes)) for e in s.events
                        ),
                        scope=scope,
                    )
                )
    return out


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


# --- the servicer and the server ---------------------------------------------------------------


class TraceReceiver(_ServicerBase):
    """OTLP TraceService: stores every exported span and optionally appends it to a .jsonl file."""

    def __init__(self, store: TraceStore, jsonl_path: str | Path | None = None) -> None:
        self.store = store
        self.jsonl_path = Path(jsonl_path) if jsonl_path else None

    async def Export(self, request, context):
        spans = spans_from_request(request)
        # The file first: whoever is woken by the store may read the file straight away.
        if self.jsonl_path is not None and spans:
            dump_jsonl(spans, self.jsonl_path)
        self.store.add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _require_otlp() -> None:
    if trace_service_pb2_grpc is None:
        raise ImportError(
            "the OTLP receiver needs opentelemetry-proto: pip install 'moemesh[otel]' "
            "(reading a .jsonl file does not)"
        )


async def start_receiver(
    host: str = "127.0.0.1",
    port: int = 0,
    store: TraceStore | None = None,
    jsonl_path: str | Path | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, int, TraceStore]:
    """Start an OTLP/gRPC trace receiver on the running event loop.

    port 0 binds any free port; the bound port is returned. Spans are appended to `jsonl_path`
    (when given; an existing file is extended, not truncated) and kept in `store`.
    Health (`grpc.health.v1`) and reflection are served as on every moemesh server.
    Stop with `await server.stop(grace)`.
    """
    _require_otlp()
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    store = store if store is not None else TraceStore()
    server = grpc.aio.server(options=channel_options(max_message_bytes))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceReceiver(store, jsonl_path), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_name = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
    reflection.enable_server_reflection([service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:  # newer grpcio raises where older ones returned 0
        raise OSError(f"could not bind the OTLP receiver to {address}") from err
    if bound == 0:
        raise OSError(f"could not bind the OTLP receiver to {address}")
    await server.start()
    for name in (service_name, ""):
        result = health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if asyncio.iscoroutine(result):  # aio health servicers are async in some grpcio releases
            await result
    log.info("OTLP trace receiver on %s:%d", host, bound)
    return server, bound, store


class ReceiverThread:
    """A receiver on its own thread and event loop, for synchronous code (the blocking OTLP
    exporter, tests that start other processes):

        with ReceiverThread(jsonl_path=tmp / "spans.jsonl") as rx:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint
            ...
            rx.store.wait_for(trace_id, count=7)
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        store: TraceStore | None = None,
        jsonl_path: str | Path | None = None,
        grace_s: float = 1.0,
    ) -> None:
        self.host = host
        self.store = store if store is not None else TraceStore()
        self.port = port
        self._requested_port = port
        self._jsonl_path = jsonl_path
        self._grace_s = grace_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_ENDPOINT."""
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            server, self.port, _ = await start_receiver(
                self.host, self._requested_port, self.store, self._jsonl_path
            )
        except BaseException as err:
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(self._grace_s)

    def start(self) -> ReceiverThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        """Stop the server and join the thread; safe to call twice."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> ReceiverThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
