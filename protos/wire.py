"""The one place that converts between protobuf messages and the contract's Python types, both ways.

Tensors travel as dtype + shape + raw little-endian row-major bytes. Decoding wraps the message's
bytes without copying (the tensor is read-only; callers never write into it). Every decode checks
what it is given and raises `InvalidArgument` naming the field and what was expected.

    tensor      torch.Tensor      <-> pb.Tensor
    routing     Routing           <-> pb.Routing
    dispatch    layer, hidden, Routing -> pb.DispatchRequest (the routing through decode_routing)
    policy      RoutingPolicy     <-> pb.RoutingOverride
    segments    [Segment]         <-> [pb.Segment]
    host        HostInfo          <-> pb.InfoResponse / pb.HostInfo
    topology    Topology          <-> pb.GetTopologyResponse
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence

import torch

from . import moemesh_pb2 as pb
from .spec import (
    DTYPES,
    FLOAT_DTYPES,
    HostInfo,
    InvalidArgument,
    LayerInfo,
    Routing,
    RoutingMode,
    RoutingPolicy,
    Segment,
    Topology,
    dtype_info,
)

# Trailing metadata that tells a refused caller (RESOURCE_EXHAUSTED) when capacity is likely back,
# in milliseconds: gRPC's own retry pushback key (gRFC A6), which clients with a retry policy honour.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

# Largest message either end sends or accepts unless configured otherwise (both ends set it).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options for servers and channels alike: explicit message-size limits on both ends."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


_BIG_ENDIAN = sys.byteorder == "big"
_FLOAT_CODES = tuple(dtype_info(n).wire for n in FLOAT_DTYPES)
assert {d.wire: d.name.upper() for d in DTYPES} == {
    v: pb.DType.Name(v).removeprefix("DTYPE_") for v in pb.DType.values() if v
}, "spec.DTYPES and moemesh.proto's DType enum disagree"


def _shape_text(shape: list[int], most: int = 8) -> str:
    """A shape for an error message, summarised when long (a status message must stay small)."""
    if len(shape) <= most:
        return str(shape)
    return f"[{', '.join(map(str, shape[:4]))}, ..., {', '.join(map(str, shape[-2:]))}] ({len(shape)} dimensions)"


def _code_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else str(code)


# -- tensors -----------------------------------------------------------------------------------------


def _raw(t: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(wire dtype code, the tensor on the CPU, its bytes [numel * itemsize] uint8, little-endian)."""
    try:
        code = dtype_info(t.dtype).wire
    except ValueError as err:
        raise TypeError(f"cannot encode: {err}") from None
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8)  # flat first: a size-1 dim may carry any stride
    if _BIG_ENDIAN:  # pragma: no cover - every supported platform is little-endian today
        raw = raw.view(-1, t.element_size()).flip(1).reshape(-1)
    return code, t, raw


def encode_tensor(t: torch.Tensor) -> pb.Tensor:
    """Any supported tensor (any device) -> pb.Tensor."""
    code, t, raw = _raw(t)
    return pb.Tensor(dtype=code, shape=list(t.shape), data=raw.numpy().tobytes())


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tensor_field(number: int, t: torch.Tensor) -> list:
    """The serialized field `number` holding pb.Tensor `t`, as pieces to join: the same bytes as
    protobuf writes, without copying the tensor's data on the way (proto3 omits empty data)."""
    code, t, raw = _raw(t)
    head = pb.Tensor(dtype=code, shape=list(t.shape)).SerializeToString()  # fields 1, 2
    data = memoryview(raw.numpy())
    data_key = _varint(3 << 3 | 2) + _varint(data.nbytes) if data.nbytes else b""  # field 3, bytes
    size = len(head) + len(data_key) + data.nbytes
    return [_varint(number << 3 | 2), _varint(size), head, data_key, data]


def decode_tensor(
    msg: pb.Tensor,
    field: str,
    *,
    allowed: Sequence[int] = _FLOAT_CODES,
    rank: int | None = None,
) -> torch.Tensor:
    """pb.Tensor -> read-only CPU tensor. Raises InvalidArgument naming `field`."""
    if msg.dtype not in allowed:
        names = ", ".join(_code_name(d) for d in allowed)
        raise InvalidArgument(f"{field}.dtype", f"expected one of {names}, got {_code_name(msg.dtype)}")
    if rank is not None and len(msg.shape) != rank:  # before copying a shape that may be huge
        got = list(msg.shape[:4]) + list(msg.shape[-2:]) if len(msg.shape) > 8 else list(msg.shape)
        text = (
            _shape_text(got)
            if len(msg.shape) <= 8
            else f"{got[:4]}...{got[4:]} ({len(msg.shape)} dimensions)"
        )
        raise InvalidArgument(f"{field}.shape", f"expected {rank} dimensions, got {len(msg.shape)} ({text})")
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"dimensions must be >= 0, got {_shape_text(shape)}")
    info = dtype_info(msg.dtype)
    numel = 1
    for d in shape:
        numel *= d
    if len(msg.data) != numel * info.itemsize:
        raise InvalidArgument(
            f"{field}.data",
            f"expected {numel * info.itemsize} bytes for shape {_shape_text(shape)} and {_code_name(msg.dtype)}, "
            f"got {len(msg.data)}",
        )
    if numel == 0:
        return torch.empty(shape, dtype=info.torch)
    with warnings.catch_warnings():
        # The buffer is immutable `bytes`; the tensor is only ever read.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(msg.data, dtype=info.torch)
    if _BIG_ENDIAN:  # pragma: no cover
        flat = flat.view(torch.uint8).view(-1, info.itemsize).flip(1).contiguous().view(info.torch).flatten()
    return flat.view(shape)


# No tensor of the protocol has more dimensions; a longer shape is never worth multiplying out here.
_MAX_CLAIMED_RANK = 8


def claimed_rows(msg: pb.Tensor) -> int:
    """The first dimension of a tensor message, read without decoding it (admission counts it
    before any torch work). 0 when the shape has no dimension or does not describe the data: such
    a message is refused by `decode_tensor` as INVALID_ARGUMENT, not counted against a capacity
    (nor told to split itself)."""
    shape = msg.shape
    if not 1 <= len(shape) <= _MAX_CLAIMED_RANK or min(shape) < 0:
        return 0
    try:
        itemsize = dtype_info(msg.dtype).itemsize
    except ValueError:
        return 0
    return int(shape[0]) if math.prod(shape) * itemsize == len(msg.data) else 0


# -- routing -----------------------------------------------------------------------------------------


def encode_routing(routing: Routing) -> pb.Routing:
    return pb.Routing(
        experts=encode_tensor(routing.experts.to(torch.int32)),
        weights=encode_tensor(routing.weights.to(torch.float32)),
    )


def decode_routing(msg: pb.Routing) -> Routing:
    experts = decode_tensor(msg.experts, "routing.experts", allowed=(pb.DTYPE_INT32,), rank=2)
    weights = decode_tensor(msg.weights, "routing.weights", allowed=(pb.DTYPE_FLOAT32,), rank=2)
    if experts.shape != weights.shape:
        raise InvalidArgument(
            "routing.weights.shape",
            f"expected the shape of routing.experts {list(experts.shape)}, got {list(weights.shape)}",
        )
    return Routing(experts=experts.to(torch.int64), weights=weights.clone())


_INT32 = torch.iinfo(torch.int32)


def encode_dispatch(layer: int, hidden: torch.Tensor, routing: Routing) -> pb.DispatchRequest:
    """Router.Dispatch request. hidden: [tokens, hidden_size]; routing: experts of any integer dtype
    (ids must fit int32; -1 = unused slot), weights of any float dtype, both [tokens, K], sent as
    int32 / float32. The router checks shapes and ranges; TypeError / ValueError here only for what
    the wire cannot carry."""
    experts, weights = routing.experts, routing.weights
    if experts.dtype.is_floating_point or experts.dtype.is_complex or experts.dtype == torch.bool:
        raise TypeError(f"experts: expected an integer tensor of expert ids, got {experts.dtype}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"weights: expected a float tensor of combine weights, got {weights.dtype}")
    if experts.numel() and (int(experts.min()) < _INT32.min or int(experts.max()) > _INT32.max):
        raise ValueError(
            f"experts: expert ids must fit int32, got [{int(experts.min())}, {int(experts.max())}]"
        )
    return pb.DispatchRequest(layer=layer, hidden=encode_tensor(hidden), routing=encode_routing(routing))


_MODE_TO_PB = {
    RoutingMode.TOP_K: pb.ROUTING_MODE_TOP_K,
    RoutingMode.TOP_P: pb.ROUTING_MODE_TOP_P,
    RoutingMode.THRESHOLD: pb.ROUTING_MODE_THRESHOLD,
}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}


def encode_policy(policy: RoutingPolicy) -> pb.RoutingOverride:
    return pb.RoutingOverride(
        mode=_MODE_TO_PB[policy.mode],
        top_k=policy.top_k or 0,
        top_p=policy.top_p or 0.0,
        threshold=policy.threshold or 0.0,
        max_k=policy.max_k or 0,
    )


def decode_policy(msg: pb.RoutingOverride, present: bool) -> RoutingPolicy | None:
    """None when the request carries no override (or mode UNSPECIFIED with nothing else set)."""
    if not present:
        return None
    if msg.mode == pb.ROUTING_MODE_UNSPECIFIED:
        if msg.top_k or msg.max_k or msg.top_p or msg.threshold:
            return RoutingPolicy(mode=RoutingMode.TOP_K, top_k=msg.top_k or None)
        return None
    if msg.mode not in _MODE_FROM_PB:
        raise InvalidArgument("routing.mode", f"unknown routing mode {msg.mode}")
    mode = _MODE_FROM_PB[msg.mode]
    return RoutingPolicy(
        mode=mode,
        top_k=msg.top_k or None,
        top_p=msg.top_p if mode is RoutingMode.TOP_P else None,
        threshold=msg.threshold if mode is RoutingMode.THRESHOLD else None,
        max_k=msg.max_k or None,
    )


# -- expert work -------------------------------------------------------------------------------------


def encode_segments(segments: Sequence[Segment]) -> list[pb.Segment]:
    return [
        pb.Segment(layer=s.layer, expert=s.expert, row_start=s.start, row_count=s.count) for s in segments
    ]


def decode_segments(msgs: Sequence[pb.Segment], num_rows: int) -> list[Segment]:
    """Segments of a Compute request; each must be a non-empty run inside the rows tensor."""
    if not msgs:
        raise InvalidArgument("segments", "expected at least one segment")
    out = []
    for i, m in enumerate(msgs):
        if m.row_count < 1:
            raise InvalidArgument(f"segments[{i}].row_count", f"expected >= 1, got {m.row_count}")
        if m.row_start + m.row_count > num_rows:
            raise InvalidArgument(
                f"segments[{i}]",
                f"rows [{m.row_start}, {m.row_start + m.row_count}) exceed the {num_rows} rows sent",
            )
        out.append(Segment(m.layer, m.expert, m.row_start, m.row_count))
    return out


def encode_compute(segments: Sequence[Segment], rows: torch.Tensor) -> pb.ComputeRequest:
    return pb.ComputeRequest(segments=encode_segments(segments), rows=encode_tensor(rows))


def compute_request_bytes(segments: Sequence[Segment], rows: torch.Tensor) -> bytes:
    """`encode_compute(segments, rows).SerializeToString()` with one copy of the rows instead of
    three (the router sends every routed row to a host this way)."""
    head = pb.ComputeRequest(segments=encode_segments(segments)).SerializeToString()  # field 1
    return b"".join([head, *_tensor_field(2, rows)])


def decode_compute(msg: pb.ComputeRequest) -> tuple[list[Segment], torch.Tensor]:
    """segments, rows [R, hidden] of a Compute request, checked."""
    rows = decode_tensor(msg.rows, "rows", rank=2)
    return decode_segments(msg.segments, rows.shape[0]), rows


# -- hosts and topology ------------------------------------------------------------------------------


def _host_fields(host: HostInfo) -> dict:
    """The fields pb.InfoResponse and pb.HostInfo share."""
    return dict(
        host_id=host.host_id,
        device=host.device,
        dtype=host.dtype,
        experts=[pb.ExpertRef(layer=layer, expert=expert) for layer, expert in host.experts],
        node=host.node,
        relative_speed=host.relative_speed,
    )


def _decode_host(msg: pb.InfoResponse | pb.HostInfo, address: str, model: str = "", healthy: bool = True):
    return HostInfo(
        host_id=msg.host_id,
        address=address,
        device=msg.device,
        dtype=msg.dtype,
        experts=tuple((e.layer, e.expert) for e in msg.experts),
        model=model,
        node=msg.node,
        relative_speed=msg.relative_speed or 1.0,  # 0 = unknown, taken as the reference speed
        healthy=healthy,
    )


def encode_info(host: HostInfo) -> pb.InfoResponse:
    return pb.InfoResponse(model=host.model, **_host_fields(host))


def decode_info(msg: pb.InfoResponse, address: str) -> HostInfo:
    """An expert host's own description, reached at `address`."""
    return _decode_host(msg, address, model=msg.model)


# LayerInfo fields with the same name in Python and on the wire.
_LAYER_FIELDS = ("layer", "num_experts", "hidden_size", "intermediate_size", "top_k", "shared_experts")


def encode_topology(topology: Topology) -> pb.GetTopologyResponse:
    layers = [
        pb.LayerInfo(
            routing_family=x.family,
            tokens_routed=list(x.tokens_routed),
            **{f: getattr(x, f) for f in _LAYER_FIELDS},
        )
        for x in topology.layers
    ]
    hosts = [pb.HostInfo(address=h.address, healthy=h.healthy, **_host_fields(h)) for h in topology.hosts]
    return pb.GetTopologyResponse(model=topology.model, layers=layers, hosts=hosts)


def decode_topology(msg: pb.GetTopologyResponse) -> Topology:
    layers = tuple(
        LayerInfo(
            family=x.routing_family,
            tokens_routed=tuple(x.tokens_routed),
            **{f: getattr(x, f) for f in _LAYER_FIELDS},
        )
        for x in msg.layers
    )
    hosts = tuple(_decode_host(h, h.address, model=msg.model, healthy=h.healthy) for h in msg.hosts)
    return Topology(msg.model, layers, hosts)
