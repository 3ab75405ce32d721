"""Admission control without sockets: `Admission` and the limits, the router refusing work it has
no room for (RouterServicer called directly over a held in-process transport), and the CLI flags
reaching every server config."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from moemesh.experts.device import torch_executor
from moemesh.experts.weights import open_source
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import wire
from moemesh.router.dispatch import RoutingTable
from moemesh.router.pipeline import SparseMoE
from moemesh.router.replicas import LeastLoadedReplica
from moemesh.services.admission import Admission, HostLimits, RouterLimits
from moemesh.services.errors import Overloaded
from moemesh.services.expert_service import ExpertServicer
from moemesh.services.launch import build_layers
from moemesh.services.router_service import RouterServicer
from moemesh.services.transport import InProcessTransport
from tests.fakes import Context, tiny_bank
from tests.fakes import until as _until

MODEL, H = "tiny-mixtral", 64  # 2 MoE layers, 8 experts


@pytest.fixture(scope="module")
def bank():
    return tiny_bank(MODEL)


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


# -- admission -------------------------------------------------------------------------------------


def test_admission_counts_and_names_what_is_full():
    queue = Admission("expert host h0", "queue full", "rows", "queued", max_rows=10, max_requests=2)
    first = queue.admit(6)
    with pytest.raises(
        Overloaded, match=r"expert host h0: queue full \(6 of 10 rows queued, 5 more asked\)"
    ) as full:
        queue.admit(5)
    assert full.value.retry_after_s == pytest.approx(0.05)  # nothing has left yet: the first hint
    second = queue.admit(4)
    with pytest.raises(Overloaded, match=r"queue full \(2 of 2 requests queued\); retry in 50 ms"):
        queue.admit(0)
    with pytest.raises(Overloaded, match="a request of 11 rows exceeds the limit of 10 rows queued") as big:
        queue.admit(11)
    assert big.value.retry_after_s is None  # the same request will never fit
    first.release()
    first.release()  # idempotent
    assert (queue.rows, queue.requests) == (4, 1)
    with second:
        pass
    assert (queue.rows, queue.requests) == (0, 0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: HostLimits(max_queue_rows=0), "HostLimits.max_queue_rows must be an integer >= 1"),
        (lambda: HostLimits(max_queue_rows=8, max_request_rows=9), "could never be queued"),
        (lambda: RouterLimits(max_inflight_requests=-1), "max_inflight_requests must be an integer >= 1"),
    ],
)
def test_limits_are_checked_when_built(make: Callable, message: str):
    with pytest.raises(ValueError, match=message):
        make()


# -- the router ------------------------------------------------------------------------------------------


class HeldTransport:
    """InProcessTransport whose calls wait for `release` (an asyncio.Event) once `hold` is set."""

    def __init__(self, banks):
        self.inner = InProcessTransport(banks)
        self.release = asyncio.Event()
        self.waiting = 0

    async def compute(self, host, segments, rows, timeout):
        self.waiting += 1
        await self.release.wait()
        self.waiting -= 1
        return await self.inner.compute(host, segments, rows, timeout)


def test_full_router_is_overloaded_at_once_then_serves_exactly(bank):
    source = open_source(MODEL)

    async def scenario():
        transport = HeldTransport({"h0": bank})
        host = ExpertServicer("h0", bank, MODEL)
        info = host.info()
        host.close()
        moe = SparseMoE(
            build_layers(source),
            RoutingTable.from_hosts([info]),
            transport,
            LeastLoadedReplica(),
            executor=torch_executor(1, "test-router"),
        )
        router = RouterServicer(
            moe, source.spec, [info], RouterLimits(max_inflight_tokens=16, max_inflight_requests=2)
        )
        try:
            forward = lambda t, seed: router.Forward(  # noqa: E731
                pb.ForwardRequest(layer=0, hidden=wire.encode_tensor(_rows(t, seed))), Context()
            )
            a = asyncio.ensure_future(forward(10, 0))
            await _until(lambda: transport.waiting == 1, "the first forward reached the host")
            with pytest.raises(
                Overloaded, match=r"router: at capacity \(10 of 16 tokens in flight, 7 more asked\)"
            ):
                await forward(7, 1)
            b = asyncio.ensure_future(forward(6, 2))
            await _until(lambda: router.in_flight.requests == 2, "the second forward was admitted")
            with pytest.raises(Overloaded, match=r"router: at capacity \(2 of 2 requests in flight\)"):
                await forward(1, 3)
            with pytest.raises(
                Overloaded, match="a request of 17 tokens exceeds the limit of 16 tokens in flight"
            ):
                await router.Route(
                    pb.RouteRequest(layer=0, hidden=wire.encode_tensor(_rows(17, 4))), Context()
                )
            transport.release.set()
            got = await asyncio.gather(a, b)
            alone = await forward(10, 0)
            assert (router.in_flight.rows, router.in_flight.requests) == (0, 0)
            return got, alone
        finally:
            moe.close()
            await transport.inner.close()

    (a, _), alone = asyncio.run(scenario())
    torch.testing.assert_close(_out_hidden(a), _out_hidden(alone), rtol=0.0, atol=1e-6)


def _out_hidden(reply: pb.ForwardResponse) -> torch.Tensor:
    return wire.decode_tensor(reply.hidden, "hidden", rank=2)


# -- configuration ------------------------------------------------------------------------------------------


def test_cli_limits_reach_every_server_config():
    from moemesh.deploy.cli import build_parser
    from moemesh.deploy.cli_args import mesh_config as _mesh_config
    from moemesh.deploy.local import ProcessSpec, host_configs, router_config

    args = build_parser().parse_args(
        ["up", "--backend", "processes", "--hosts", "2", "--max-queue-rows", "100", "--max-request-rows", "50",
         "--max-segments", "7", "--max-batch-rows", "30", "--max-queue-requests", "9",
         "--max-inflight-tokens", "77", "--max-inflight-requests", "5", "--max-concurrent-rpcs", "40"]
    )  # fmt: skip
    config = _mesh_config(args)
    want_host = HostLimits(
        max_queue_rows=100, max_queue_requests=9, max_request_rows=50, max_segments=7, max_batch_rows=30
    )
    hosts, router = host_configs(config), router_config(config, ["127.0.0.1:1"])
    assert {h.limits for h in hosts} == {want_host}
    assert router.limits == RouterLimits(max_inflight_tokens=77, max_inflight_requests=5)
    assert {h.server.max_concurrent_rpcs for h in hosts} | {router.server.max_concurrent_rpcs} == {40}
    for spec in (ProcessSpec(expert=hosts[0]), ProcessSpec(router=router)):  # what a child process reads
        assert ProcessSpec.from_json(spec.to_json()) == spec


def test_cli_defaults_are_the_documented_ones():
    from moemesh.deploy.cli import build_parser
    from moemesh.deploy.cli_args import mesh_config as _mesh_config

    config = _mesh_config(build_parser().parse_args(["up", "--backend", "embedded"]))
    assert (config.host_limits, config.router_limits) == (HostLimits(), RouterLimits())
    assert config.max_concurrent_rpcs == 1024
