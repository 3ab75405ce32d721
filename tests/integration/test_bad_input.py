"""Every kind of bad input gets a clear status naming the field, and the next good request works."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from moemesh.client import Client, InvalidArgumentError, RoutingMode, RoutingPolicy
from moemesh.deploy.local import EmbeddedMesh, MeshConfig
from moemesh.experts.weights import open_source, preset_config
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import moemesh_pb2_grpc as pb_grpc
from moemesh.protos import wire
from tests.references import assert_matches_reference

pytestmark = pytest.mark.integration

MODEL = "tiny-mixtral"
H = 64
LIMIT = 1024 * 1024  # 1 MiB message limit on every server and channel of this mesh


@pytest.fixture(scope="module")
def mesh():
    with EmbeddedMesh(MeshConfig(MODEL, num_hosts=3, device="cpu", max_message_bytes=LIMIT)) as m:
        yield m


@pytest.fixture(scope="module")
def router(mesh):
    channel = grpc.insecure_channel(mesh.address)
    yield pb_grpc.RouterStub(channel)
    channel.close()


def _good(router) -> None:
    """A valid request right after the bad one: served, and exact."""
    source = open_source(MODEL)
    hidden = torch.randn(8, H, generator=torch.Generator().manual_seed(0))
    reply = router.Forward(pb.ForwardRequest(layer=0, hidden=wire.encode_tensor(hidden), return_routing=True))
    out = wire.decode_tensor(reply.hidden, "hidden")
    routing = wire.decode_routing(reply.routing)
    assert_matches_reference(source, preset_config(MODEL), 0, hidden, out, routing)


def _hidden(shape=(4, H), dtype=torch.float32) -> pb.Tensor:
    return wire.encode_tensor(torch.randn(*shape).to(dtype))


BAD_FORWARDS = {
    "wrong hidden size": (
        pb.ForwardRequest(layer=0, hidden=_hidden((4, H + 1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden.shape: expected hidden size 64",
    ),
    "rank 3 hidden": (
        pb.ForwardRequest(layer=0, hidden=_hidden((1, 4, H))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden.shape: expected 2 dimensions",
    ),
    "unknown dtype": (
        pb.ForwardRequest(layer=0, hidden=pb.Tensor(dtype=0, shape=[4, H], data=b"\0" * 4 * H * 4)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden.dtype: expected one of DTYPE_FLOAT32, DTYPE_FLOAT16, DTYPE_BFLOAT16",
    ),
    "int dtype": (
        pb.ForwardRequest(
            layer=0, hidden=pb.Tensor(dtype=pb.DTYPE_INT32, shape=[4, H], data=b"\0" * 4 * H * 4)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden.dtype",
    ),
    "byte count mismatch": (
        pb.ForwardRequest(layer=0, hidden=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4, H], data=b"\0" * 100)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden.data: expected 1024 bytes",
    ),
    "empty batch": (
        pb.ForwardRequest(layer=0, hidden=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, H], data=b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden.shape: expected at least 1 token",
    ),
    "missing hidden": (
        pb.ForwardRequest(layer=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden: required",
    ),
    "unknown layer": (
        pb.ForwardRequest(layer=7, hidden=_hidden()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "layer: unknown MoE layer 7; expected one of [0, 1]",
    ),
    "top_k out of range": (
        pb.ForwardRequest(
            layer=0, hidden=_hidden(), routing=pb.RoutingOverride(mode=pb.ROUTING_MODE_TOP_K, top_k=9)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "routing.top_k",
    ),
    "top_p out of range": (
        pb.ForwardRequest(
            layer=0, hidden=_hidden(), routing=pb.RoutingOverride(mode=pb.ROUTING_MODE_TOP_P, top_p=1.5)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "routing.top_p",
    ),
    "top_p missing": (
        pb.ForwardRequest(layer=0, hidden=_hidden(), routing=pb.RoutingOverride(mode=pb.ROUTING_MODE_TOP_P)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "routing.",
    ),
    "threshold out of range": (
        pb.ForwardRequest(
            layer=0,
            hidden=_hidden(),
            routing=pb.RoutingOverride(mode=pb.ROUTING_MODE_THRESHOLD, threshold=2.0, max_k=2),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "routing.threshold",
    ),
    "max_k out of range": (
        pb.ForwardRequest(
            layer=0,
            hidden=_hidden(),
            routing=pb.RoutingOverride(mode=pb.ROUTING_MODE_TOP_P, top_p=0.5, max_k=99),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "routing.max_k",
    ),
    "unknown routing mode": (
        pb.ForwardRequest(layer=0, hidden=_hidden(), routing=pb.RoutingOverride(mode=42)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "routing.mode",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARDS))
def test_bad_forward_is_rejected_then_good_request_succeeds(router, case):
    request, code, message = BAD_FORWARDS[case]
    with pytest.raises(grpc.RpcError) as info:
        router.Forward(request)
    assert info.value.code() == code
    assert message in info.value.details()
    _good(router)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_input_names_the_token(router, value):
    hidden = torch.randn(5, H)
    hidden[3, 10] = value
    with pytest.raises(grpc.RpcError) as info:
        router.Forward(pb.ForwardRequest(layer=0, hidden=wire.encode_tensor(hidden)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hidden.data: expected finite values; token 3" in info.value.details()
    _good(router)


def test_route_rejects_bad_input_too(router):
    with pytest.raises(grpc.RpcError) as info:
        router.Route(pb.RouteRequest(layer=0, hidden=_hidden((4, 3))))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hidden.shape" in info.value.details()
    _good(router)


def test_message_over_the_size_limit_is_resource_exhausted(router):
    tokens = LIMIT // (H * 4) + 16  # just over 1 MiB of float32
    with pytest.raises(grpc.RpcError) as info:
        router.Forward(pb.ForwardRequest(layer=0, hidden=_hidden((tokens, H))))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _good(router)


def test_sdk_raises_typed_error_keeping_the_status(mesh):
    with Client(mesh.address) as client:
        with pytest.raises(InvalidArgumentError) as info:
            client.forward(torch.randn(4, H), layer=0, policy=RoutingPolicy(RoutingMode.TOP_K, top_k=99))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "routing.top_k" in info.value.details
        assert isinstance(info.value.__cause__, grpc.RpcError)
        out = client.forward(torch.randn(4, H), layer=0)
        assert out.shape == (4, H)


def _expert_stub(mesh):
    channel = grpc.insecure_channel(mesh.hosts[0].address)
    return channel, pb_grpc.ExpertStub(channel)


def test_expert_host_rejects_unknown_expert_and_bad_segments(mesh):
    channel, stub = _expert_stub(mesh)
    held = mesh.hosts[0].servicer.bank.experts
    not_held = next((0, e) for e in range(8) if (0, e) not in held)
    rows = wire.encode_tensor(torch.randn(4, H))
    try:
        cases = [
            (
                [pb.Segment(layer=not_held[0], expert=not_held[1], row_start=0, row_count=4)],
                f"expert {not_held[1]}",
            ),
            ([pb.Segment(layer=0, expert=held[0][1], row_start=2, row_count=4)], "segments[0]"),
            ([pb.Segment(layer=0, expert=held[0][1], row_start=0, row_count=0)], "segments[0].row_count"),
            ([], "segments: expected at least one segment"),
            (
                [
                    pb.Segment(layer=0, expert=held[0][1], row_start=0, row_count=3),
                    pb.Segment(layer=0, expert=held[0][1], row_start=2, row_count=2),
                ],
                "overlap",
            ),
        ]
        for segments, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Compute(pb.ComputeRequest(segments=segments, rows=rows))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, segments
            assert message in info.value.details()
        ok = stub.Compute(
            pb.ComputeRequest(
                segments=[pb.Segment(layer=0, expert=held[0][1], row_start=0, row_count=4)], rows=rows
            )
        )
        assert list(ok.rows.shape) == [4, H]
    finally:
        channel.close()


@pytest.mark.parametrize(
    "method",
    [
        "/moemesh.v1.Router/Forward",
        "/moemesh.v1.Router/Route",
        "/moemesh.v1.Router/Dispatch",
        "/moemesh.v1.Expert/Compute",
    ],
)
@pytest.mark.parametrize("payload", [b"\x34", b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 64])
def test_bytes_that_are_no_protobuf_are_invalid_argument(mesh, router, method, payload):
    address = mesh.address if "Router" in method else mesh.hosts[0].address
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method)  # raw bytes out, raw bytes back
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "request:" in info.value.details() and "not a valid message" in info.value.details()
    _good(router)


def test_a_huge_shape_is_summarised_in_a_short_invalid_argument(router):
    # 6,000 dimensions: repeating them would overflow the caller's metadata limit (16 KiB) and
    # reach it as RESOURCE_EXHAUSTED instead of the real status.
    hidden = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 6000, data=b"\0\0\0\0")
    with pytest.raises(grpc.RpcError) as info:
        router.Forward(pb.ForwardRequest(layer=0, hidden=hidden), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "6000 dimensions" in info.value.details() and len(info.value.details()) < 500
    _good(router)
