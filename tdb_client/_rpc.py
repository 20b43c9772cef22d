"""The one wrapper around generated gRPC stubs: every call raises TdbError instead of grpc.RpcError."""

from __future__ import annotations

from typing import Any, Callable

import grpc

from .errors import TdbError


class _Stub:
    """Wraps the generated stub so every call raises TdbError instead of grpc.RpcError."""

    def __init__(self, channel: grpc.Channel, timeout: float | None, stub: Callable[[grpc.Channel], Any],
                 metadata: tuple[tuple[str, str], ...] = ()):
        self._stub = stub(channel) if channel is not None else None
        self._timeout = timeout
        self._metadata = metadata

    def with_metadata(self, *metadata: tuple[str, str]) -> "_Stub":
        """The same stub, sending `metadata` with every call too (a session's secret)."""
        other = _Stub(None, self._timeout, lambda _: None, self._metadata + metadata)
        other._stub = self._stub
        return other

    def __call__(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self._timeout,
                                               metadata=self._metadata or None)
        except grpc.RpcError as e:
            raise TdbError.from_rpc(e) from None

    def stream(self, method: str, request: Any, timeout: float | None = None) -> "_Stream":
        return _Stream(getattr(self._stub, method)(request, timeout=timeout, metadata=self._metadata or None))


class _Stream:
    """A server stream as an iterator that raises TdbError; `close()` cancels it from any thread."""

    def __init__(self, call: Any):
        self._call = call
        self._closed = False

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self._closed:
                raise StopIteration from None      # we cancelled it: a normal end
            raise TdbError.from_rpc(e) from None

    def close(self) -> None:
        self._closed = True
        self._call.cancel()
