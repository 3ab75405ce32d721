"""Expert.Compute and Expert.Info: a thin servicer over `moemesh.experts.ffn.ExpertBank`.

decode rows + segments → bank.compute on the executor (never on the event loop) → encode.
The wait for the executor and the compute are reported as `moemesh.queue_wait` and
`moemesh.compute` spans under the call's server span (and as queue metrics).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from moemesh.experts.device import torch_executor
from moemesh.experts.ffn import ExpertBank
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.protos import wire
from moemesh.protos.spec import HostInfo, dtype_name

from .bootstrap import Service
from .telemetry import ComputeTelemetry, Telemetry

SERVICE_NAME = "moemesh.v1.Expert"


class ExpertServicer(pb_grpc.ExpertServicer):
    """Serves the experts of one ExpertBank under `host_id`."""

    def __init__(
        self,
        host_id: str,
        bank: ExpertBank,
        model: str,
        executor: Executor | None = None,
        node: str = "",
        relative_speed: float = 1.0,
        telemetry: Telemetry | None = None,
    ):
        self.host_id = host_id
        self.bank = bank
        self.model = model
        self.node = node
        self.relative_speed = relative_speed
        self.rows_served = 0  # rows computed since start (status, failover checks)
        self._executor = executor or torch_executor(1, "moemesh-expert")
        self._telemetry = ComputeTelemetry(
            telemetry or Telemetry(), bank.device, dtype_name(bank.dtype), lambda: bank.nbytes
        )

    def _compute(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        segments, rows = wire.decode_compute(request)
        try:
            out = self.bank.compute(segments, rows)  # checks every segment before computing any
        except ValueError as err:  # the message names rows or segments[i]; UnknownExpert passes through
            raise wire.InvalidArgument("request", str(err)) from err
        self.rows_served += sum(s.count for s in segments)
        return pb.ComputeResponse(rows=wire.encode_tensor(out))

    async def Compute(self, request: pb.ComputeRequest, context) -> pb.ComputeResponse:
        loop = asyncio.get_running_loop()
        with self._telemetry.queued(request) as timing:
            return await loop.run_in_executor(self._executor, timing.run, self._compute, request)

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return wire.encode_info(self.info())

    def info(self) -> HostInfo:
        return HostInfo(
            host_id=self.host_id,
            address="",
            device=str(self.bank.device),
            dtype=dtype_name(self.bank.dtype),
            experts=tuple(self.bank.experts),
            model=self.model,
            node=self.node,
            relative_speed=self.relative_speed,
        )

    def service(self) -> Service:
        return Service(SERVICE_NAME, lambda server: pb_grpc.add_ExpertServicer_to_server(self, server))

    def close(self) -> None:
        self._executor.shutdown(wait=False)
