"""Domain errors → gRPC status, in one interceptor so that servicers stay thin.

| raised                                   | status              |
| ---------------------------------------- | ------------------- |
| InvalidArgument, InvalidRouting, UnknownExpert | INVALID_ARGUMENT |
| Overloaded                               | RESOURCE_EXHAUSTED  |
| NoReplica                                | UNAVAILABLE         |
| DeadlineExceeded, asyncio.TimeoutError   | DEADLINE_EXCEEDED   |
| HostError (an expert host failed)        | the host's status   |
| anything else                            | INTERNAL (logged)   |
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from moemesh.experts.ffn import UnknownExpert
from moemesh.protos.spec import InvalidRouting
from moemesh.protos.wire import RETRY_PUSHBACK_KEY, InvalidArgument
from moemesh.router.dispatch import NoReplica
from moemesh.router.pipeline import DeadlineExceeded

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """Too much work queued or a request too large to take. `retry_after_s`: when capacity is
    likely to be back (None: not worth retrying as is, e.g. a request over a per-request limit)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class HostError(RuntimeError):
    """An expert host answered with an error that retrying elsewhere would not fix."""

    def __init__(self, host: str, code: grpc.StatusCode, details: str):
        super().__init__(f"expert host {host}: {code.name}: {details}")
        self.code = code


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a caller sees for `err`."""
    if isinstance(err, (InvalidArgument, InvalidRouting)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err)
    if isinstance(err, UnknownExpert):
        return grpc.StatusCode.INVALID_ARGUMENT, str(err.args[0]) if err.args else str(err)
    if isinstance(err, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)
    if isinstance(err, NoReplica):
        return grpc.StatusCode.UNAVAILABLE, str(err)
    if isinstance(err, (DeadlineExceeded, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(err) or "deadline exceeded"
    if isinstance(err, HostError):
        code = grpc.StatusCode.INTERNAL if err.code == grpc.StatusCode.INVALID_ARGUMENT else err.code
        return code, str(err)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


# Status messages travel in HTTP/2 trailers, which clients cap (16 KiB by default): a longer one
# would reach the caller as RESOURCE_EXHAUSTED instead of the status it explains.
MAX_MESSAGE_CHARS = 2000


def _capped(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a unary-unary handler into a status with a clear message, and
    parses the request itself: bytes that are not the method's protobuf message are INVALID_ARGUMENT
    (grpc would answer UNKNOWN "Unexpected DecodeError")."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner, parse = handler.unary_unary, handler.request_deserializer

        async def guarded(raw, context: grpc.aio.ServicerContext):
            try:
                try:
                    request = parse(raw) if parse is not None else raw
                except Exception as err:  # protobuf's DecodeError, or anything a parser raises
                    raise InvalidArgument(
                        "request",
                        f"{len(raw)} bytes are not a valid message for {handler_call_details.method} ({err})",
                    ) from None
                return await inner(request, context)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if context.code() is not None and context.code() != grpc.StatusCode.OK:
                    raise  # the handler already aborted with its own status
                code, message = status_of(err)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", handler_call_details.method)
                retry_after = getattr(err, "retry_after_s", None)
                if retry_after is not None:
                    context.set_trailing_metadata(
                        ((RETRY_PUSHBACK_KEY, str(max(1, round(retry_after * 1000)))),)
                    )
                await context.abort(code, _capped(message))

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=None, response_serializer=handler.response_serializer
        )
