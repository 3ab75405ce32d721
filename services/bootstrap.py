"""One way to build a moemesh gRPC server: servicers, health, reflection, limits, graceful stop,
and a span plus RPC metrics for every call (OpenTelemetry's gRPC instrumentation, completed in
services/telemetry.py).

Used by the CLI, the local mesh, Ray actors and tests alike:

    server = await start_server(ServerConfig(port=0), [router_service.bind(servicer)])
    ... server.address ...
    await server.stop()          # health NOT_SERVING, drain in-flight calls, stop
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from moemesh.protos.wire import DEFAULT_MAX_MESSAGE_BYTES, channel_options

from .errors import ErrorInterceptor
from .telemetry import RpcMetricsInterceptor, ServerSpans, Telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Where and how a server listens.

    max_message_bytes bounds both received and sent messages; a bigger request gets
    RESOURCE_EXHAUSTED before any of it is decoded. grace_s is how long `stop` lets calls finish.
    max_concurrent_rpcs: calls the server runs at once (health checks included); gRPC answers
    RESOURCE_EXHAUSTED to the rest. None = no limit.
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_s: float = 5.0
    max_concurrent_rpcs: int | None = 1024


@dataclass(frozen=True)
class Service:
    """A servicer and how to register it: `add(server)` plus its full service name."""

    name: str
    add: Callable[[grpc.aio.Server], None]


class RunningServer:
    """A started server; `stop()` is graceful and idempotent."""

    def __init__(self, server: grpc.aio.Server, port: int, host: str, health_servicer, names, grace_s):
        self.server = server
        self.port = port
        self.host = host
        self.health = health_servicer
        self.service_names = tuple(names)
        self.grace_s = grace_s
        self._stopped = False

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    async def stop(self, grace_s: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        # Tell load balancers and the router first, then drain what is in flight.
        for name in (*self.service_names, ""):
            await _set_status(self.health, name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.grace_s if grace_s is None else grace_s)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def _set_status(servicer, name: str, status) -> None:
    result = servicer.set(name, status)
    if asyncio.iscoroutine(result):
        await result


# grpcio-reflection serves only v1alpha; clients that speak v1 (newer grpcurl, Postman) ask this
# name. The two protocols are the same messages under another package, so the same servicer answers.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _serve_reflection_v1(server: grpc.aio.Server, names: Sequence[str]) -> None:
    servicer = reflection.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def host_port(host: str, port: int) -> str:
    """A gRPC address: "host:port", "[v6]:port"."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_server(
    config: ServerConfig,
    services: Sequence[Service],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    telemetry: Telemetry | None = None,
    span_attributes: Mapping[str, Any] | None = None,
) -> RunningServer:
    """Build, bind and start a server; returns once it accepts calls on `config.port` (0 = any).

    Every moemesh RPC gets a SERVER span and RPC metrics from `telemetry` (default: the global
    tracer provider, no metrics), with `span_attributes` on each span (e.g. `moemesh.host`).
    Raises OSError when the address cannot be bound.
    """
    telemetry = telemetry or Telemetry()
    # Outermost first: the span, then the metrics, both seeing the status ErrorInterceptor sets.
    # With tracing off there is no span interceptor at all (its no-op spans cost every call).
    spans = ServerSpans(span_attributes) if telemetry.tracing else None
    observing = [telemetry.server_interceptor(), spans] if spans is not None else []
    if telemetry.metrics is not None:
        observing.append(RpcMetricsInterceptor(telemetry.metrics))
    server = grpc.aio.server(
        interceptors=[*observing, ErrorInterceptor(), *interceptors],
        # SO_REUSEPORT off: a second server on a port in use fails to start instead of silently
        # sharing the port's clients with the first.
        options=[*channel_options(config.max_message_bytes), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    for service in services:
        service.add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.name for s in services]
    listed = [*names, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    reflection.enable_server_reflection(listed, server)
    _serve_reflection_v1(server, listed)
    address = host_port(config.host, config.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:  # newer grpcio raises where older ones returned 0
        raise OSError(f"could not bind {address}") from err
    if port == 0:
        raise OSError(f"could not bind {address}")
    if spans is not None:
        spans.server_address = host_port(config.host, port)
    await server.start()
    for name in (*names, ""):
        await _set_status(health_servicer, name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d", ", ".join(names), config.host, port)
    return RunningServer(server, port, config.host, health_servicer, names, config.grace_s)
