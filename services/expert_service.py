"""Expert.Compute and Expert.Info: a thin servicer over `moemesh.experts.ffn.ExpertBank`, and the
batcher that merges concurrent Compute calls.

    admit ─▶ decode + validate ─▶ queue ─▶ round: bank.compute_many on the executor ─▶ encode

- admit: the segment and row counts are read from the message, before any decoding; a request
  over the per-request limits, or one the queue has no room for (by rows and by requests), gets
  `Overloaded` (RESOURCE_EXHAUSTED) at once. The room is given back when the call is answered.
- round: one worker takes every call waiting, oldest first, up to `max_batch_rows` rows, and runs
  each expert once over the rows of all of them (`ExpertBank.compute_many`), on the executor,
  never on the event loop. A call whose caller gave up (cancelled, deadline passed) before its
  round starts is dropped from it. A call's result does not depend on what it was merged with.

The wait in the queue and the round are reported as `moemesh.queue_wait` and `moemesh.compute`
spans under the call's server span (and as queue metrics).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from moemesh.experts.device import torch_executor
from moemesh.experts.ffn import ExpertBank
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.protos import wire
from moemesh.protos.spec import HostInfo, Segment, dtype_name
from moemesh.router.pipeline import DeadlineExceeded

from .admission import Admission, HostLimits, Ticket
from .bootstrap import Service
from .errors import Overloaded
from .telemetry import ComputeTelemetry, ComputeTiming, Telemetry

SERVICE_NAME = "moemesh.v1.Expert"
# Requests with this many tensor elements, or segments, are decoded, checked and answered off the
# event loop (a thread hop costs more than the work below that).
OFFLOAD_ELEMENTS = 64 * 1024
OFFLOAD_SEGMENTS = 256


@dataclass(eq=False)
class ComputeCall:
    """One admitted, validated Compute call, from the queue to its answer.

    rows: [R, hidden]; deadline: the event loop's clock reading after which the caller has given
    up (None = no deadline); ticket: its share of the host's queue, released by `finish`.
    """

    segments: list[Segment]
    rows: torch.Tensor
    timing: ComputeTiming
    ticket: Ticket
    deadline: float | None = None
    future: asyncio.Future | None = field(default=None, init=False)
    in_round: bool = field(default=False, init=False)  # a round is computing its rows
    _release_after_round: bool = field(default=False, init=False, repr=False)

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    def finish(self) -> None:
        """The caller is done (answered, failed or gone): give back its room in the queue, when its
        round ends if one is computing its rows."""
        if self.in_round:
            self._release_after_round = True
        else:
            self.ticket.release()

    def _round_ended(self) -> None:
        self.in_round = False
        if self._release_after_round:
            self.ticket.release()


class ComputeBatcher:
    """Merges the concurrent Compute calls of one host into rounds.

    One worker task runs while calls wait (started by the first, on its event loop): it takes every
    call waiting, oldest first, up to `max_batch_rows` rows (one larger call runs alone), runs
    `compute` over them on `executor` (`ExpertBank.compute_many` of validated requests: [(segments,
    rows [R_i, H])] -> [out [R_i, H]]), and resolves each call's future.
    """

    def __init__(
        self,
        compute: Callable[[list[tuple[list[Segment], torch.Tensor]]], list[torch.Tensor]],
        executor: Executor,
        telemetry: ComputeTelemetry,
        max_batch_rows: int,
    ):
        self.compute_round = compute
        self.max_batch_rows = max_batch_rows
        self.rounds = 0  # rounds computed since start
        self._executor = executor
        self._telemetry = telemetry
        self._waiting: deque[ComputeCall] = deque()
        self._worker: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Calls waiting for a round whose callers are still there."""
        return sum(1 for c in self._waiting if c.future is not None and not c.future.done())

    async def compute(self, call: ComputeCall) -> torch.Tensor:
        """Queue `call` for the next round with room; its [R, hidden] result."""
        loop = asyncio.get_running_loop()
        call.future = loop.create_future()
        self._waiting.append(call)
        worker = self._worker
        if worker is None or worker.done() or worker.get_loop() is not loop:
            self._worker = loop.create_task(self._work(), name="moemesh-compute-batcher")
        return await call.future  # a cancelled caller cancels this future: _take then drops it

    def _take(self, now: float) -> list[ComputeCall]:
        """The next round: waiting calls oldest first, while they fit in max_batch_rows."""
        calls: list[ComputeCall] = []
        rows = 0
        while self._waiting:
            call = self._waiting[0]
            assert call.future is not None
            if call.future.done():  # the caller is gone
                self._waiting.popleft()
                continue
            if call.deadline is not None and now >= call.deadline:
                self._waiting.popleft()
                waited = call.timing.queue_wait_s
                call.future.set_exception(
                    DeadlineExceeded(f"the caller's deadline passed after {waited:.3f}s in the queue")
                )
                continue
            if calls and rows + call.num_rows > self.max_batch_rows:
                break
            self._waiting.popleft()
            calls.append(call)
            rows += call.num_rows
        return calls

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            calls = self._take(loop.time())
            if not calls:
                continue
            rows = sum(c.num_rows for c in calls)
            for call in calls:
                call.in_round = True
            try:
                outs = await loop.run_in_executor(
                    self._executor,
                    self._telemetry.run_round,
                    [c.timing for c in calls],
                    rows,
                    self.compute_round,
                    [(c.segments, c.rows) for c in calls],
                )
            except BaseException as err:  # the worker itself cancelled (loop closing), or compute failed
                for call in calls:
                    _fail(call, err)
                if isinstance(err, asyncio.CancelledError):
                    for call in self._waiting:
                        _fail(call, err)
                    raise
            else:
                self.rounds += 1
                for call, out in zip(calls, outs, strict=True):
                    if not call.future.done():
                        call.future.set_result(out)
            finally:
                for call in calls:
                    call._round_ended()


def _fail(call: ComputeCall, err: BaseException) -> None:
    if call.future is None or call.future.done():
        return
    if isinstance(err, asyncio.CancelledError):
        call.future.cancel()
    else:
        call.future.set_exception(err)


class ExpertServicer(pb_grpc.ExpertServicer):
    """Serves the experts of one ExpertBank under `host_id`, within `limits`."""

    def __init__(
        self,
        host_id: str,
        bank: ExpertBank,
        model: str,
        executor: Executor | None = None,
        node: str = "",
        relative_speed: float = 1.0,
        telemetry: Telemetry | None = None,
        limits: HostLimits | None = None,
    ):
        self.host_id = host_id
        self.bank = bank
        self.model = model
        self.node = node
        self.relative_speed = relative_speed
        self.limits = limits or HostLimits()
        self.rows_served = 0  # rows computed since start (status, failover checks)
        self._executor = executor or torch_executor(1, "moemesh-expert")
        # Decoding, checking and encoding large messages: off the loop, beside the compute rounds.
        self._codec = torch_executor(1, "moemesh-expert-codec")
        self._telemetry = ComputeTelemetry(
            telemetry or Telemetry(), bank.device, dtype_name(bank.dtype), lambda: bank.nbytes
        )
        self.queue = Admission(
            f"expert host {host_id}",
            "queue full",
            "rows",
            "queued",
            self.limits.max_queue_rows,
            self.limits.max_queue_requests,
        )
        self.batcher = ComputeBatcher(
            self._compute_round, self._executor, self._telemetry, self.limits.max_batch_rows
        )

    def _compute_round(self, requests: list[tuple[list[Segment], torch.Tensor]]) -> list[torch.Tensor]:
        return self.bank.compute_many(requests, checked=True)  # each call was validated when queued

    def _admit(self, request: pb.ComputeRequest) -> Ticket:
        """Room in the queue for `request`, from the message's counts (nothing decoded); Overloaded
        when it is over a per-request limit or the queue is full."""
        limits, what = self.limits, f"expert host {self.host_id}"
        if len(request.segments) > limits.max_segments:
            raise Overloaded(
                f"{what}: a request of {len(request.segments)} segments exceeds the limit of "
                f"{limits.max_segments} segments per request; split it"
            )
        rows = wire.claimed_rows(request.rows)  # 0 for a shape that does not fit the data
        if rows > limits.max_request_rows:
            raise Overloaded(
                f"{what}: a request of {rows} rows exceeds the limit of {limits.max_request_rows} "
                "rows per request; split it"
            )
        return self.queue.admit(rows)

    def _decode(self, request: pb.ComputeRequest) -> tuple[list[Segment], torch.Tensor]:
        segments, rows = wire.decode_compute(request)
        try:
            self.bank.validate(segments, rows)  # UnknownExpert (INVALID_ARGUMENT too) passes through
        except ValueError as err:  # the message names rows or segments[i]
            raise wire.InvalidArgument("request", str(err)) from err
        return segments, rows

    async def _codec_run(self, large: bool, fn: Callable, *args):
        if not large:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._codec, fn, *args)

    async def Compute(self, request: pb.ComputeRequest, context) -> pb.ComputeResponse:
        ticket = self._admit(request)
        call: ComputeCall | None = None
        try:
            large = (
                math.prod(request.rows.shape) >= OFFLOAD_ELEMENTS or len(request.segments) >= OFFLOAD_SEGMENTS
            )
            segments, rows = await self._codec_run(large, self._decode, request)
            remaining = context.time_remaining()
            deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
            with self._telemetry.queued(request) as timing:
                call = ComputeCall(segments, rows, timing, ticket, deadline)
                out = await self.batcher.compute(call)
            self.rows_served += sum(s.count for s in segments)
            return await self._codec_run(large, lambda: pb.ComputeResponse(rows=wire.encode_tensor(out)))
        finally:
            if call is None:
                ticket.release()
            else:
                call.finish()

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
        self._codec.shutdown(wait=False)
