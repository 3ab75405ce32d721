"""InProcessTransport, and the router pipeline's retry when a host drops out, all in process."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moemesh.experts.ffn import ExpertBank, UnknownExpert
from moemesh.experts.weights import open_source
from moemesh.protos.spec import HostInfo, Segment
from moemesh.router.dispatch import RoutingTable
from moemesh.router.pipeline import DISPATCH_RETRY, DeadlineExceeded, HostUnavailable, SparseMoE
from moemesh.router.replicas import LeastLoadedReplica
from moemesh.services.launch import build_layers
from moemesh.services.transport import InProcessTransport

MODEL, LAYER, EXPERTS, HIDDEN = "tiny-mixtral", 0, 8, 64


@pytest.fixture(scope="module")
def source():
    return open_source(MODEL)


@pytest.fixture(scope="module")
def banks(source):
    """Two replicas, each holding every expert of layer 0."""
    keys = [(LAYER, e) for e in range(EXPERTS)]
    return {host: ExpertBank.from_source(source, keys, "cpu", torch.float32) for host in ("h0", "h1")}


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


SEGMENTS = (Segment(LAYER, 2, 0, 3), Segment(LAYER, 7, 4, 2))  # row 3 uncovered


def test_in_process_compute_is_the_bank_compute(banks):
    transport = InProcessTransport(banks)
    rows = _rows(6)
    try:
        out = asyncio.run(transport.compute("h1", SEGMENTS, rows, timeout=None))
    finally:
        asyncio.run(transport.close())
    assert torch.equal(out, banks["h1"].compute(SEGMENTS, rows))
    assert torch.equal(out[3], torch.zeros(HIDDEN)) and out.abs().sum() > 0


def test_in_process_unknown_host_is_unavailable(banks):
    transport = InProcessTransport(banks)
    try:
        with pytest.raises(HostUnavailable, match="expert host h9 unavailable: not in this process") as info:
            asyncio.run(transport.compute("h9", SEGMENTS, _rows(6), timeout=None))
    finally:
        asyncio.run(transport.close())
    assert info.value.host == "h9"


def test_in_process_bank_errors_pass_through(banks):
    transport = InProcessTransport(banks)
    try:
        with pytest.raises(UnknownExpert, match="layer 1 expert 0 is not held"):
            asyncio.run(transport.compute("h0", [Segment(1, 0, 0, 1)], _rows(1), timeout=None))
    finally:
        asyncio.run(transport.close())


def _compute_on_a_busy_executor(banks, timeout: float) -> None:
    """compute() while the transport's only worker is blocked, so the call cannot finish in time."""
    executor = ThreadPoolExecutor(1)
    release = threading.Event()
    executor.submit(release.wait, 10)
    try:
        asyncio.run(InProcessTransport(banks, executor).compute("h0", SEGMENTS, _rows(6), timeout))
    finally:
        release.set()
        executor.shutdown(wait=True)


def test_in_process_timeout(banks):
    with pytest.raises(asyncio.TimeoutError):
        _compute_on_a_busy_executor(banks, timeout=0.05)


def test_in_process_timeout_is_deadline_exceeded_naming_the_host(banks):
    with pytest.raises(DeadlineExceeded, match="h0"):
        _compute_on_a_busy_executor(banks, timeout=0.05)


# -- retry through the pipeline ----------------------------------------------------------------------


class FailsOnce:
    """InProcessTransport whose `host` is unavailable on its first call only (a restart)."""

    def __init__(self, inner: InProcessTransport, host: str):
        self.inner, self.host = inner, host
        self.calls: list[tuple[str, bool]] = []  # (host, DISPATCH_RETRY seen by the call)

    async def compute(self, host, segments, rows, timeout):
        self.calls.append((host, DISPATCH_RETRY.get()))
        if host == self.host and len([h for h, _ in self.calls if h == host]) == 1:
            raise HostUnavailable(host, "restarting")
        return await self.inner.compute(host, segments, rows, timeout)


def _moe(source, banks, transport) -> tuple[SparseMoE, LeastLoadedReplica]:
    hosts = [
        HostInfo(h, f"inproc:{h}", "cpu", "float32", tuple(bank.experts)) for h, bank in banks.items()
    ]  # h0 first: preferred on ties
    chooser = LeastLoadedReplica({h.host_id: h.relative_speed for h in hosts})
    layers = {LAYER: build_layers(source)[LAYER]}
    return SparseMoE(layers, RoutingTable.from_hosts(hosts), transport, chooser), chooser


def _reference(source, hidden: torch.Tensor, routing) -> torch.Tensor:
    """Per token, per chosen expert, in float64."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        x = hidden[t].double()
        for e, w in zip(routing.experts[t].tolist(), routing.weights[t].tolist()):
            f = source.expert(LAYER, e).to(dtype=torch.float64)
            out[t] += w * (f.down @ (torch.nn.functional.silu(f.gate @ x) * (f.up @ x)))
    return out


def test_pipeline_retries_a_failed_host_on_its_replica(source, banks):
    hidden = _rows(16, seed=1)
    inner = InProcessTransport(banks)
    healthy_moe, _ = _moe(source, banks, inner)
    transport = FailsOnce(inner, "h0")
    moe, chooser = _moe(source, banks, transport)
    try:
        clean = asyncio.run(healthy_moe.forward(LAYER, hidden))
        result = asyncio.run(moe.forward(LAYER, hidden))
        assert {b.host for b in result.plan.batches} == {"h0", "h1"}  # both replicas got work
        assert result.retries >= 1 and result.failed_hosts == ("h0",)
        assert torch.equal(result.hidden, clean.hidden)  # exact: same experts on the same rows
        torch.testing.assert_close(
            result.hidden, _reference(source, hidden, result.routing).float(), rtol=1e-4, atol=1e-5
        )
        # the re-sent batch went to h1 and knew it was a retry; h0's only call was the failed one
        assert ("h0", False) in transport.calls and ("h1", True) in transport.calls
        assert [h for h, _ in transport.calls].count("h0") == 1
        assert chooser.outstanding("h0") == chooser.outstanding("h1") == 0  # every reservation released
        # h0 sits out its cooldown: the next forward plans around it without a failed call
        assert moe.health.is_down("h0")
        again = asyncio.run(moe.forward(LAYER, hidden))
        assert {b.host for b in again.plan.batches} == {"h1"} and again.retries == 0
        assert torch.equal(again.hidden, clean.hidden)
    finally:
        moe.close()
        healthy_moe.close()
        asyncio.run(inner.close())
