"""Requests refused before they are decoded: bytes that do not decode as the method's request message are
answered INVALID_ARGUMENT (reason BAD_REQUEST), never grpc's own UNKNOWN ("Unexpected DecodeError"); a
request larger than the server's --max-request-mib (all but Patch and ReplayRecording, which carry
tensors and recordings up to the message limit) is RESOURCE_EXHAUSTED (REQUEST_TOO_LARGE) before
protobuf parses it, which would take several times its size in memory.

`DecodeGuard` is a server interceptor: it gives each method a request deserializer that hands a `Refused`
marker to the handler instead of raising (or parsing), and a handler that answers the marker with its
status before any servicer code runs. Put it after the authentication interceptor (an unauthenticated
caller learns nothing about its bytes) and before `SyncHandlers` (aio_bridge.py), whose handlers are
all coroutines or async generators by then."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc

from .aio_bridge import MethodWrapper
from .errors import InvalidArgument, ResourceExhausted, TdbServerError


# the methods whose requests may be as large as the message limit: a patch's tensor, a recording
LARGE_REQUESTS = frozenset({"/tdb.v1.Debugger/Patch", "/tdb.v1.Debugger/ReplayRecording"})


@dataclass(frozen=True)
class Refused:
    """What the deserializer hands on instead of a request it would not (or could not) decode."""
    error: TdbServerError


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _deserializer(inner: Callable[[bytes], Any] | None, method: str,
                  max_bytes: int | None) -> Callable[[bytes], Any] | None:
    if inner is None:
        return None

    def deserialize(data: bytes) -> Any:
        if max_bytes is not None and len(data) > max_bytes:
            return Refused(ResourceExhausted(
                f"the request to {method} is {_mib(len(data))}; this server takes at most {_mib(max_bytes)} in one "
                "such request (tdb serve --max-request-mib; only Patch and ReplayRecording may be larger)",
                reason="REQUEST_TOO_LARGE"))
        try:
            return inner(data)
        except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the bytes are the caller's
            return Refused(InvalidArgument(f"the request to {method} is not a valid protobuf message "
                                           f"({type(e).__name__}: {e})", reason="BAD_REQUEST"))
    return deserialize


async def _refuse(request: Refused, context: grpc.aio.ServicerContext) -> None:
    err = request.error
    context.set_trailing_metadata((("tdb-reason", err.reason),))
    await context.abort(grpc.StatusCode[err.code.name], err.message)


def _guard(handler: grpc.RpcMethodHandler, method: str, max_bytes: int | None) -> grpc.RpcMethodHandler:
    if handler.request_streaming:
        return handler      # no client-streaming RPC of ours (reflection's is grpc's own)
    deserializer = _deserializer(handler.request_deserializer, method, max_bytes)
    if handler.response_streaming:
        inner = handler.unary_stream
        if inspect.isasyncgenfunction(inner):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Refused):
                    await _refuse(request, context)
                async for item in inner(request, context):
                    yield item
        else:
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
                if isinstance(request, Refused):
                    await _refuse(request, context)
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
        return grpc.unary_stream_rpc_method_handler(stream, deserializer, handler.response_serializer)
    inner_unary = handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Refused):
            await _refuse(request, context)
        result = inner_unary(request, context)
        return await result if inspect.isawaitable(result) else result
    return grpc.unary_unary_rpc_method_handler(unary, deserializer, handler.response_serializer)


class DecodeGuard(MethodWrapper):
    """Undecodable request bytes -> INVALID_ARGUMENT (BAD_REQUEST), and requests over `max_request_bytes`
    (but for LARGE_REQUESTS) -> RESOURCE_EXHAUSTED (REQUEST_TOO_LARGE), for every unary-request method."""

    def __init__(self, max_request_bytes: int | None = None):
        super().__init__()
        self._max = max_request_bytes

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return _guard(handler, method, None if method in LARGE_REQUESTS else self._max)
