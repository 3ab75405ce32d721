"""Where experts run: implementations of `moemesh.router.pipeline.ExpertTransport`.

- `GrpcTransport`: one `Expert.Compute` call per host batch over `grpc.aio`, the caller's remaining
  deadline passed on; counts the bytes it sends and receives.
- `InProcessTransport`: the same contract against `ExpertBank`s in this process (the compute
  limit for benchmarks, and a way to test the router without sockets).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import torch
from opentelemetry import trace

from moemesh.client.tracing import call_attributes
from moemesh.experts.device import torch_executor
from moemesh.experts.ffn import ExpertBank
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import wire
from moemesh.protos.spec import Segment
from moemesh.protos.wire import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from moemesh.router.pipeline import DISPATCH_RETRY, DeadlineExceeded, HostUnavailable

from .errors import HostError
from .telemetry import HOST_ATTRIBUTE, Telemetry

COMPUTE_METHOD = "/moemesh.v1.Expert/Compute"
# Messages with at least this many tensor bytes are built and parsed off the event loop.
OFFLOAD_BYTES = 256 * 1024
# Statuses after which the same work can succeed on another replica.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


@dataclass
class WireStats:
    """Serialized message bytes of Compute calls, both directions (HTTP/2 framing not included)."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def reset(self) -> None:
        self.calls = self.bytes_sent = self.bytes_received = 0


class GrpcTransport:
    """Calls expert hosts over gRPC. `addresses` maps host id -> "host:port".

    Each call is a CLIENT span (`telemetry`'s tracer provider; default the global one) whose
    context travels to the host in the call's metadata.
    """

    def __init__(
        self,
        addresses: Mapping[str, str],
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        telemetry: Telemetry | None = None,
    ):
        self.addresses = dict(addresses)
        self._telemetry = telemetry or Telemetry()
        self.stats = WireStats()
        self._options = channel_options(max_message_bytes)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._codec = torch_executor(2, "moemesh-codec")

    # Messages are built and parsed on the codec executor; gRPC only moves (and counts) the bytes.
    # Both run inside the call, where its CLIENT span is the current one.
    def _sent(self, data: bytes) -> bytes:
        self.stats.calls += 1
        self.stats.bytes_sent += len(data)
        trace.get_current_span().set_attribute("moemesh.bytes_sent", len(data))
        return data

    def _received(self, data: bytes) -> bytes:
        self.stats.bytes_received += len(data)
        trace.get_current_span().set_attribute("moemesh.bytes_received", len(data))
        return data

    @staticmethod
    def _encode(segments: Sequence[Segment], rows: torch.Tensor) -> bytes:
        return wire.compute_request_bytes(segments, rows)

    @staticmethod
    def _decode(data: bytes, host: str, shape: torch.Size) -> torch.Tensor:
        out = wire.decode_tensor(pb.ComputeResponse.FromString(data).rows, "rows", rank=2)
        if tuple(out.shape) != tuple(shape):
            raise HostError(host, grpc.StatusCode.INTERNAL, f"reply shape {list(out.shape)} != {list(shape)}")
        return out

    async def _offload(self, nbytes: int, fn, *args):
        """Run `fn` on the codec executor when it copies enough bytes to stall the event loop."""
        if nbytes < OFFLOAD_BYTES:
            return fn(*args)  # a thread hop would cost more than the copy
        return await asyncio.get_running_loop().run_in_executor(self._codec, fn, *args)

    def _call(self, host: str) -> grpc.aio.UnaryUnaryMultiCallable:
        call = self._calls.get(host)
        if call is None:
            if host not in self.addresses:
                raise HostUnavailable(host, "no address known")
            address = self.addresses[host]
            channel = grpc.aio.insecure_channel(
                address, options=self._options, interceptors=self._telemetry.client_interceptors(address)
            )
            self._channels[host] = channel
            call = channel.unary_unary(
                COMPUTE_METHOD, request_serializer=self._sent, response_deserializer=self._received
            )
            self._calls[host] = call
        return call

    async def compute(
        self, host: str, segments: Sequence[Segment], rows: torch.Tensor, timeout: float | None
    ) -> torch.Tensor:
        attributes = {
            HOST_ATTRIBUTE: host,  # the replica chosen for these segments
            "moemesh.rows": int(rows.shape[0]),
            "moemesh.segments": len(segments),
            "moemesh.experts": [s.expert for s in segments],
            "moemesh.retry": DISPATCH_RETRY.get(),
        }
        with call_attributes(attributes):
            return await self._compute(host, segments, rows, timeout)

    async def _compute(
        self, host: str, segments: Sequence[Segment], rows: torch.Tensor, timeout: float | None
    ) -> torch.Tensor:
        nbytes = rows.numel() * rows.element_size()
        request = await self._offload(nbytes, self._encode, segments, rows)
        try:
            reply = await self._call(host)(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"expert host {host} did not answer in time") from err
            if err.code() in _RETRYABLE:
                raise HostUnavailable(host, err.details() or err.code().name) from err
            raise HostError(host, err.code(), err.details() or "") from err
        return await self._offload(nbytes, self._decode, reply, host, rows.shape)

    def set_address(self, host: str, address: str) -> None:
        """Point `host` at a new address (after a restart); the old channel is closed lazily."""
        old = self._channels.pop(host, None)
        self._calls.pop(host, None)
        self.addresses[host] = address
        if old is not None:
            asyncio.ensure_future(old.close())

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)
        self._channels.clear()
        self._codec.shutdown(wait=False)
        self._calls.clear()


class InProcessTransport:
    """Runs host batches on ExpertBanks in this process, off the event loop."""

    def __init__(self, banks: Mapping[str, ExpertBank], executor: Executor | None = None):
        self.banks = dict(banks)
        self._executor = executor or torch_executor(1, "moemesh-experts")

    async def compute(
        self, host: str, segments: Sequence[Segment], rows: torch.Tensor, timeout: float | None
    ) -> torch.Tensor:
        bank = self.banks.get(host)
        if bank is None:
            raise HostUnavailable(host, "not in this process")
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._executor, bank.compute, segments, rows), timeout
            )
        except TimeoutError:
            raise DeadlineExceeded(f"expert host {host} did not answer in time") from None

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
