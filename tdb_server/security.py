"""Access control: bearer tokens checked on every RPC (streams included), and TLS credentials.

The health service stays open so that load balancers and `grpc_health_probe` work without a token;
everything else (including reflection) needs `authorization: Bearer <token>` when a token is set.
Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _deny(kind_factory: Callable[..., grpc.RpcMethodHandler], message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message, (("tdb-reason", "UNAUTHENTICATED"),))

    return kind_factory(abort)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects any call without the right bearer token with UNAUTHENTICATED (on the asyncio server, before
    the method runs or takes a thread)."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("empty token")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method or ""
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        got = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got = value if isinstance(value, str) else ""   # a binary value is no token
                break
        if hmac.compare_digest(got.encode("utf-8", "surrogateescape"), self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        message = "missing bearer token" if not got else "invalid bearer token"
        if handler.request_streaming and handler.response_streaming:
            return _deny(grpc.stream_stream_rpc_method_handler, message)
        if handler.request_streaming:
            return _deny(grpc.stream_unary_rpc_method_handler, message)
        if handler.response_streaming:
            return _deny(grpc.unary_stream_rpc_method_handler, message)
        return _deny(grpc.unary_unary_rpc_method_handler, message)


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    """TLS credentials from PEM files (certificate chain and private key)."""
    cert = Path(cert_file).read_bytes()
    key = Path(key_file).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])
