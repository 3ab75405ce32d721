"""protos/wire.py: protobuf <-> the contract's Python types, both ways, and every rejection naming its field."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import spec, wire
from moemesh.protos.spec import Routing, RoutingMode, RoutingPolicy, Segment
from moemesh.protos.wire import InvalidArgument

ALL_CODES = tuple(d.wire for d in spec.DTYPES)
I32 = torch.int32


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.int32:
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32)
    return torch.randn(shape, generator=gen).mul_(100).to(dtype)  # in place: randn's strides


# -- tensors -----------------------------------------------------------------------------------------


def test_spec_dtypes_agree_with_the_proto_enum():
    proto = {name.removeprefix("DTYPE_").lower(): code for name, code in pb.DType.items() if code}
    assert {d.name: d.wire for d in spec.DTYPES} == proto
    assert pb.DType.Name(0) == "DTYPE_UNSPECIFIED" and 0 not in ALL_CODES  # never a valid dtype
    assert {d.name for d in spec.DTYPES if d.torch.is_floating_point} == set(spec.FLOAT_DTYPES)
    assert [d.itemsize for d in spec.DTYPES] == [4, 2, 2, 4]  # as moemesh.proto's comments state


@settings(max_examples=40, derandomize=True, deadline=None, database=None)
@given(
    dtype=st.sampled_from(spec.DTYPES),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_tensor_round_trip_is_exact(dtype, shape, seed):
    t = _sample(dtype.torch, shape, seed)
    msg = wire.encode_tensor(t)
    assert (msg.dtype, tuple(msg.shape), len(msg.data)) == (dtype.wire, shape, t.numel() * dtype.itemsize)
    back = wire.decode_tensor(pb.Tensor.FromString(msg.SerializeToString()), "x", allowed=ALL_CODES)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)


@pytest.mark.parametrize("dtype", [d.torch for d in spec.DTYPES], ids=[d.name for d in spec.DTYPES])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4), (7,), (2, 3)], ids=str)
def test_tensor_round_trip_zero_size_and_1d(dtype, shape):
    t = _sample(dtype, shape, seed=1)
    back = wire.decode_tensor(wire.encode_tensor(t), "x", allowed=ALL_CODES)
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_encode_is_little_endian_row_major_and_takes_any_layout():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert wire.encode_tensor(t).data == np.arange(6, dtype="<f4").tobytes()
    # a transposed view and a tensor needing grad encode as their values
    view = t.t().requires_grad_()
    assert torch.equal(wire.decode_tensor(wire.encode_tensor(view), "x"), view.detach())
    # special values keep their bits
    special = torch.tensor([float("nan"), float("inf"), -0.0], dtype=torch.bfloat16)
    back = wire.decode_tensor(wire.encode_tensor(special), "x")
    assert back.view(torch.int16).tolist() == special.view(torch.int16).tolist()


@pytest.mark.parametrize(
    "make", [lambda: torch.zeros(0, 1) * 2, lambda: torch.zeros(4, 1).expand(4, 3)[:, :1]], ids=["0x1", "4x1"]
)
def test_encode_contiguous_tensor_with_odd_stride_of_size_1_dim(make):
    t = make()
    assert t.is_contiguous() and t.stride(-1) == 0
    assert torch.equal(wire.decode_tensor(wire.encode_tensor(t), "x"), t)


def test_encode_rejects_unsupported_dtype():
    with pytest.raises(TypeError, match="cannot encode.*float64"):
        wire.encode_tensor(torch.zeros(2, dtype=torch.float64))


def test_decode_wraps_the_message_bytes_without_copying():
    raw = np.arange(6, dtype="<f4").tobytes()
    # upb returns a fresh bytes object on every access to `.data`, so hand decode_tensor a
    # message-shaped object whose buffer we hold, and check the tensor reads that very buffer.
    msg = SimpleNamespace(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=raw)
    t = wire.decode_tensor(msg, "x")
    assert t.data_ptr() == np.frombuffer(raw, dtype=np.uint8).ctypes.data
    assert t.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    # from a real message too: storage borrowed from a Python buffer (not owned, not resizable)
    real = wire.decode_tensor(wire.encode_tensor(torch.ones(4, 4)), "x")
    assert not real.untyped_storage().resizable() and real.untyped_storage().nbytes() == 64


def test_decode_routing_copies_so_callers_may_write():
    routing = Routing(torch.tensor([[1, -1]]), torch.tensor([[1.0, 0.0]]))
    back = wire.decode_routing(wire.encode_routing(routing))
    back.weights.mul_(2)  # owned memory: writing is allowed and harms nothing
    assert back.experts.dtype == torch.int64 and back.experts.tolist() == [[1, -1]]
    assert back.weights.tolist() == [[2.0, 0.0]]


def _tensor(dtype=pb.DTYPE_FLOAT32, shape=(2, 2), nbytes=None) -> pb.Tensor:
    if nbytes is None:
        nbytes = int(np.prod(shape)) * (2 if dtype in (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16) else 4)
    return pb.Tensor(dtype=dtype, shape=list(shape), data=b"\0" * nbytes)


@pytest.mark.parametrize(
    "msg, kwargs, field, message",
    [
        (_tensor(pb.DTYPE_INT32), {}, "hidden.dtype", "expected one of DTYPE_FLOAT32.*got DTYPE_INT32"),
        (_tensor(pb.DTYPE_UNSPECIFIED, nbytes=0), {}, "hidden.dtype", "got DTYPE_UNSPECIFIED"),
        (_tensor(99, nbytes=0), {}, "hidden.dtype", "got 99"),
        (_tensor(), {"allowed": (pb.DTYPE_INT32,)}, "hidden.dtype", "expected one of DTYPE_INT32"),
        (_tensor(shape=(4,)), {"rank": 2}, "hidden.shape", r"expected 2 dimensions, got 1 \(\[4\]\)"),
        (_tensor(shape=(1, 2, 2)), {"rank": 2}, "hidden.shape", "expected 2 dimensions, got 3"),
        (_tensor(shape=(2, -1), nbytes=0), {}, "hidden.shape", r"must be >= 0, got \[2, -1\]"),
        (_tensor(nbytes=15), {}, "hidden.data", r"expected 16 bytes for shape \[2, 2\].*got 15"),
        (_tensor(pb.DTYPE_BFLOAT16, nbytes=16), {}, "hidden.data", "expected 8 bytes.*DTYPE_BFLOAT16"),
        (_tensor(shape=(0, 3), nbytes=4), {}, "hidden.data", "expected 0 bytes"),
    ],
)
def test_decode_tensor_rejections_name_the_field(msg, kwargs, field, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        wire.decode_tensor(msg, "hidden", **kwargs)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    "msg, rows",
    [
        (_tensor(shape=(3, 4)), 3),
        (_tensor(pb.DTYPE_BFLOAT16, shape=(5, 2)), 5),
        (_tensor(shape=(0, 4), nbytes=0), 0),
        (_tensor(shape=(), nbytes=4), 0),  # a scalar has no rows
        (_tensor(shape=(9000, 64), nbytes=1024), 0),  # a shape its data cannot fill: not a claim
        (_tensor(shape=(2, -1), nbytes=0), 0),
        (_tensor(99, shape=(3, 4), nbytes=48), 0),
        (_tensor(shape=(1,) * 9, nbytes=4), 0),  # longer than any tensor of the protocol
    ],
)
def test_claimed_rows_counts_only_a_shape_that_fits_its_data(msg, rows):
    assert wire.claimed_rows(msg) == rows


# -- routing and policy ------------------------------------------------------------------------------


def test_routing_round_trip():
    routing = Routing(torch.tensor([[3, 0], [5, -1]]), torch.tensor([[0.75, 0.25], [1.0, 0.0]]))
    msg = wire.encode_routing(routing)
    assert (msg.experts.dtype, msg.weights.dtype) == (pb.DTYPE_INT32, pb.DTYPE_FLOAT32)
    back = wire.decode_routing(pb.Routing.FromString(msg.SerializeToString()))
    assert back.experts.dtype == torch.int64 and back.weights.dtype == torch.float32
    assert torch.equal(back.experts, routing.experts) and torch.equal(back.weights, routing.weights)


@pytest.mark.parametrize(
    "experts, weights, field",
    [
        (torch.zeros(2, 2), torch.zeros(2, 2), "routing.experts.dtype"),  # float experts
        (torch.zeros(4, dtype=I32), torch.zeros(2, 2), "routing.experts.shape"),
        (torch.zeros(2, 2, dtype=I32), torch.zeros(2, 2, dtype=torch.float16), "routing.weights.dtype"),
        (torch.zeros(2, 2, dtype=I32), torch.zeros(4), "routing.weights.shape"),
    ],
)
def test_decode_routing_rejections_name_the_field(experts, weights, field):
    msg = pb.Routing(experts=wire.encode_tensor(experts), weights=wire.encode_tensor(weights))
    with pytest.raises(InvalidArgument) as info:
        wire.decode_routing(msg)
    assert info.value.field == field


def test_decode_routing_rejects_mismatched_experts_and_weights():
    msg = pb.Routing(
        experts=wire.encode_tensor(torch.zeros(2, 2, dtype=I32)),
        weights=wire.encode_tensor(torch.zeros(3, 1)),
    )
    with pytest.raises(InvalidArgument):
        wire.decode_routing(msg)


def test_dispatch_request_round_trip_converts_any_int_and_float_routing():
    hidden = _sample(torch.bfloat16, (3, 5), seed=2)
    experts = torch.tensor([[7, -1], [-1, -1], [0, 2**31 - 1]], dtype=torch.int64)
    weights = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.25, -1.5]], dtype=torch.bfloat16)
    msg = pb.DispatchRequest.FromString(
        wire.encode_dispatch(4, hidden, Routing(experts, weights)).SerializeToString()
    )
    assert msg.layer == 4 and torch.equal(wire.decode_tensor(msg.hidden, "hidden", rank=2), hidden)
    assert (msg.routing.experts.dtype, msg.routing.weights.dtype) == (pb.DTYPE_INT32, pb.DTYPE_FLOAT32)
    routing = wire.decode_routing(msg.routing)
    assert torch.equal(routing.experts, experts) and torch.equal(routing.weights, weights.float())
    int16 = wire.encode_dispatch(0, hidden, Routing(experts.clamp(max=9).to(torch.int16), weights.double()))
    back = wire.decode_routing(int16.routing)
    assert torch.equal(back.experts, experts.clamp(max=9)) and torch.equal(back.weights, weights.float())


@pytest.mark.parametrize(
    "experts, weights, error, message",
    [
        (torch.zeros(1, 2), torch.zeros(1, 2), TypeError, "experts: expected an integer tensor"),
        (torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 2), TypeError, "experts: .*torch.bool"),
        (torch.zeros(1, 2, dtype=I32), torch.zeros(1, 2, dtype=I32), TypeError, "weights: expected a float tensor"),
        (torch.tensor([[1, 2**31]]), torch.zeros(1, 2), ValueError, "experts: expert ids must fit int32"),
        (torch.tensor([[-(2**31) - 1, 0]]), torch.zeros(1, 2), ValueError, "must fit int32"),
    ],
)  # fmt: skip
def test_encode_dispatch_refuses_what_the_wire_cannot_carry(experts, weights, error, message):
    with pytest.raises(error, match=message):
        wire.encode_dispatch(0, torch.zeros(1, 4), Routing(experts, weights))


@pytest.mark.parametrize(
    "policy",
    [
        RoutingPolicy(RoutingMode.TOP_K),
        RoutingPolicy(RoutingMode.TOP_K, top_k=3),
        RoutingPolicy(RoutingMode.TOP_P, top_p=0.75, max_k=4),
        RoutingPolicy(RoutingMode.TOP_P, top_p=1.0),
        RoutingPolicy(RoutingMode.THRESHOLD, threshold=0.25, max_k=2),
        RoutingPolicy(RoutingMode.THRESHOLD, threshold=0.0),  # 0 is a valid threshold
    ],
    ids=RoutingPolicy.describe,
)
def test_policy_round_trip_every_mode(policy):
    msg = pb.RoutingOverride.FromString(wire.encode_policy(policy).SerializeToString())
    assert wire.decode_policy(msg, present=True) == policy


def test_policy_fields_of_other_modes_are_dropped_and_floats_are_float32():
    msg = pb.RoutingOverride(mode=pb.ROUTING_MODE_TOP_K, top_k=2, top_p=0.5, threshold=0.5, max_k=3)
    assert wire.decode_policy(msg, True) == RoutingPolicy(RoutingMode.TOP_K, top_k=2, max_k=3)
    back = wire.decode_policy(wire.encode_policy(RoutingPolicy(RoutingMode.TOP_P, top_p=0.9)), True)
    assert back.top_p == pytest.approx(0.9, abs=1e-7)  # travels as a proto float


def test_absent_or_empty_unspecified_policy_is_none():
    msg = pb.RoutingOverride(mode=pb.ROUTING_MODE_TOP_P, top_p=0.5)
    assert wire.decode_policy(msg, present=False) is None
    assert wire.decode_policy(pb.RoutingOverride(), present=True) is None


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"top_k": 3}, RoutingPolicy(RoutingMode.TOP_K, top_k=3)),
        ({"max_k": 3}, RoutingPolicy(RoutingMode.TOP_K)),
        ({"top_p": 0.5}, RoutingPolicy(RoutingMode.TOP_K)),
        ({"threshold": 0.5, "top_k": 1}, RoutingPolicy(RoutingMode.TOP_K, top_k=1)),
    ],
)
def test_unspecified_mode_with_fields_is_top_k(fields, expected):
    msg = pb.RoutingOverride(mode=pb.ROUTING_MODE_UNSPECIFIED, **fields)
    assert wire.decode_policy(msg, present=True) == expected


def test_unknown_routing_mode_names_the_field():
    with pytest.raises(InvalidArgument, match="unknown routing mode 7") as info:
        wire.decode_policy(pb.RoutingOverride(mode=7, top_k=2), present=True)
    assert info.value.field == "routing.mode"


# -- expert work -------------------------------------------------------------------------------------


def test_segments_and_compute_request_round_trip():
    segments = [Segment(1, 5, 0, 2), Segment(1, 0, 3, 1)]  # row 2 uncovered: allowed
    rows = _sample(torch.bfloat16, (4, 8), seed=3)
    msg = pb.ComputeRequest.FromString(wire.encode_compute(segments, rows).SerializeToString())
    got_segments, got_rows = wire.decode_compute(msg)
    assert got_segments == segments
    assert got_rows.dtype == torch.bfloat16 and torch.equal(got_rows, rows)


@pytest.mark.parametrize(
    "segments, field, message",
    [
        ([], "segments", "at least one segment"),
        ([pb.Segment(row_start=0, row_count=0)], "segments[0].row_count", "expected >= 1, got 0"),
        (
            [pb.Segment(row_start=0, row_count=2), pb.Segment(row_start=3, row_count=2)],
            "segments[1]",
            r"rows \[3, 5\) exceed the 4 rows sent",
        ),
        ([pb.Segment(row_start=4, row_count=1)], "segments[0]", r"rows \[4, 5\)"),
    ],
)
def test_bad_segments_name_the_field(segments, field, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        wire.decode_segments(segments, num_rows=4)
    assert info.value.field == field


@pytest.mark.parametrize(
    "rows, field",
    [(torch.zeros(4), "rows.shape"), (torch.zeros(2, 2, dtype=I32), "rows.dtype")],
)
def test_bad_compute_rows_name_the_field(rows, field):
    msg = wire.encode_compute([Segment(0, 0, 0, 1)], rows)
    with pytest.raises(InvalidArgument) as info:
        wire.decode_compute(msg)
    assert info.value.field == field


# -- hosts and topology ------------------------------------------------------------------------------

HOST = spec.HostInfo("h0", "10.0.0.1:7000", "cuda:0", "bfloat16", ((0, 0), (0, 1), (2, 7)), "tiny-mixtral",
                node="node-a", relative_speed=0.5)  # fmt: skip


def test_host_info_round_trip():
    msg = pb.InfoResponse.FromString(wire.encode_info(HOST).SerializeToString())
    assert wire.decode_info(msg, HOST.address) == HOST  # the address is where the host was reached
    msg.relative_speed = 0.0  # unknown: taken as the reference speed
    assert wire.decode_info(msg, "a:1").relative_speed == 1.0


def test_topology_round_trip():
    layer = spec.LayerInfo(0, num_experts=8, hidden_size=64, intermediate_size=128, top_k=2, family="mixtral",
                      shared_experts=0, tokens_routed=(0, 5, 2**40, 0, 0, 0, 0, 1))  # fmt: skip
    down = spec.HostInfo("h1", "10.0.0.2:7000", "cpu", "float32", ((1, 0),), "tiny-mixtral", healthy=False)
    topology = spec.Topology(
        "tiny-mixtral", (layer, spec.LayerInfo(1, 8, 64, 128, 2, "mixtral", 1)), (HOST, down)
    )
    msg = pb.GetTopologyResponse.FromString(wire.encode_topology(topology).SerializeToString())
    assert wire.decode_topology(msg) == topology
    assert wire.decode_topology(pb.GetTopologyResponse()) == spec.Topology("", (), ())


@pytest.mark.parametrize(
    "shape, dtype",
    [((5, 7), torch.float32), ((0, 3), torch.float32), ((300, 64), torch.bfloat16), ((1, 1), torch.float16)],
)
def test_compute_request_bytes_are_protobufs_own(shape, dtype):
    rows = torch.randn(*shape).to(dtype)
    segments = [Segment(0, 1, 0, 1), Segment(1, 6, 1, max(0, shape[0] - 1))]
    fast = wire.compute_request_bytes(segments, rows)
    assert fast == wire.encode_compute(segments, rows).SerializeToString()
    back_segments = pb.ComputeRequest.FromString(fast).segments
    back_rows = wire.decode_tensor(pb.ComputeRequest.FromString(fast).rows, "rows", rank=2)
    assert len(back_segments) == 2 and torch.equal(back_rows, rows)
