"""Fuzzed requests against the router and an expert host of a real mesh and the OTLP trace receiver,
over gRPC on 127.0.0.1 port 0.

Mutated valid requests (bits flipped, cut short, extended, bytes inserted, overwritten or repeated,
fields set to edge values: 2**63 - 1, -1, NaN, unknown enum values...) and random bytes go as raw
bytes (no serializer) to every unary method: Forward, Route, Dispatch, GetTopology, Compute, Info,
Export and each server's health Check. Every answer must be a status the caller can act on, never
UNKNOWN or INTERNAL; unmutated requests sent among them succeed; afterwards a Forward is exact
against the plain reference and the receiver still stores spans.

Seeded: a failure lists the method and the request bytes, and the same SEED replays the run.
"""

from __future__ import annotations

import collections
import contextlib
import math
import random
import time
from collections.abc import Callable

import grpc
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from moemesh.deploy.local import EmbeddedMesh, MeshConfig
from moemesh.deploy.traces.receiver import TRACE_SERVICE, ReceiverThread
from moemesh.experts.weights import open_source, preset_config
from moemesh.protos import moemesh_pb2 as pb
from moemesh.protos import wire
from moemesh.protos.spec import Routing, Segment
from tests.references import assert_matches_reference

pytestmark = pytest.mark.integration

SEED = 20_261_201
REQUESTS = 3000  # the suite's share; `SEED`/`REQUESTS` can be raised by hand for a longer hunt
IN_FLIGHT = 16  # calls outstanding at once: mutated and valid requests meet in the router's batches
VALID_EVERY = 25  # every 25th request is sent unmutated and must succeed
MODEL = "tiny-mixtral"  # 8 experts, top-2, hidden 64
H = 64
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

ROUTER, EXPERT, TRACES = "/moemesh.v1.Router/", "/moemesh.v1.Expert/", f"/{TRACE_SERVICE}/"
HEALTH = "/grpc.health.v1.Health/Check"

# Edge values a field mutation sets (out-of-range ones are skipped for narrower fields).
INTS = (0, 1, -1, 2, 7, 8, 9, 64, 65, 4096, 8193, 2**31 - 1, 2**31, 2**32 - 1, -(2**31), 2**63 - 1, -(2**63))
FLOATS = (0.0, -0.0, 0.5, 1.0, -1.0, 2.0, 1e-45, 3.4e38, math.nan, math.inf, -math.inf)
STRINGS = ("", "x" * 300, "é", "moemesh.v1.Router", "../../x")
ENUMS = (0, 1, 2, 3, 4, 5, 99, -1)
MESSAGES = {
    ROUTER + "Forward": pb.ForwardRequest,
    ROUTER + "Route": pb.RouteRequest,
    ROUTER + "Dispatch": pb.DispatchRequest,
    EXPERT + "Compute": pb.ComputeRequest,
    TRACES + "Export": trace_service_pb2.ExportTraceServiceRequest,
    HEALTH: health_pb2.HealthCheckRequest,
}


def _valid_requests(experts: list[pb.ExpertRef]) -> dict[str, list[bytes]]:
    """Serialized valid requests of every method, the seeds that are mutated (target: methods)."""
    g = torch.Generator().manual_seed(SEED)

    def hidden(tokens: int) -> torch.Tensor:
        return torch.randn(tokens, H, generator=g)

    held = experts[0]
    span = trace_pb2.Span(
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        name="moemesh.v1.Router/Forward",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=1,
        end_time_unix_nano=2,
        attributes=[common_pb2.KeyValue(key="moemesh.layer", value=common_pb2.AnyValue(int_value=0))],
        events=[trace_pb2.Span.Event(name="retry", time_unix_nano=2)],
    )
    export = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=[span])])]
    )
    requests: dict[str, list[Message | bytes]] = {
        ROUTER + "Forward": [
            pb.ForwardRequest(layer=0, hidden=wire.encode_tensor(hidden(8)), return_routing=True),
            pb.ForwardRequest(
                layer=1,
                hidden=wire.encode_tensor(hidden(3).bfloat16()),
                routing=pb.RoutingOverride(mode=pb.ROUTING_MODE_TOP_P, top_p=0.5, max_k=3),
            ),
        ],
        ROUTER + "Route": [
            pb.RouteRequest(
                layer=0, hidden=wire.encode_tensor(hidden(4)), routing=pb.RoutingOverride(top_k=3)
            ),
            pb.RouteRequest(layer=1, hidden=wire.encode_tensor(hidden(2).half())),
        ],
        ROUTER + "Dispatch": [
            wire.encode_dispatch(
                0,
                hidden(4),
                Routing(torch.tensor([[0, 1], [2, -1], [7, 7], [3, 4]]), torch.rand(4, 2, generator=g)),
            ),
            wire.encode_dispatch(  # K = 0: every token gets zeros
                1, hidden(3).bfloat16(), Routing(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0))
            ),
        ],
        ROUTER + "GetTopology": [b""],
        EXPERT + "Compute": [
            wire.compute_request_bytes(
                [Segment(held.layer, held.expert, 0, 3), Segment(held.layer, held.expert, 4, 1)], hidden(5)
            ),
            wire.compute_request_bytes([Segment(held.layer, held.expert, 0, 2)], hidden(2).half()),
        ],
        EXPERT + "Info": [b""],
        TRACES + "Export": [export],
        HEALTH: [health_pb2.HealthCheckRequest(service="")],
    }
    return {
        m: [r if isinstance(r, bytes) else r.SerializeToString() for r in reqs]
        for m, reqs in requests.items()
    }


class Mutator:
    """Seeded mutations of serialized requests: on the bytes, or on the fields of the parsed message."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self, data: bytes, message: type[Message] | None) -> bytes:
        if message is not None and self.rng.random() < 0.35:
            return self.fields(data, message)
        return self.bytes(data)

    def bytes(self, data: bytes) -> bytes:
        rng, out = self.rng, bytearray(data)
        kind = rng.randrange(7)
        if kind == 0 or not out:  # random bytes
            return rng.randbytes(rng.randrange(80))
        if kind == 1:  # flip bits
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif kind == 2:  # cut short
            del out[rng.randrange(len(out)) :]
        elif kind == 3:  # extend
            out += rng.randbytes(rng.randint(1, 32))
        elif kind == 4:  # insert
            at = rng.randrange(len(out))
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == 5:  # overwrite
            for _ in range(rng.randint(1, 4)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        else:  # repeat a slice in place
            start = rng.randrange(len(out))
            end = rng.randrange(start, len(out) + 1)
            out[start:start] = out[start:end]
        return bytes(out)

    def fields(self, data: bytes, message: type[Message]) -> bytes:
        msg = message.FromString(data)
        scalars = list(_scalar_fields(msg))
        for _ in range(self.rng.randint(1, 3)):
            if scalars:
                owner, field = self.rng.choice(scalars)
                self._set(owner, field)
        return msg.SerializeToString()

    def _set(self, owner: Message, field: FieldDescriptor) -> None:
        rng = self.rng
        if field.is_repeated:  # shapes: change, add or drop a dimension
            values = getattr(owner, field.name)
            op = rng.randrange(3)
            if op == 0 and len(values):
                del values[rng.randrange(len(values))]
            elif field.cpp_type in _INT_TYPES:
                _try(lambda: values.append(rng.choice(INTS)))
            return
        value = {
            FieldDescriptor.CPPTYPE_FLOAT: lambda: rng.choice(FLOATS),
            FieldDescriptor.CPPTYPE_DOUBLE: lambda: rng.choice(FLOATS),
            FieldDescriptor.CPPTYPE_BOOL: lambda: not getattr(owner, field.name),
            FieldDescriptor.CPPTYPE_STRING: lambda: (
                _cut(rng, getattr(owner, field.name))
                if field.type == field.TYPE_BYTES
                else rng.choice(STRINGS)
            ),
            FieldDescriptor.CPPTYPE_ENUM: lambda: rng.choice(ENUMS),
        }.get(field.cpp_type, lambda: rng.choice(INTS))()
        _try(lambda: setattr(owner, field.name, value))


_INT_TYPES = {
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32,
    FieldDescriptor.CPPTYPE_UINT64,
}


def _cut(rng: random.Random, data: bytes) -> bytes:
    """Bytes cut short, extended or emptied (tensor data, trace ids)."""
    op = rng.randrange(3)
    return (
        data[: rng.randrange(len(data) + 1)]
        if op == 0
        else data + rng.randbytes(rng.randint(1, 16))
        if op == 1
        else b""
    )


def _try(change: Callable[[], None]) -> None:
    with contextlib.suppress(ValueError, TypeError):  # a value out of the field's range: skipped
        change()


def _scalar_fields(msg: Message):
    """(message, field) for every non-message field of `msg` and of the messages in it."""
    for field in msg.DESCRIPTOR.fields:
        if field.cpp_type != FieldDescriptor.CPPTYPE_MESSAGE:
            yield msg, field
        elif field.is_repeated:
            for sub in getattr(msg, field.name):
                yield from _scalar_fields(sub)
        elif msg.HasField(field.name):
            yield from _scalar_fields(getattr(msg, field.name))


@pytest.fixture(scope="module")
def servers():
    with EmbeddedMesh(MeshConfig(MODEL, num_hosts=2, device="cpu")) as mesh, ReceiverThread() as rx:
        channels = {
            ROUTER: grpc.insecure_channel(mesh.address),
            EXPERT: grpc.insecure_channel(mesh.hosts[0].address),
            TRACES: grpc.insecure_channel(f"127.0.0.1:{rx.port}"),
        }
        try:
            yield mesh, rx, channels
        finally:
            for channel in channels.values():
                channel.close()


def _targets(channels: dict[str, grpc.Channel]) -> list[tuple[str, grpc.Channel | None]]:
    """(method, channel) for every unary method fuzzed; health Check (None) on any of the servers."""
    return [
        *((ROUTER + m, channels[ROUTER]) for m in ("Forward", "Route", "Dispatch", "GetTopology")),
        *((EXPERT + m, channels[EXPERT]) for m in ("Compute", "Info")),
        (TRACES + "Export", channels[TRACES]),
        (HEALTH, None),
    ]


def test_fuzzed_requests_get_clean_statuses_and_the_servers_stay_exact(servers):
    mesh, rx, channels = servers
    info = pb.InfoResponse.FromString(channels[EXPERT].unary_unary(EXPERT + "Info")(b"", timeout=10))
    valid = _valid_requests(list(info.experts))
    every_valid = [r for reqs in valid.values() for r in reqs]
    targets = _targets(channels)
    mutate = Mutator(SEED)
    rng = mutate.rng

    codes: collections.Counter[tuple[str, str]] = collections.Counter()
    bad: list[str] = []
    pending: list[tuple[str, bytes, bool, grpc.Future]] = []

    def settle() -> None:
        for method, data, unmutated, call in pending:
            try:
                call.result()
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as err:
                code, details = err.code(), err.details()
            codes[(method.rsplit("/", 1)[1], code.name)] += 1
            if code in NEVER or (unmutated and code != grpc.StatusCode.OK):
                bad.append(f"{method} {code.name} {details[:200]!r} <- {data[:120]!r} ({len(data)} bytes)")
        pending.clear()

    started = time.perf_counter()
    for i in range(REQUESTS):
        method, channel = rng.choice(targets)
        channel = channel or rng.choice(list(channels.values()))
        unmutated = i % VALID_EVERY == 0
        if unmutated:
            data = rng.choice(valid[method])
        elif rng.random() < 0.8:  # this method's own request, mutated
            data = mutate(rng.choice(valid[method]), MESSAGES.get(method))
        else:  # another method's request: still bytes it must refuse cleanly
            data = mutate.bytes(rng.choice(every_valid))
        pending.append((method, data, unmutated, channel.unary_unary(method).future(data, timeout=30)))
        if len(pending) >= IN_FLIGHT:
            settle()
    settle()
    elapsed = time.perf_counter() - started

    histogram = ", ".join(f"{m} {c}: {n}" for (m, c), n in sorted(codes.items()))
    print(f"\n{REQUESTS} fuzzed requests in {elapsed:.1f} s (seed {SEED}): {histogram}")
    assert sum(codes.values()) == REQUESTS
    assert not bad, f"{len(bad)} requests ended badly:\n" + "\n".join(bad[:10])
    by_code = collections.Counter(code for (_, code), n in codes.items() for _ in range(n))
    assert by_code["INVALID_ARGUMENT"] > REQUESTS / 4 and by_code["OK"] > REQUESTS / 10  # both sides hit

    # Afterwards: exact results from the mesh, and the receiver still keeps what it is sent.
    hidden = torch.randn(16, H, generator=torch.Generator().manual_seed(SEED + 1))
    request = pb.ForwardRequest(layer=1, hidden=wire.encode_tensor(hidden), return_routing=True)
    reply = pb.ForwardResponse.FromString(
        channels[ROUTER].unary_unary(ROUTER + "Forward")(request.SerializeToString(), timeout=30)
    )
    out = wire.decode_tensor(reply.hidden, "hidden", rank=2)
    assert_matches_reference(
        open_source(MODEL), preset_config(MODEL), 1, hidden, out, wire.decode_routing(reply.routing)
    )
    channels[TRACES].unary_unary(TRACES + "Export")(valid[TRACES + "Export"][0], timeout=10)
    assert rx.store.wait_for(bytes(range(16)).hex(), count=1, timeout=10)
