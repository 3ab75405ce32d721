"""Continuous batching on the router: concurrent forwards of one layer run as one.

    forward(layer, hidden, policy) ──▶ queue[layer, dtype] ──▶ up to `max_inflight` merged batches
                                        (each: SparseMoE.forward_batch = one gate → plan → dispatch
                                         → combine for every request in it) ──▶ each caller's rows

A request starts at once when fewer than `max_inflight` batches of its layer are running (a lone
request waits for nothing, `window_s` at most when set); otherwise it waits, and the next batch
takes every waiting request, up to `max_batch_tokens`. Requests that bring their own routing
(Router.Dispatch) queue and merge with gated ones (Router.Forward) alike. Each request keeps its
own routing policy (gated alone) or routing, deadline and cancellation: a request that is
cancelled or passes its deadline while waiting is dropped before any work is done for it, and one
that does so while its batch runs gets its own error while its batch-mates go on. Bad input fails
only the request that brought it. A request's result does not depend on what it was merged with.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .gating import validate_policy
from .pipeline import DeadlineExceeded, ForwardResult, LayerRequest, SparseMoE


@dataclass(frozen=True)
class BatchingConfig:
    """max_batch_tokens: tokens merged into one forward (a larger request runs alone);
    max_inflight: merged forwards of one layer running at once (overlaps one's gate and combine
    with another's dispatch); window_s: how long a request that could start may wait for others
    (0 = never)."""

    max_batch_tokens: int = 8192
    max_inflight: int = 1
    window_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_inflight < 1 or not 0.0 <= self.window_s <= 1.0:
            raise ValueError(
                "BatchingConfig: max_batch_tokens and max_inflight must be >= 1 and window_s in [0, 1] s, "
                f"got {self.max_batch_tokens}, {self.max_inflight}, {self.window_s}"
            )


@dataclass(eq=False)
class _Waiting:
    request: LayerRequest
    future: asyncio.Future
    context: contextvars.Context  # the caller's: its batch's spans belong to its trace
    arrived: float = field(default_factory=time.monotonic)
    deadline: float | None = None

    @property
    def tokens(self) -> int:
        return int(self.request.hidden.shape[0])


class ForwardBatcher:
    """Merges concurrent `forward` calls per (layer, dtype) into `SparseMoE.forward_batch` runs."""

    def __init__(self, moe: SparseMoE, config: BatchingConfig | None = None):
        self.moe = moe
        self.config = config or BatchingConfig()
        self._waiting: dict[tuple[int, torch.dtype], deque[_Waiting]] = {}
        self._running: dict[tuple[int, torch.dtype], int] = {}
        self._timers: dict[tuple[int, torch.dtype], asyncio.TimerHandle] = {}
        self._last_size: dict[tuple[int, torch.dtype], int] = {}  # requests in the last batch started
        self._holding: dict[tuple[int, torch.dtype], float] = {}  # when a batch that could start was held

    async def forward(self, layer: int, request: LayerRequest, timeout: float | None = None) -> ForwardResult:
        """request.hidden: [tokens, hidden] -> the layer's output, as `SparseMoE.forward_batch` gives
        it (merged with the requests that arrive meanwhile, gated or with their own routing).
        Raises InvalidRouting before queueing for a bad policy, DeadlineExceeded after `timeout`
        seconds."""
        validate_policy(self.moe.layers[layer].gate, request.policy)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        item = _Waiting(request, loop.create_future(), contextvars.copy_context())
        item.deadline = deadline
        key = (layer, request.hidden.dtype)
        self._waiting.setdefault(key, deque()).append(item)
        self._start(key)
        try:
            # shield: a caller that gives up must not cancel the batch its neighbours share
            result = await asyncio.wait_for(asyncio.shield(item.future), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"layer {layer}: deadline passed before the experts answered") from None
        finally:
            if not item.future.done():
                item.future.cancel()  # still waiting: it will be dropped; running: its result is ignored
        if isinstance(result, BaseException):
            raise result
        return result

    def _start(self, key: tuple[int, torch.dtype]) -> None:
        """Start merged batches of `key` while fewer than `max_inflight` run and requests wait."""
        queue = self._waiting.get(key)
        while queue and self._running.get(key, 0) < self.config.max_inflight:
            while queue and queue[0].future.done():  # gone before its batch started: no work for it
                queue.popleft()
            if not queue:
                break
            if self._hold(key, queue):
                return
            batch, tokens = [], 0
            while queue and (not batch or tokens + queue[0].tokens <= self.config.max_batch_tokens):
                item = queue.popleft()
                if not item.future.done():
                    batch.append(item)
                    tokens += item.tokens
            if not batch:
                continue
            self._running[key] = self._running.get(key, 0) + 1
            self._last_size[key] = len(batch)
            self._holding.pop(key, None)
            # The batch runs in its first request's context, so its stage spans join that trace.
            asyncio.get_running_loop().create_task(self._run(key, batch), context=batch[0].context)

    def _hold(self, key: tuple[int, torch.dtype], queue: deque[_Waiting]) -> bool:
        """With a collection window, wait for more requests (up to window_s after the oldest), but
        only while the layer has company: fewer requests wait than its last batch merged. A lone
        client (last batch: one request) is never held."""
        window = self.config.window_s
        if window <= 0 or len(queue) >= self._last_size.get(key, 1):
            return False
        if sum(item.tokens for item in queue) >= self.config.max_batch_tokens:
            return False
        now = time.monotonic()
        since = self._holding.setdefault(key, now)  # the window runs from when a batch could start
        wait = since + window - now
        if wait <= 0:
            del self._holding[key]
            return False
        if key not in self._timers:
            self._timers[key] = asyncio.get_running_loop().call_later(wait, self._release, key)
        return True

    def _release(self, key: tuple[int, torch.dtype]) -> None:
        self._timers.pop(key, None)
        self._start(key)

    async def _run(self, key: tuple[int, torch.dtype], batch: list[_Waiting]) -> None:
        layer = key[0]
        deadlines = [item.deadline for item in batch]
        timeout = None if None in deadlines else max(deadlines) - time.monotonic()
        try:
            results = await self.moe.forward_batch(layer, [item.request for item in batch], timeout)
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(result)
        except BaseException as err:
            for item in batch:
                if not item.future.done():
                    item.future.set_result(err)
            if not isinstance(err, Exception):
                raise
        finally:
            self._running[key] -= 1
            self._start(key)
