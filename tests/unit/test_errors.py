"""Errors on both ends: domain error -> gRPC status (services/errors.py), status -> typed SDK error
(client/errors.py)."""

from __future__ import annotations

import grpc
import pytest

from moemesh.client import errors as client_errors
from moemesh.experts.ffn import UnknownExpert
from moemesh.protos import wire
from moemesh.protos.spec import InvalidRouting
from moemesh.protos.wire import InvalidArgument
from moemesh.router.dispatch import NoReplica
from moemesh.router.pipeline import DeadlineExceeded, HostUnavailable
from moemesh.services.errors import HostError, Overloaded, status_of

Code = grpc.StatusCode


@pytest.mark.parametrize(
    "err, code, message",
    [
        (InvalidArgument("hidden.shape", "expected 2 dimensions"), Code.INVALID_ARGUMENT,
         "hidden.shape: expected 2 dimensions"),
        (InvalidRouting("routing.top_k", "must be in 1..8"), Code.INVALID_ARGUMENT, "routing.top_k: must be in 1..8"),
        # KeyError would quote its message; the caller sees it plain
        (UnknownExpert("layer 0 expert 9 is not held by this host"), Code.INVALID_ARGUMENT,
         "layer 0 expert 9 is not held by this host"),
        (Overloaded("queue full: 64 requests waiting"), Code.RESOURCE_EXHAUSTED, "queue full: 64 requests waiting"),
        (NoReplica(0, 3, tried=["h1", "h0"]), Code.UNAVAILABLE, "no live replica for layer 0 expert 3; tried h0, h1"),
        (DeadlineExceeded("expert host h0 did not answer in time"), Code.DEADLINE_EXCEEDED,
         "expert host h0 did not answer in time"),
        (DeadlineExceeded(), Code.DEADLINE_EXCEEDED, "deadline exceeded"),
        (TimeoutError(), Code.DEADLINE_EXCEEDED, "deadline exceeded"),
        (HostError("h0", Code.RESOURCE_EXHAUSTED, "out of memory"), Code.RESOURCE_EXHAUSTED,
         "expert host h0: RESOURCE_EXHAUSTED: out of memory"),
        # a host refusing what the router sent is the router's fault, not the caller's
        (HostError("h0", Code.INVALID_ARGUMENT, "rows: bad shape"), Code.INTERNAL,
         "expert host h0: INVALID_ARGUMENT: rows: bad shape"),
        (HostError("h1", Code.NOT_FOUND, ""), Code.NOT_FOUND, "expert host h1: NOT_FOUND: "),
        (RuntimeError("boom"), Code.INTERNAL, "internal error: RuntimeError: boom"),
        (KeyError("x"), Code.INTERNAL, "internal error: KeyError: 'x'"),
        (ValueError("bad"), Code.INTERNAL, "internal error: ValueError: bad"),
        (HostUnavailable("h2", "down"), Code.INTERNAL, "internal error: HostUnavailable: expert host h2 unavailable: down"),
    ],
)  # fmt: skip
def test_status_of_every_domain_error(err, code, message):
    assert status_of(err) == (code, message)


def test_unknown_expert_without_message():
    assert status_of(UnknownExpert()) == (Code.INVALID_ARGUMENT, "")


class _RpcError(grpc.RpcError):
    """What a failed call raises: a grpc.RpcError that is also a grpc.Call."""

    def __init__(self, code: grpc.StatusCode, details: str | None):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


@pytest.mark.parametrize(
    "code, kind",
    [
        (Code.INVALID_ARGUMENT, client_errors.InvalidArgumentError),
        (Code.RESOURCE_EXHAUSTED, client_errors.ResourceExhaustedError),
        (Code.UNAVAILABLE, client_errors.UnavailableError),
        (Code.DEADLINE_EXCEEDED, client_errors.DeadlineExceededError),
        (Code.INTERNAL, client_errors.MoeMeshError),
        (Code.NOT_FOUND, client_errors.MoeMeshError),
        (Code.CANCELLED, client_errors.MoeMeshError),
    ],
)
def test_from_rpc_error_maps_each_status_to_its_typed_error(code, kind):
    err = client_errors.from_rpc_error(_RpcError(code, "hidden.shape: expected 2 dimensions"))
    assert type(err) is kind and isinstance(err, client_errors.MoeMeshError)
    assert err.code == code and err.details == "hidden.shape: expected 2 dimensions"
    assert str(err) == f"{code.name}: hidden.shape: expected 2 dimensions"


def test_resource_exhausted_carries_the_servers_retry_hint():
    class Refused(_RpcError):
        def trailing_metadata(self):
            return ((wire.RETRY_PUSHBACK_KEY, "250"), ("other", "x"))

    err = client_errors.from_rpc_error(Refused(Code.RESOURCE_EXHAUSTED, "router: at capacity"))
    assert isinstance(err, client_errors.ResourceExhaustedError) and err.retry_after_s == 0.25
    assert client_errors.from_rpc_error(_RpcError(Code.RESOURCE_EXHAUSTED, "too big")).retry_after_s is None


def test_from_rpc_error_without_details_or_code():
    assert client_errors.from_rpc_error(_RpcError(Code.UNAVAILABLE, None)).details == ""
    bare = client_errors.from_rpc_error(grpc.RpcError("no status"))
    assert type(bare) is client_errors.MoeMeshError
    assert (bare.code, bare.details) == (Code.UNKNOWN, "no status")


def test_server_status_reaches_the_caller_as_the_matching_typed_error():
    # both ends together: what status_of sends is what from_rpc_error turns back into
    for err, kind in [
        (InvalidArgument("layer", "unknown MoE layer 9"), client_errors.InvalidArgumentError),
        (Overloaded("busy"), client_errors.ResourceExhaustedError),
        (NoReplica(1, 2), client_errors.UnavailableError),
        (TimeoutError(), client_errors.DeadlineExceededError),
    ]:
        code, message = status_of(err)
        typed = client_errors.from_rpc_error(_RpcError(code, message))
        assert isinstance(typed, kind) and typed.details == message


def test_long_status_messages_are_capped():
    from moemesh.services.errors import MAX_MESSAGE_CHARS, _capped

    assert _capped("short") == "short"
    long = "x" * (MAX_MESSAGE_CHARS + 500)
    capped = _capped(long)
    assert len(capped) < MAX_MESSAGE_CHARS + 40 and capped.endswith("(500 more characters)")
