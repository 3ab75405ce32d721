"""Replica choice and host health: which copy of an expert serves a batch.

- `LeastLoadedReplica` picks the replica that would finish first: rows already outstanding on the
  host plus this run's rows, divided by the host's relative speed. Rows are reserved when chosen
  and released when the host answers, so concurrent forwards spread over replicas.
- `HostHealth` keeps hosts that just failed out of plans for a short cooldown, so one dead host
  costs one failed call, not one per request; a host that re-registers is back at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence


class LeastLoadedReplica:
    """Speed- and load-aware replica choice. Thread-safe (plans run on executor threads)."""

    def __init__(self, speed: Mapping[str, float] | None = None):
        self._speed = dict(speed or {})
        self._outstanding: dict[str, int] = {}
        self._lock = threading.Lock()

    def set_speed(self, host: str, speed: float) -> None:
        assert speed > 0, f"speed of {host} must be > 0, got {speed}"
        with self._lock:
            self._speed[host] = speed

    def outstanding(self, host: str) -> int:
        """Rows reserved on `host` and not yet answered."""
        with self._lock:
            return self._outstanding.get(host, 0)

    def choose(self, layer: int, expert: int, replicas: Sequence[str], rows: int) -> str:
        with self._lock:
            # Estimated finish time if this run joined each replica's queue; ties keep table order.
            best = min(
                replicas,
                key=lambda h: (self._outstanding.get(h, 0) + rows) / self._speed.get(h, 1.0),
            )
            self._outstanding[best] = self._outstanding.get(best, 0) + rows
            return best

    def release(self, host: str, rows: int) -> None:
        with self._lock:
            left = self._outstanding.get(host, 0) - rows
            assert left >= 0, f"released more rows than reserved on {host}"
            self._outstanding[host] = left


class HostHealth:
    """Hosts that failed recently. A down host is skipped until `cooldown_s` passes or it comes back."""

    def __init__(self, cooldown_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark_down(self, host: str) -> None:
        with self._lock:
            self._down_until[host] = self._clock() + self.cooldown_s

    def mark_up(self, host: str) -> None:
        with self._lock:
            self._down_until.pop(host, None)

    def down(self) -> frozenset[str]:
        """Hosts to keep out of new plans now."""
        now = self._clock()
        with self._lock:
            return frozenset(h for h, until in self._down_until.items() if until > now)

    def is_down(self, host: str) -> bool:
        return host in self.down()
