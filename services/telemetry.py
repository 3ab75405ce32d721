"""Traces of the sparse path, and what one process's components report to.

    configure_tracing("moemesh-router")       # once, at the entry point; None = tracing off
    telemetry = Telemetry(metrics=Metrics())  # handed to servers, transports and clients

One forward is one trace (every span a child of the one above it):

    moemesh.v1.Router/Forward          CLIENT  SDK: layer, tokens, routing policy
      moemesh.v1.Router/Forward        SERVER  router
        moemesh.gate                           layer, policy, tokens, routed rows
        moemesh.plan                           experts activated, tokens per expert, hosts, rows per host
        moemesh.dispatch                       planned hosts, retries, failed hosts
          moemesh.v1.Expert/Compute    CLIENT  one per host call (GrpcTransport): host, rows, bytes, retry
            moemesh.v1.Expert/Compute  SERVER  expert host
              moemesh.queue_wait               decoded request → its compute round starts
              moemesh.compute                  device, dtype, rows, experts, the round's calls and rows
        moemesh.combine

The RPC spans are opentelemetry-instrumentation-grpc's: its interceptors start them, set
`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code` and the status (on a server,
only the codes the RPC conventions count as server errors), and carry the context in gRPC
metadata as W3C `traceparent` (the global propagator, so `OTEL_PROPAGATORS` applies). The small
interceptors here complete those spans while they are current: the name `package.Service/Method`
(the conventions' form; the library's has a leading "/"), `server.address` / `server.port`, and
the `moemesh.*` attributes: a caller's through `moemesh.client.tracing.call_attributes` (the
client side is shared with the SDK), a server's (`moemesh.host`) from the bootstrap. Everything
else here is a domain span (`moemesh.<stage>`) or a metric.

Components take a tracer provider (`Telemetry.tracer_provider`) that defaults to the global one:
OpenTelemetry lets a process set its global provider only once, so tests pass their own. Until a
provider is configured, the API's tracers are no-ops.
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
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_prefix
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Status, StatusCode

from moemesh.client.tracing import address_attributes, client_spans, tracing_on
from moemesh.protos.spec import describe

if TYPE_CHECKING:
    import torch

    from moemesh.protos import moemesh_pb2 as pb
    from moemesh.router.pipeline import ForwardFacts

    from .metrics import Metrics, MetricsServer

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "moemesh"
# Either one turns tracing on (the SDK reads the rest of the OTEL_* variables itself).
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
HOST_ATTRIBUTE = "moemesh.host"
STATUS_CODE_ATTRIBUTE = "rpc.grpc.status_code"
# Infrastructure services: neither traced nor counted (health probes would drown the real traces,
# and a trace receiver tracing its own Export calls would feed itself).
UNOBSERVED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.", "opentelemetry.proto.collector.")

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

    def tracer(self) -> trace.Tracer:
        """The tracer of the domain spans (the RPC spans are the gRPC instrumentation's)."""
        return trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=self.tracer_provider)

    @property
    def tracing(self) -> bool:
        """Whether spans are recorded (a provider given or installed globally)."""
        return tracing_on(self.tracer_provider)

    def client_interceptors(self, target: str) -> list[grpc.aio.ClientInterceptor]:
        """For a `grpc.aio` channel to `target` ("host:port"): a CLIENT span for every call."""
        return client_spans(target, self.tracer_provider)

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        """The SERVER span of every call, its parent from the caller's `traceparent`; put
        `ServerSpans` just inside it."""
        return aio_server_interceptor(self.tracer_provider, filter_=_observed)


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
    down at interpreter exit. Returns it, or None when tracing stays off (no endpoint, or the
    `otel` extra with the SDK not installed): then no provider, no exporter thread, and every span
    is the API's no-op. A second call returns the first provider.
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


def flush_tracing(timeout_s: float = 10.0) -> None:
    """Export the spans this process still holds (before it is killed; exit hooks flush otherwise)."""
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is not None:
        flush(int(timeout_s * 1000))


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


# -- completing the instrumentation's RPC spans ------------------------------------------------------


def split_method(full_method: str) -> tuple[str, str]:
    """(service, method) of a gRPC path: "/moemesh.v1.Router/Forward" -> ("moemesh.v1.Router", "Forward")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _full_method(details) -> str:
    method = details.method  # bytes from some grpc.aio releases (grpc/grpc#31092)
    return method.decode() if isinstance(method, bytes) else method


# The instrumentation's filter (it takes every kind of call details): all but UNOBSERVED_SERVICES.
_observed = negate(any_of(*(service_prefix(s) for s in UNOBSERVED_SERVICES)))


def _traced(details) -> bool:
    """Whether the instrumentation started a span for this call (so that it is the current one)."""
    return is_instrumentation_enabled() and _observed(details)


class ServerSpans(grpc.aio.ServerInterceptor):
    """Just inside `Telemetry.server_interceptor`: completes its SERVER span of each unary call
    with the name, `server.address` / `server.port` (`server_address`, which the bootstrap sets
    once bound), `attributes` (e.g. `moemesh.host`), and CANCELLED when the caller gave up (the
    instrumentation leaves a cancelled call at OK)."""

    def __init__(self, attributes: Mapping[str, Any] | None = None):
        self._attributes = dict(attributes or {})
        self.server_address: str = ""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not _traced(handler_call_details):
            return handler
        inner, name = handler.unary_unary, _full_method(handler_call_details).lstrip("/")

        async def completed(request, context: grpc.aio.ServicerContext):
            span = trace.get_current_span()
            if span.is_recording():
                span.update_name(name)
                span.set_attributes({**address_attributes(self.server_address), **self._attributes})
            try:
                return await inner(request, context)
            except asyncio.CancelledError:
                span.set_attribute(STATUS_CODE_ATTRIBUTE, grpc.StatusCode.CANCELLED.value[0])
                raise

        return grpc.unary_unary_rpc_method_handler(
            completed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """The RPC metrics of every unary moemesh call a server handles: count by final status,
    latency, wire bytes. Put it outside ErrorInterceptor, so that it sees the status a domain
    error was turned into (rejected requests are counted too)."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not _observed(handler_call_details):
            return handler
        service, method = split_method(_full_method(handler_call_details))
        inner, metrics = handler.unary_unary, self._metrics

        async def measured(request, context: grpc.aio.ServicerContext):
            started, response, code = time.perf_counter(), None, grpc.StatusCode.UNKNOWN
            try:
                response = await inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                # ErrorInterceptor (inside this one) has aborted with the domain error's status.
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                metrics.observe_rpc(service, method, code.name, time.perf_counter() - started)
                metrics.observe_wire(_byte_size(request), _byte_size(response))

        return grpc.unary_unary_rpc_method_handler(
            measured,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _byte_size(message) -> int:
    if isinstance(message, (bytes, bytearray, memoryview)):  # requests arrive unparsed (ErrorInterceptor)
        return len(message)
    size = getattr(message, "ByteSize", None)
    return int(size()) if callable(size) else 0


# -- the router pipeline's stages --------------------------------------------------------------------


def stage_attributes(name: str, facts: ForwardFacts) -> dict[str, Any]:
    """The `moemesh.*` attributes of stage `name` from what the forward has decided so far."""
    attrs: dict[str, Any] = {"moemesh.layer": facts.layer}
    if name == "gate":
        attrs["moemesh.tokens"] = facts.tokens
        attrs["moemesh.batch.requests"] = facts.requests  # forwards merged into this one
        attrs["moemesh.routing.policy"] = describe(facts.policy)
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

    Made on the event loop when the request is decoded; `ComputeTelemetry.run_round` stamps it
    when the compute round it was merged into runs on the executor.
    Wall-clock times (for spans) are derived from one wall-clock reading plus monotonic offsets.
    """

    def __init__(self) -> None:
        self.queued_ns = time.time_ns()
        self._queued = time.perf_counter_ns()
        self._started: int | None = None
        self._ended: int | None = None
        self.round_calls = 0  # calls merged into the compute round this one ran in
        self.round_rows = 0  # rows of that round

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

    def run_round(self, timings: Sequence[ComputeTiming], rows: int, fn: Callable, *args):
        """On the executor: run `fn(*args)`, one compute round merging the calls of `timings`
        (`rows` rows in all). Each call's queue wait ends, and its compute starts, with the round."""
        started = time.perf_counter_ns()
        for timing in timings:
            timing._started, timing.round_calls, timing.round_rows = started, len(timings), rows
        if self._metrics is not None:
            self._metrics.observe_round(rows)
        try:
            return fn(*args)
        finally:
            ended = time.perf_counter_ns()
            for timing in timings:
                timing._ended = ended

    def _report(self, timing: ComputeTiming, request: pb.ComputeRequest, error: BaseException | None) -> None:
        started, ended = timing.started_ns, timing.ended_ns
        if self._metrics is not None and started is not None:
            self._metrics.observe_queue_wait(timing.queue_wait_s)
        queue = self._tracer.start_span("moemesh.queue_wait", start_time=timing.queued_ns)
        queue.end(end_time=started if started is not None else time.time_ns())
        if started is None:  # cancelled (deadline, caller gone) before the executor took it
            return
        compute = self._tracer.start_span("moemesh.compute", start_time=started)
        if compute.is_recording():
            compute.set_attributes({**self._attributes, **compute_attributes(request)})
            if timing.round_calls:
                compute.set_attributes(
                    {"moemesh.round.calls": timing.round_calls, "moemesh.round.rows": timing.round_rows}
                )
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
