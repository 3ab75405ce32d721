"""The one server bootstrap: exclusive ports, and server reflection in both protocol versions."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from moemesh.services.bootstrap import ServerConfig, start_server

pytestmark = pytest.mark.integration


def test_a_second_server_on_a_port_in_use_fails_to_start():
    async def scenario():
        first = await start_server(ServerConfig(port=0), [])
        try:
            with pytest.raises(OSError, match=f"could not bind 127.0.0.1:{first.port}"):
                await start_server(ServerConfig(port=first.port), [])
        finally:
            await first.stop(0)

    asyncio.run(scenario())


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_in_both_protocol_versions(version):
    async def scenario():
        server = await start_server(ServerConfig(port=0), [])
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                info = channel.stream_stream(
                    f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
                )

                async def ask():
                    yield reflection_pb2.ServerReflectionRequest(list_services="")

                async for reply in info(ask(), timeout=30):
                    return {s.name for s in reply.list_services_response.service}
        finally:
            await server.stop(0)

    services = asyncio.run(scenario())
    assert {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= services
