"""Admission control: what a router or an expert host takes on, and the refusal of the rest.

Every queue is bounded by rows and by requests. A request that does not fit is refused at once
with `Overloaded` (RESOURCE_EXHAUSTED) naming what is full and its limit, before any of its
tensor is decoded; nothing waits in an unbounded queue. The limits are typed configs, parsed once
at the entry point (CLI / deploy) and carried by `ExpertHostConfig` and `RouterConfig`.

    admission = Admission("expert host h0", "queue full", "rows", "queued", max_rows=4096, max_requests=64)
    ticket = admission.admit(rows)   # Overloaded at once when full
    ...                              # decode, queue, compute, reply
    ticket.release()                 # idempotent
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from moemesh.router.batching import BatchingConfig

from .errors import Overloaded

_FIRST_RETRY_S, _MAX_RETRY_S = 0.05, 5.0  # the retry hint before any request has left, and its cap
_SOJOURN_WEIGHT = 0.2  # of the newest request in the smoothed stay


def _check_positive(owner: object, may_be_zero: tuple[str, ...] = ()) -> None:
    for name, value in vars(owner).items():
        least = 0 if name in may_be_zero else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{type(owner).__name__}.{name} must be an integer >= {least}, got {value!r}")


def _limit(default: int, meaning: str):
    """A limit field; `meaning` is also the help of its CLI flag (--max-queue-rows, ...)."""
    return field(default=default, metadata={"help": meaning})


@dataclass(frozen=True)
class HostLimits:
    """What one expert host admits (`moemesh serve-expert`, `moemesh up`). A row is one token's
    hidden vector sent to one expert; rows and segments are read from the message before decoding."""

    max_queue_rows: int = _limit(32768, "expert host: rows of the Compute calls queued or computing")
    max_queue_requests: int = _limit(256, "expert host: Compute calls queued or computing")
    max_request_rows: int = _limit(32768, "expert host: rows in one Compute request")
    max_segments: int = _limit(4096, "expert host: segments in one Compute request")
    max_batch_rows: int = _limit(
        8192, "expert host: rows merged into one compute round (a larger call runs alone)"
    )

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.max_request_rows > self.max_queue_rows:
            raise ValueError(
                f"HostLimits.max_request_rows ({self.max_request_rows}) must not exceed "
                f"max_queue_rows ({self.max_queue_rows}): such a request could never be queued"
            )


@dataclass(frozen=True)
class RouterLimits:
    """What one router admits (`moemesh serve-router`, `moemesh up`): Forward, Dispatch and Route
    calls in flight, from the request's arrival to its reply; and how it merges the Forward and
    Dispatch calls of a layer (continuous batching, router/batching.py)."""

    max_inflight_tokens: int = _limit(
        8192, "router: tokens of the calls in flight (also the most one call may bring)"
    )
    max_inflight_requests: int = _limit(256, "router: Forward/Dispatch/Route calls in flight")
    max_batch_tokens: int = _limit(
        8192, "router: tokens of concurrent Forward/Dispatch calls merged into one"
    )
    max_batches_in_flight: int = _limit(1, "router: merged forwards of one layer running at once")
    batch_window_us: int = _limit(0, "router: how long a call that could start waits for others, µs")

    def __post_init__(self) -> None:
        _check_positive(self, may_be_zero=("batch_window_us",))

    def batching(self) -> BatchingConfig:
        return BatchingConfig(self.max_batch_tokens, self.max_batches_in_flight, self.batch_window_us / 1e6)


class Ticket:
    """One admitted request's share of an `Admission`; `release()` gives it back (idempotent)."""

    __slots__ = ("_admission", "rows", "admitted")

    def __init__(self, admission: Admission, rows: int):
        self._admission: Admission | None = admission
        self.rows = rows
        self.admitted = time.monotonic()

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self.rows, time.monotonic() - self.admitted)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Admission:
    """Counts admitted work against a limit on rows and one on requests; thread-safe.

    The words of the refusal: what (who refuses, e.g. "expert host h0"), full (e.g. "queue full"),
    unit ("rows", "tokens") and state ("queued", "in flight"), as in "expert host h0: queue full
    (4096 of 4096 rows queued, 16 more asked); retry in 40 ms" (a retry hint that also travels as grpc-retry-pushback-ms).
    """

    def __init__(self, what: str, full: str, unit: str, state: str, max_rows: int, max_requests: int):
        self.what, self.full, self.unit, self.state = what, full, unit, state
        self.max_rows, self.max_requests = max_rows, max_requests
        self.rows = 0
        self.requests = 0
        # How long admitted requests stay (admit to release), smoothed: a refused caller is told to
        # come back after about that long, when the work ahead of it has likely left.
        self.sojourn_s = _FIRST_RETRY_S
        self._lock = threading.Lock()

    def admit(self, rows: int) -> Ticket:
        """Take a request of `rows` rows, or raise Overloaded at once saying what is full."""
        rows = max(0, int(rows))
        if rows > self.max_rows:
            raise Overloaded(
                f"{self.what}: a request of {rows} {self.unit} exceeds the limit of {self.max_rows} "
                f"{self.unit} {self.state}; split it"
            )
        with self._lock:
            retry = min(self.sojourn_s, _MAX_RETRY_S)
            if self.requests + 1 > self.max_requests:
                raise Overloaded(
                    f"{self.what}: {self.full} ({self.requests} of {self.max_requests} requests "
                    f"{self.state}); retry in {retry * 1000:.0f} ms",
                    retry,
                )
            if self.rows + rows > self.max_rows:
                raise Overloaded(
                    f"{self.what}: {self.full} ({self.rows} of {self.max_rows} {self.unit} {self.state}, "
                    f"{rows} more asked); retry in {retry * 1000:.0f} ms",
                    retry,
                )
            self.rows += rows
            self.requests += 1
        return Ticket(self, rows)

    def _release(self, rows: int, sojourn_s: float) -> None:
        with self._lock:
            self.rows -= rows
            self.requests -= 1
            self.sojourn_s += _SOJOURN_WEIGHT * (sojourn_s - self.sojourn_s)
