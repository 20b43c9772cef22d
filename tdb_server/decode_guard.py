"""Requests that are not protobuf: bytes that do not decode as the method's request message are answered
INVALID_ARGUMENT (reason BAD_REQUEST), never grpc's own UNKNOWN ("Unexpected DecodeError").

`DecodeGuard` is a server interceptor: it gives each method a request deserializer that hands an
`Undecodable` marker to the handler instead of raising, and a handler that answers the marker with the
status before any servicer code runs. Put it after the authentication interceptor (an unauthenticated
caller learns nothing about its bytes) and before `SyncHandlers` (aio_bridge.py), whose handlers are
all coroutines or async generators by then."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from .aio_bridge import MethodWrapper
from .errors import InvalidArgument


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer hands on for bytes that are not the request message."""
    message: str


def _deserializer(inner: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if inner is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return inner(data)
        except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the bytes are the caller's
            return Undecodable(f"{type(e).__name__}: {e}")
    return deserialize


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext, method: str) -> None:
    err = InvalidArgument(f"the request to {method} is not a valid protobuf message ({request.message})",
                          reason="BAD_REQUEST")
    context.set_trailing_metadata((("tdb-reason", err.reason),))
    await context.abort(grpc.StatusCode[err.code.name], err.message)


def _guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.request_streaming:
        return handler      # no client-streaming RPC of ours (reflection's is grpc's own)
    deserializer = _deserializer(handler.request_deserializer)
    if handler.response_streaming:
        inner = handler.unary_stream
        if inspect.isasyncgenfunction(inner):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await _refuse(request, context, method)
                async for item in inner(request, context):
                    yield item
        else:
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
                if isinstance(request, Undecodable):
                    await _refuse(request, context, method)
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
        return grpc.unary_stream_rpc_method_handler(stream, deserializer, handler.response_serializer)
    inner_unary = handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context, method)
        result = inner_unary(request, context)
        return await result if inspect.isawaitable(result) else result
    return grpc.unary_unary_rpc_method_handler(unary, deserializer, handler.response_serializer)


class DecodeGuard(MethodWrapper):
    """Undecodable request bytes -> INVALID_ARGUMENT (BAD_REQUEST), for every unary-request method."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return _guard(handler, method)
