"""CLIENT spans of the SDK's calls, from OpenTelemetry's gRPC instrumentation.

The instrumentation's interceptors start each span, set `rpc.system`, `rpc.service`,
`rpc.method`, `rpc.grpc.status_code` and the error status, and send the context in the call's
metadata as W3C `traceparent`. One small interceptor just inside them completes the span while it
is current: the name `package.Service/Method` (the RPC conventions' form; the instrumentation's
has a leading "/"), `server.address` / `server.port`, and the caller's `moemesh.*` attributes
(`call_attributes`). With no tracer provider configured every span is the API's no-op.

The SDK imports nothing of the servers; the router's own calls to expert hosts
(`moemesh.services.telemetry`) use the same pieces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

_ATTRIBUTES: ContextVar[Mapping[str, Any]] = ContextVar(
    "moemesh_sdk_call_attributes", default=MappingProxyType({})
)


@contextmanager
def call_attributes(attributes: Mapping[str, Any]) -> Iterator[None]:
    """`attributes` go on the CLIENT span of every call made inside the block (a grpc.aio call
    runs in a task that copies this context when the call is made)."""
    token = _ATTRIBUTES.set(attributes)
    try:
        yield
    finally:
        _ATTRIBUTES.reset(token)


def address_attributes(target: str) -> dict[str, Any]:
    """server.address / server.port of a "host:port" target ("[v6]:port" too)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return {"server.address": target} if target else {}
    return {"server.address": host.strip("[]"), "server.port": int(port)}


def _complete(details, target: str) -> None:
    span = trace.get_current_span()  # the instrumentation's span of this call, when it made one
    if is_instrumentation_enabled() and span.is_recording():
        method = details.method  # bytes from some grpc.aio releases (grpc/grpc#31092)
        span.update_name((method.decode() if isinstance(method, bytes) else method).lstrip("/"))
        span.set_attributes({**address_attributes(target), **_ATTRIBUTES.get()})


class _Complete(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, target: str):
        self._target = target

    def intercept_unary_unary(self, continuation, client_call_details, request):
        _complete(client_call_details, self._target)
        return continuation(client_call_details, request)


class AioCompleteSpan(grpc.aio.UnaryUnaryClientInterceptor):
    """Just inside the instrumentation's grpc.aio client interceptors: completes its span."""

    def __init__(self, target: str):
        self._target = target

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        _complete(client_call_details, self._target)
        return await continuation(client_call_details, request)


def tracing_on(tracer_provider=None) -> bool:
    """Whether calls would be traced: a tracer provider is given, or one is installed globally
    (`configure_tracing`, or the application's own). Otherwise no interceptor is installed at all:
    the API's no-op spans would cost every call its interceptors' time for nothing."""
    if tracer_provider is not None:
        return True
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def traced_channel(target: str, options: Sequence[tuple[str, Any]], tracer_provider=None) -> grpc.Channel:
    """A blocking channel to `target` whose calls are CLIENT spans of `tracer_provider` (None =
    the global one), when tracing is on."""
    channel = grpc.insecure_channel(target, options=options)
    if not tracing_on(tracer_provider):
        return channel
    channel = grpc.intercept_channel(channel, _Complete(target))
    return intercept_channel(channel, client_interceptor(tracer_provider))


def traced_aio_channel(
    target: str, options: Sequence[tuple[str, Any]], tracer_provider=None
) -> grpc.aio.Channel:
    """`traced_channel` for grpc.aio."""
    return grpc.aio.insecure_channel(
        target, options=options, interceptors=client_spans(target, tracer_provider)
    )


def client_spans(target: str, tracer_provider=None) -> list[grpc.aio.ClientInterceptor]:
    """The grpc.aio client interceptors that make every call to `target` a CLIENT span (none when
    tracing is off)."""
    if not tracing_on(tracer_provider):
        return []
    return [*aio_client_interceptors(tracer_provider), AioCompleteSpan(target)]
