"""Traces of the sparse path, and what one process's components report to.

    configure_tracing("moemesh-router")       # once, at the entry point; None = tracing off
    telemetry = Telemetry(metrics=Metrics())  # handed to servers, transports and clients

One forward is one trace (every span a child of the one above it):

    moemesh.v1.Router/Forward          CLIENT  SDK: layer, tokens, routing policy
      moemesh.v1.Router/Forward        SERVER  router (TelemetryInterceptor)
        moemesh.gate                           layer, policy, tokens, routed rows
        moemesh.plan                           experts activated, tokens per expert, hosts, rows per host
        moemesh.dispatch                       planned hosts, retries, failed hosts
          moemesh.v1.Expert/Compute    CLIENT  one per host call (GrpcTransport): host, rows, bytes, retry
            moemesh.v1.Expert/Compute  SERVER  expert host (TelemetryInterceptor)
              moemesh.queue_wait               decoded request → the executor starts it
              moemesh.compute                  device, dtype, rows, experts
        moemesh.combine

RPC spans follow the OpenTelemetry RPC semantic conventions (name `package.Service/Method`,
`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, `server.address`,
`server.port`); every other attribute has a `moemesh.` prefix. Context travels in gRPC metadata
as W3C `traceparent` (the global propagator, so `OTEL_PROPAGATORS` applies).

Components take a tracer provider (`Telemetry.tracer_provider`) that defaults to the global one:
OpenTelemetry lets a process set its global provider only once, so tests pass their own.
Without the `otel` extra installed every tracer here is a no-op and nothing fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the `otel` extra is absent: tracing is off, everything else works
    propagate = trace = None
    SpanKind = Status = StatusCode = None

if TYPE_CHECKING:
    import torch

    from moemesh.protos import moemesh_pb2 as pb
    from moemesh.router.gating import RoutingPolicy
    from moemesh.router.pipeline import ForwardFacts

    from .metrics import Metrics, MetricsServer

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "moemesh"
# Either one turns tracing on (the SDK reads the rest of the OTEL_* variables itself).
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
HOST_ATTRIBUTE = "moemesh.host"
# Infrastructure services: neither traced nor counted (health probes would drown the real traces).
UNOBSERVED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")

# -- configuration, once per process -------------------------------------------------------------


@dataclass(frozen=True)
class TelemetryConfig:
    """How one process reports, parsed once at the entry point.

    service_name: the resource's `service.name` (`OTEL_SERVICE_NAME` wins when set).
    resource: more resource attributes, e.g. `(("moemesh.host", "gpu0"),)`.
    metrics_host, metrics_port: where `/metrics` is served; port 0 = not served, and no metrics kept.
    """

    service_name: str
    resource: tuple[tuple[str, str], ...] = ()
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0


@dataclass(frozen=True)
class Telemetry:
    """What a process's components report to.

    tracer_provider: None = the global provider (a no-op unless `configure_tracing` installed one).
    metrics: None = no metrics. metrics_server: the `/metrics` endpoint, when one is served.
    """

    tracer_provider: Any = None
    metrics: Metrics | None = None
    metrics_server: MetricsServer | None = None

    def tracer(self):
        if trace is None:
            return _NO_TRACER
        if self.tracer_provider is not None:
            return self.tracer_provider.get_tracer(INSTRUMENTATION_NAME)
        return trace.get_tracer(INSTRUMENTATION_NAME)


_configured: Any = None  # the provider configure_tracing installed; OpenTelemetry allows one


def otlp_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP endpoint `environ` configures for traces, or None."""
    for name in OTLP_ENDPOINT_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def configure_tracing(service_name: str, resource_attributes: Mapping[str, str] | None = None):
    """Install this process's tracer provider if an OTLP endpoint is configured; call it once,
    from the entry point (it reads the environment when called, never at import).

    With `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set (and
    `OTEL_SDK_DISABLED` not true): a TracerProvider with a BatchSpanProcessor and an OTLP/gRPC
    exporter, resource `service.name=service_name` plus `resource_attributes`; the SDK applies the
    other standard variables itself (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
    `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*`). It is flushed and shut
    down at interpreter exit. Returns it, or None when tracing stays off: then no provider, no
    exporter thread, and every span is the API's no-op. A second call returns the first provider.
    """
    global _configured
    if _configured is not None:
        return _configured
    if otlp_endpoint(os.environ) is None or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("an OTLP endpoint is set but the `otel` extra is not installed: tracing stays off")
        return None
    # Resource.create puts our attributes above the environment's; re-applying the environment's
    # detector lets OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win, as users expect.
    resource = Resource.create({SERVICE_NAME: service_name, **(resource_attributes or {})}).merge(
        OTELResourceDetector().detect()
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = provider
    log.info("exporting traces over OTLP to %s as %s", otlp_endpoint(os.environ), service_name)
    return provider


def start_telemetry(config: TelemetryConfig) -> Telemetry:
    """For entry points: `configure_tracing`, and with a metrics port, metrics served on it."""
    configure_tracing(config.service_name, dict(config.resource))
    if not config.metrics_port:
        return Telemetry()
    from .metrics import Metrics  # prometheus_client is only needed when metrics are asked for

    metrics = Metrics()
    server = metrics.serve(config.metrics_host, config.metrics_port)
    log.info("metrics on %s", server.url)
    return Telemetry(metrics=metrics, metrics_server=server)


# -- context in gRPC metadata ----------------------------------------------------------------------


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current span's context as gRPC metadata (`traceparent`, ...); None when there is none."""
    if propagate is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None


def incoming_context(metadata: Sequence[tuple[str, Any]] | None):
    """The caller's span context from received gRPC metadata (None when absent)."""
    if propagate is None or not metadata:
        return None
    return propagate.extract({key: value for key, value in metadata if isinstance(value, str)})


# -- RPC spans -------------------------------------------------------------------------------------


def split_method(full_method: str) -> tuple[str, str]:
    """(service, method) of a gRPC path: "/moemesh.v1.Router/Forward" -> ("moemesh.v1.Router", "Forward")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _address_attributes(target: str) -> dict[str, Any]:
    """server.address / server.port of a "host:port" target ("[v6]:port" too)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return {"server.address": target} if target else {}
    return {"server.address": host.strip("[]"), "server.port": int(port)}


def _rpc_attributes(full_method: str, target: str = "") -> dict[str, Any]:
    service, method = split_method(full_method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, **_address_attributes(target)}


def status_code_of(err: BaseException) -> grpc.StatusCode:
    """The gRPC status an exception stands for: its own (or its cause's) `code()`, else
    CANCELLED for a cancellation and UNKNOWN for anything else."""
    for candidate in (err, err.__cause__):
        code = getattr(candidate, "code", None)
        if callable(code):
            try:
                value = code()
            except Exception:  # a code() that needs arguments is not grpc's
                continue
            if isinstance(value, grpc.StatusCode):
                return value
    if isinstance(err, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _details_of(err: BaseException) -> str:
    """The status message of a gRPC error (its own or its cause's), else the exception's text."""
    for candidate in (err, err.__cause__):
        details = getattr(candidate, "details", None)
        if callable(details):
            try:
                return str(details() or "")
            except Exception:  # a details() that needs arguments is not grpc's
                continue
    return str(err)


# OpenTelemetry RPC conventions: a server span is an error only for these codes; the others are
# the caller's doing (bad input, a missing resource, its own deadline ...).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _end_rpc(span, code: grpc.StatusCode, details: str, server: bool) -> None:
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK and (not server or code in _SERVER_ERRORS):
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details else code.name))


class ClientCall:
    """The CLIENT span of one outgoing RPC and the metadata that carries its context."""

    def __init__(self, span, metadata: tuple[tuple[str, str], ...] | None):
        self.span = span
        self.metadata = metadata

    @property
    def recording(self) -> bool:
        """Whether attributes are kept: compute costly ones only when True."""
        return self.span.is_recording()

    def set(self, key: str, value: Any) -> None:
        if self.span.is_recording():
            self.span.set_attribute(key, value)


@contextmanager
def client_call(
    tracer, full_method: str, target: str, attributes: Mapping[str, Any] | None = None
) -> Iterator[ClientCall]:
    """A CLIENT span around one unary RPC to `target` ("host:port"), current while it runs.

    Send `call.metadata` with the RPC. An exception leaving the block sets the span's status
    from its gRPC code (its own or its `__cause__`'s), so callers may map errors inside it.
    """
    service, method = split_method(full_method)
    with tracer.start_as_current_span(
        f"{service}/{method}",
        kind=SpanKind.CLIENT if SpanKind is not None else None,
        attributes={**_rpc_attributes(full_method, target), **(attributes or {})},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        call = ClientCall(span, outgoing_metadata())
        try:
            yield call
        except BaseException as err:
            _end_rpc(span, status_code_of(err), _details_of(err), server=False)
            raise
        _end_rpc(span, grpc.StatusCode.OK, "", server=False)


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span and the RPC metrics for every unary moemesh RPC a server handles.

    Outermost interceptor: it sees the final status, including what ErrorInterceptor turned a
    domain error into. The span's parent comes from the caller's `traceparent`. `attributes` are
    added to every span (e.g. `moemesh.host`); `server_address` is set by the bootstrap once bound.
    """

    def __init__(self, telemetry: Telemetry, attributes: Mapping[str, Any] | None = None):
        self._tracer = telemetry.tracer()
        self._metrics = telemetry.metrics
        self._attributes = dict(attributes or {})
        self.server_address: str = ""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        if (
            handler is None
            or handler.unary_unary is None
            or full_method.lstrip("/").startswith(UNOBSERVED_SERVICES)
        ):
            return handler
        service, method = split_method(full_method)
        inner, tracer, metrics = handler.unary_unary, self._tracer, self._metrics

        async def observed(request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            code, response = grpc.StatusCode.OK, None
            with tracer.start_as_current_span(
                f"{service}/{method}",
                context=incoming_context(context.invocation_metadata()),
                kind=SpanKind.SERVER if SpanKind is not None else None,
                attributes={**_rpc_attributes(full_method, self.server_address), **self._attributes},
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    response = await inner(request, context)
                    code = context.code() or grpc.StatusCode.OK
                    return response
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except BaseException as err:
                    # ErrorInterceptor (inside this one) has aborted with the domain error's status.
                    code = context.code() or status_code_of(err)
                    raise
                finally:
                    details = context.details() or ""
                    _end_rpc(span, code, details.decode() if isinstance(details, bytes) else details, True)
                    if metrics is not None:
                        metrics.observe_rpc(service, method, code.name, time.perf_counter() - started)
                        metrics.observe_wire(_byte_size(request), _byte_size(response))

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _byte_size(message) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if callable(size) else 0


# -- the router pipeline's stages --------------------------------------------------------------------


def describe_policy(policy: RoutingPolicy | None) -> str:
    """The policy as a span attribute: "default", or the mode and the fields that are set, e.g.
    "top_p(top_p=0.9,max_k=4)"."""
    if policy is None:
        return "default"
    fields = [
        f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
        for name in ("top_k", "top_p", "threshold", "max_k")
        if (value := getattr(policy, name)) is not None
    ]
    mode = getattr(policy.mode, "value", policy.mode)
    return f"{mode}({','.join(fields)})"


def stage_attributes(name: str, facts: ForwardFacts) -> dict[str, Any]:
    """The `moemesh.*` attributes of stage `name` from what the forward has decided so far."""
    attrs: dict[str, Any] = {"moemesh.layer": facts.layer}
    if name == "gate":
        attrs["moemesh.tokens"] = facts.tokens
        attrs["moemesh.routing.policy"] = describe_policy(facts.policy)
        if facts.routing is not None:
            attrs["moemesh.routing.slots"] = int(facts.routing.experts.shape[1])
            attrs["moemesh.routed_rows"] = int((facts.routing.experts >= 0).sum())
    elif name == "plan" and facts.plan is not None:
        per_expert = facts.plan.tokens_per_expert.tolist()
        attrs["moemesh.tokens_per_expert"] = per_expert
        attrs["moemesh.experts_activated"] = sum(1 for n in per_expert if n)
        attrs["moemesh.hosts"] = [b.host for b in facts.plan.batches]
        attrs["moemesh.rows_per_host"] = [b.num_rows for b in facts.plan.batches]
    elif name == "dispatch":
        if facts.plan is not None:
            attrs["moemesh.hosts"] = [b.host for b in facts.plan.batches]
        attrs["moemesh.retries"] = facts.retries
        attrs["moemesh.failed_hosts"] = list(facts.failed_hosts)
    elif name == "combine":
        attrs["moemesh.tokens"] = facts.tokens
    return attrs


class PipelineTelemetry:
    """Observes `moemesh.router.pipeline.SparseMoE` (its `PipelineObserver`): a `moemesh.<stage>`
    span per stage, and the routing metrics (tokens per expert, load balance) after each plan."""

    def __init__(self, telemetry: Telemetry):
        self._tracer = telemetry.tracer()
        self._metrics = telemetry.metrics

    @contextmanager
    def stage(self, name: str, facts: ForwardFacts) -> Iterator[None]:
        with self._tracer.start_as_current_span(f"moemesh.{name}") as span:
            try:
                yield
            finally:
                if span.is_recording():
                    span.set_attributes(stage_attributes(name, facts))
                if name == "plan" and self._metrics is not None and facts.plan is not None:
                    self._metrics.observe_routing(
                        facts.layer, facts.tokens, facts.plan.tokens_per_expert.tolist()
                    )


# -- an expert host's queue and compute --------------------------------------------------------------


class ComputeTiming:
    """When one Compute call was queued, started and finished on its host's executor.

    Made on the event loop when the request is decoded; `run` wraps the work on the executor.
    Wall-clock times (for spans) are derived from one wall-clock reading plus monotonic offsets.
    """

    def __init__(self) -> None:
        self.queued_ns = time.time_ns()
        self._queued = time.perf_counter_ns()
        self._started: int | None = None
        self._ended: int | None = None

    def run(self, fn: Callable, *args):
        self._started = time.perf_counter_ns()
        try:
            return fn(*args)
        finally:
            self._ended = time.perf_counter_ns()

    def _wall(self, mono: int) -> int:
        return self.queued_ns + (mono - self._queued)

    @property
    def started_ns(self) -> int | None:
        return None if self._started is None else self._wall(self._started)

    @property
    def ended_ns(self) -> int | None:
        return None if self._ended is None else self._wall(self._ended)

    @property
    def queue_wait_s(self) -> float:
        started = self._started if self._started is not None else time.perf_counter_ns()
        return max(0, started - self._queued) / 1e9


class ComputeTelemetry:
    """An expert host's side: `moemesh.queue_wait` and `moemesh.compute` spans under the Compute
    server span, queue depth and wait, rows per compute call, and device memory."""

    def __init__(
        self, telemetry: Telemetry, device: torch.device, dtype: str, weight_bytes: Callable[[], int]
    ):
        self._tracer = telemetry.tracer()
        self._metrics = telemetry.metrics
        self._attributes = {"moemesh.device": str(device), "moemesh.dtype": dtype}
        if self._metrics is not None:
            self._metrics.track_device(device, weight_bytes)

    @contextmanager
    def queued(self, request: pb.ComputeRequest) -> Iterator[ComputeTiming]:
        """Around one call from its decoded request to its reply: counts it in the queue depth;
        run the work through the yielded timing's `run`. Reports spans and metrics at the end."""
        timing = ComputeTiming()
        if self._metrics is not None:
            self._metrics.queue_depth.inc()
        error: BaseException | None = None
        try:
            yield timing
        except BaseException as err:
            error = err
            raise
        finally:
            if self._metrics is not None:
                self._metrics.queue_depth.dec()
            self._report(timing, request, error)

    def _report(self, timing: ComputeTiming, request: pb.ComputeRequest, error: BaseException | None) -> None:
        started, ended = timing.started_ns, timing.ended_ns
        if self._metrics is not None and started is not None:
            rows = int(request.rows.shape[0]) if request.rows.shape else 0
            self._metrics.observe_compute(timing.queue_wait_s, rows)
        queue = self._tracer.start_span("moemesh.queue_wait", start_time=timing.queued_ns)
        queue.end(end_time=started if started is not None else time.time_ns())
        if started is None:  # cancelled (deadline, caller gone) before the executor took it
            return
        compute = self._tracer.start_span("moemesh.compute", start_time=started)
        if compute.is_recording():
            compute.set_attributes({**self._attributes, **compute_attributes(request)})
            if error is not None:
                compute.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        compute.end(end_time=ended if ended is not None else time.time_ns())


def compute_attributes(request: pb.ComputeRequest) -> dict[str, Any]:
    """rows, segments, layer and experts of a Compute request, read from the message (no decode)."""
    segments = request.segments
    return {
        "moemesh.rows": int(request.rows.shape[0]) if request.rows.shape else 0,
        "moemesh.segments": len(segments),
        "moemesh.layer": int(segments[0].layer) if segments else -1,
        "moemesh.experts": [int(s.expert) for s in segments],
    }


# -- no OpenTelemetry installed ----------------------------------------------------------------------


class _NoSpan:
    def is_recording(self) -> bool:
        return False

    def set_attribute(self, *args, **kwargs) -> None:
        pass

    def set_attributes(self, *args, **kwargs) -> None:
        pass

    def set_status(self, *args, **kwargs) -> None:
        pass

    def end(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc) -> None:
        return None


class _NoTracer:
    def start_span(self, *args, **kwargs) -> _NoSpan:
        return _NO_SPAN

    def start_as_current_span(self, *args, **kwargs) -> _NoSpan:
        return _NO_SPAN


_NO_SPAN = _NoSpan()
_NO_TRACER = _NoTracer()
