"""The one place that knows both tensors and protobuf.

Tensors travel as dtype + shape + raw little-endian row-major bytes. Decoding wraps the message's
bytes without copying (the tensor is read-only; callers never write into it). Every decode checks
what it is given and raises `InvalidArgument` naming the field and what was expected.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch

from moemesh.protos import moemesh_pb2 as pb
from moemesh.router.dispatch import Segment
from moemesh.router.gating import Routing, RoutingMode, RoutingPolicy


class InvalidArgument(ValueError):
    """Bad input from a caller; `field` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


_TO_TORCH = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT32: torch.int32,
}
_TO_PB = {v: k for k, v in _TO_TORCH.items()}
FLOAT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
_BIG_ENDIAN = sys.byteorder == "big"


def dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else str(code)


def encode_tensor(t: torch.Tensor) -> pb.Tensor:
    """Any supported tensor (any device) -> pb.Tensor."""
    if t.dtype not in _TO_PB:
        raise TypeError(f"cannot encode dtype {t.dtype}; supported: {sorted(str(d) for d in _TO_PB)}")
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    if _BIG_ENDIAN:  # pragma: no cover - every supported platform is little-endian today
        raw = raw.view(-1, t.element_size()).flip(1)
    return pb.Tensor(dtype=_TO_PB[t.dtype], shape=list(t.shape), data=raw.numpy().tobytes())


def decode_tensor(
    msg: pb.Tensor,
    field: str,
    *,
    allowed: Sequence[int] = FLOAT_DTYPES,
    rank: int | None = None,
) -> torch.Tensor:
    """pb.Tensor -> read-only CPU tensor. Raises InvalidArgument naming `field`."""
    if msg.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise InvalidArgument(f"{field}.dtype", f"expected one of {names}, got {dtype_name(msg.dtype)}")
    shape = list(msg.shape)
    if rank is not None and len(shape) != rank:
        raise InvalidArgument(f"{field}.shape", f"expected {rank} dimensions, got {len(shape)} ({shape})")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"dimensions must be >= 0, got {shape}")
    dtype = _TO_TORCH[msg.dtype]
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise InvalidArgument(
            f"{field}.data",
            f"expected {numel * itemsize} bytes for shape {shape} and {dtype_name(msg.dtype)}, got {len(msg.data)}",
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # The buffer is immutable `bytes`; the tensor is only ever read.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(msg.data, dtype=dtype)
    if _BIG_ENDIAN:  # pragma: no cover
        flat = flat.view(torch.uint8).view(-1, itemsize).flip(1).contiguous().view(dtype).flatten()
    return flat.view(shape)


def encode_routing(routing: Routing) -> pb.Routing:
    return pb.Routing(
        experts=encode_tensor(routing.experts.to(torch.int32)),
        weights=encode_tensor(routing.weights.to(torch.float32)),
    )


def decode_routing(msg: pb.Routing) -> Routing:
    experts = decode_tensor(msg.experts, "routing.experts", allowed=(pb.DTYPE_INT32,), rank=2)
    weights = decode_tensor(msg.weights, "routing.weights", allowed=(pb.DTYPE_FLOAT32,), rank=2)
    return Routing(experts=experts.to(torch.int64), weights=weights.clone())


_MODE_TO_PB = {
    RoutingMode.TOP_K: pb.ROUTING_MODE_TOP_K,
    RoutingMode.TOP_P: pb.ROUTING_MODE_TOP_P,
    RoutingMode.THRESHOLD: pb.ROUTING_MODE_THRESHOLD,
}
_MODE_FROM_PB = {v: k for k, v in _MODE_TO_PB.items()}


def encode_policy(policy: RoutingPolicy | None) -> pb.RoutingOverride | None:
    if policy is None:
        return None
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
