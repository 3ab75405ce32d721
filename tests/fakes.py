"""Stand-ins the servicer tests share: `Context` (the part of grpc.aio.ServicerContext the
servicers use), `tiny_bank` (every expert of tiny-mixtral on the CPU) and `HeldRounds` (an expert
bank's `compute_many` that records every compute round and holds the first one until the test
releases it, so that batching scenarios need no sleeps or timing)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moemesh.experts.ffn import ExpertBank
from moemesh.experts.weights import open_source


@dataclass
class Context:
    """The part of grpc.aio.ServicerContext the servicers use."""

    remaining: float | None = None

    def time_remaining(self) -> float | None:
        return self.remaining


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (up to 30 s, polling) until `condition()` holds; AssertionError naming `what` if never."""
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def tiny_bank(model: str = "tiny-mixtral") -> ExpertBank:
    """Every expert of `model` in one float32 CPU bank."""
    source = open_source(model)
    return ExpertBank.from_source(source, source.spec.expert_keys(), "cpu", torch.float32)


class HeldRounds:
    """Set on a bank instance (`monkeypatch.setattr(bank, "compute_many", HeldRounds(bank))`):
    records each round's rows tensors, and holds the first round until `release` is set.
    `inner` is the bank's own compute_many (the solo reference)."""

    def __init__(self, bank: ExpertBank, hold_first: bool = True):
        self.inner = bank.compute_many
        self.rounds: list[list[torch.Tensor]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, requests, **kwargs):
        self.rounds.append([rows for _, rows in requests])
        if len(self.rounds) == 1:
            self.entered.set()
            assert self.release.wait(60), "the test never released the held round"
        return self.inner(requests, **kwargs)

    def sizes(self) -> list[list[int]]:
        """Rows of each call, round by round."""
        return [[int(rows.shape[0]) for rows in round_] for round_ in self.rounds]


class ReadSpy:
    """Wraps safetensors.safe_open and records every tensor read (whole or sliced)."""

    def __init__(self, real):
        self.real = real
        self.reads: list[str] = []

    def __call__(self, *args, **kwargs):
        spy = self

        class Handle:
            def __init__(self, handle):
                self.handle = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def keys(self):
                return self.handle.keys()

            def get_tensor(self, name):
                spy.reads.append(name)
                return self.handle.get_tensor(name)

            def get_slice(self, name):
                spy.reads.append(name)
                return self.handle.get_slice(name)

        return Handle(self.real(*args, **kwargs))
