"""Typed errors of the SDK. Each keeps the gRPC status code and the server's message; the
original `grpc.RpcError` is the `__cause__`."""

from __future__ import annotations

import grpc

from moemesh.protos.wire import RETRY_PUSHBACK_KEY


class MoeMeshError(Exception):
    """Any failed call to the mesh."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(MoeMeshError):
    """The request was rejected; `details` names the field and what was expected."""


class ResourceExhaustedError(MoeMeshError):
    """Too large or the mesh is overloaded. `retry_after_s`: when the server expects capacity back
    (its `grpc-retry-pushback-ms` hint), or None when retrying the same request will not help."""

    retry_after_s: float | None = None


class UnavailableError(MoeMeshError):
    """The router, or every replica of a needed expert, is unreachable."""


class DeadlineExceededError(MoeMeshError):
    """The call did not finish within its timeout."""


class ClientClosedError(MoeMeshError):
    """A call on a client (or a `RemoteMoE` / offloaded model) whose connection was closed."""

    def __init__(self, address: str):
        super().__init__(grpc.StatusCode.CANCELLED, f"the client of the router at {address} is closed")


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(err: grpc.RpcError) -> MoeMeshError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    typed = _BY_CODE.get(code, MoeMeshError)(code, details or "")
    if isinstance(typed, ResourceExhaustedError):
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for key, value in trailing or ():
            if key == RETRY_PUSHBACK_KEY and str(value).isdigit():
                typed.retry_after_s = int(value) / 1000
    return typed
