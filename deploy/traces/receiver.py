"""A small OTLP/gRPC trace receiver, so that traces of the mesh can be inspected with no other
software (no collector, no Jaeger).

This module owns:

- `iter_spans` / `spans_from_request`: an OTLP `ExportTraceServiceRequest` as `SpanRecord`s;
- `TraceReceiver`: the `opentelemetry.proto...TraceService` servicer (`Export`), which keeps
  spans in a bounded `TraceStore` (`records.StoreLimits`);
- `start_receiver` (asyncio; a server from the one bootstrap, `moemesh.services.bootstrap`) and
  `ReceiverThread` (a receiver on its own thread, for synchronous callers such as tests that use
  the blocking OTLP exporter).

    server, port, store = await start_receiver(jsonl_path="spans.jsonl")
    # processes export with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>
    spans = await store.wait_for_async(trace_id, count=7)
    await server.stop(0.5)

Records, the store and the `.jsonl` format live in `records`; rendering in `view`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moemesh.services.bootstrap import RunningServer, ServerConfig, Service, host_port, start_server

from .records import SpanEvent, SpanRecord, TraceStore, dump_jsonl

try:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
    from opentelemetry.proto.trace.v1 import trace_pb2

    _ServicerBase: type = trace_service_pb2_grpc.TraceServiceServicer
except ImportError:  # the `otel` extra is absent: records and .jsonl files still work, serving does not
    trace_service_pb2 = trace_service_pb2_grpc = trace_pb2 = None
    _ServicerBase = object

log = logging.getLogger(__name__)

# OTLP exporters batch up to 512 spans by default, a few hundred bytes each for the mesh's spans;
# 4 MiB is also the OpenTelemetry Collector's default. Decoded, a request can take ~85 times its
# size (a 2-byte empty span is a ~170-byte message object), so the limit is kept low on purpose.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Exports in flight at once (health checks included; the rest get RESOURCE_EXHAUSTED, which OTLP
# exporters retry): bounds the request bytes held while they wait for the event loop.
DEFAULT_MAX_CONCURRENT_EXPORTS = 64
# Spans are converted, written and stored this many at a time, so that a request holding far more
# spans than the store keeps is never all converted at once.
CHUNK_SPANS = 1024
TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


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
    return list(iter_spans(request))


def iter_spans(request) -> Iterator[SpanRecord]:
    """The spans of an `ExportTraceServiceRequest` one at a time, in the request's order (spans
    of one resource share one attributes dict)."""
    for resource_spans in request.resource_spans:
        resource = _attrs(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for s in scope_spans.spans:
                yield SpanRecord(
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
                    events=tuple(SpanEvent(e.name, e.time_unix_nano, _attrs(e.attributes)) for e in s.events),
                    scope=scope,
                )


# --- the servicer and the server ---------------------------------------------------------------


class TraceReceiver(_ServicerBase):
    """OTLP TraceService: keeps exported spans in a bounded store and optionally appends every
    one to a .jsonl file (the file is not bounded: it is the user's record)."""

    def __init__(self, store: TraceStore, jsonl_path: str | Path | None = None) -> None:
        self.store = store
        self.jsonl_path = Path(jsonl_path) if jsonl_path else None

    async def Export(self, request, context):
        spans = iter_spans(request)
        while chunk := list(itertools.islice(spans, CHUNK_SPANS)):
            # The file first: whoever is woken by the store may read the file straight away.
            if self.jsonl_path is not None:
                dump_jsonl(chunk, self.jsonl_path)
            self.store.add(chunk)
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
    max_concurrent_exports: int = DEFAULT_MAX_CONCURRENT_EXPORTS,
) -> tuple[RunningServer, int, TraceStore]:
    """Start an OTLP/gRPC trace receiver on the running event loop.

    port 0 binds any free port; the bound port is returned. Spans are appended to `jsonl_path`
    (when given; an existing file is extended, not truncated) and kept in `store` (default: a
    store with the default `StoreLimits`). A request over `max_message_bytes` (default 4 MiB)
    gets RESOURCE_EXHAUSTED, as do calls beyond `max_concurrent_exports` in flight.
    A server like every moemesh server (health, reflection, limits, graceful stop); its own
    Export calls are not traced. Stop with `await server.stop(grace)`.
    """
    _require_otlp()
    store = store if store is not None else TraceStore()
    receiver = TraceReceiver(store, jsonl_path)
    service = Service(
        TRACE_SERVICE,
        lambda server: trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server),
    )
    config = ServerConfig(
        host=host,
        port=port,
        max_message_bytes=max_message_bytes,
        max_concurrent_rpcs=max_concurrent_exports,
    )
    try:
        server = await start_server(config, [service])
    except OSError as err:
        raise OSError(f"could not bind the OTLP receiver to {host_port(host, port)}") from err
    log.info("OTLP trace receiver on %s", server.address)
    return server, server.port, store


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
