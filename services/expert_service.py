"""Expert.Compute and Expert.Info: a thin servicer over `moemesh.experts.ffn.ExpertBank`.

decode rows + segments → bank.compute on the executor (never on the event loop) → encode.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from moemesh.experts.device import dtype_name
from moemesh.experts.ffn import ExpertBank, RowSpan, UnknownExpert
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.router.pipeline import torch_executor

from . import codec
from .bootstrap import Service

SERVICE_NAME = "moemesh.v1.Expert"


class ExpertServicer(pb_grpc.ExpertServicer):
    """Serves the experts of one ExpertBank under `host_id`."""

    def __init__(self, host_id: str, bank: ExpertBank, model: str, executor: Executor | None = None):
        self.host_id = host_id
        self.bank = bank
        self.model = model
        self._executor = executor or torch_executor(1, "moemesh-expert")

    def _compute(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        rows = codec.decode_tensor(request.rows, "rows", rank=2)
        segments = codec.decode_segments(request.segments, rows.shape[0])
        spans = [RowSpan(s.layer, s.expert, s.start, s.count) for s in segments]
        if rows.shape[1] != self.bank.hidden_size:
            raise codec.InvalidArgument(
                "rows.shape",
                f"expected hidden size {self.bank.hidden_size} (this host's experts), got {rows.shape[1]}",
            )
        try:
            self.bank.validate(spans, rows)
        except UnknownExpert:
            raise
        except ValueError as err:
            raise codec.InvalidArgument("segments", str(err)) from err
        return pb.ComputeResponse(rows=codec.encode_tensor(self.bank.compute(spans, rows)))

    async def Compute(self, request: pb.ComputeRequest, context) -> pb.ComputeResponse:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._compute, request)

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return pb.InfoResponse(
            host_id=self.host_id,
            device=str(self.bank.device),
            dtype=dtype_name(self.bank.dtype),
            experts=[pb.ExpertRef(layer=layer, expert=expert) for layer, expert in self.bank.experts],
            model=self.model,
        )

    def service(self) -> Service:
        return Service(SERVICE_NAME, lambda server: pb_grpc.add_ExpertServicer_to_server(self, server))

    def close(self) -> None:
        self._executor.shutdown(wait=False)
