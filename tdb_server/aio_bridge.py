"""Plain (blocking) servicer methods on the asyncio gRPC server.

The server runs on `grpc.aio` so that an open event stream or long poll is a coroutine waiting on the
session's event log, not a thread (servicer.py: Events, PollEvents). Every other RPC stays a plain
method that may block — on the device scheduler, on a run reaching its next stop — and runs in a thread
pool. `SyncHandlers`, the innermost server interceptor, hands those methods to the pool itself, with a
`ThreadContext` that keeps the sync API they are written against:

- `is_active()` turns False and the `add_callback` callbacks run as soon as the call ends, the client's
  leaving included (grpc's own sync shim for aio runs callbacks only after a handler returns and has no
  `is_active`, so a sweep would never learn that its client left);
- `abort(code, details)` raises `Abort`, which the coroutine turns into the call's status on the loop
  (no thread waits for the loop to send it);
- a server stream is pulled one item at a time in the pool, so a slow client holds no thread between
  items; a stream the client leaves is closed in the pool once its current item is done.

`abort_async` gives async servicer methods the same single error conversion (servicer._convert).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import grpc


class Abort(Exception):
    """Raised by `ThreadContext.abort`: the status the call ends with (trailing metadata is already set)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class StatusContext:
    """The part of a sync ServicerContext that ends a call: trailing metadata goes to the real (aio) context,
    `abort` raises `Abort` for the coroutine to send."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(tuple(metadata))

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Abort(code, details)


class ThreadContext(StatusContext):
    """A sync ServicerContext for a handler running in a pool thread, over the call's aio context."""

    def __init__(self, context: grpc.aio.ServicerContext):
        super().__init__(context)
        self._lock = threading.Lock()
        self._ended = False
        self._callbacks: list[Callable[[], None]] = []
        # runs when the call's task ends, cancelled or not; a weak reference, since grpc keeps the callback in
        # the call's state and a strong one would make a reference cycle of every call
        me = weakref.ref(self)
        context.add_done_callback(lambda _ctx: _end(me()))

    def is_active(self) -> bool:
        return not self._ended

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the call ends (at once if it has); True, as grpc's sync server answers."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return True
        callback()
        return True

    def end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def peer(self) -> str:
        return self._context.peer()

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def auth_context(self) -> Any:
        return self._context.auth_context()


def _end(ctx: ThreadContext | None) -> None:
    if ctx is not None:
        ctx.end()


async def abort_async(context: grpc.aio.ServicerContext, error: Exception,
                      convert: Callable[[Any, BaseException], None]) -> None:
    """End an async method's call with the status `convert` (the servicers' one conversion) gives `error`."""
    try:
        convert(StatusContext(context), error)
    except Abort as a:
        await context.abort(a.code, a.details)
    raise error   # convert always aborts; if it ever does not, grpc reports the error itself


_END = object()


def _close_later(future: concurrent.futures.Future, items: Iterator[Any], pool: concurrent.futures.Executor) -> None:
    """Close a stream's generator in the pool once the item being computed (if any) is done."""
    def close(_: Any = None) -> None:
        try:
            pool.submit(items.close)
        except RuntimeError:   # the pool is shut down: close here
            items.close()

    if future is None:
        close()
    else:
        future.add_done_callback(close)


def _unary(fn: Callable[[Any, Any], Any], pool: concurrent.futures.Executor) -> Callable[[Any, Any], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        ctx = ThreadContext(context)
        try:
            return await asyncio.wrap_future(pool.submit(fn, request, ctx))
        except Abort as a:
            status = (a.code, a.details)
        finally:
            ctx.end()
        del ctx         # grpc keeps the abort's traceback (this frame) in the call's state: hold nothing of ours
        await context.abort(*status)    # outside the handler: the Abort (and the error under it) are freed now
    return call


def _stream(fn: Callable[[Any, Any], Iterator[Any]],
            pool: concurrent.futures.Executor) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        ctx = ThreadContext(context)
        items: Iterator[Any] | None = None
        future: concurrent.futures.Future | None = None
        status: tuple[grpc.StatusCode, str] | None = None
        try:
            if inspect.isgeneratorfunction(fn):
                items = fn(request, ctx)        # runs nothing until the first next()
            else:
                future = pool.submit(lambda: iter(fn(request, ctx)))
                items = await asyncio.wrap_future(future)
            while True:
                future = pool.submit(next, items, _END)
                item = await asyncio.wrap_future(future)
                if item is _END:
                    future = None
                    return
                yield item
        except Abort as a:
            status = (a.code, a.details)
        finally:
            ctx.end()
            if items is not None:
                _close_later(future if future is not None and not future.done() else None, items, pool)
        if status is not None:      # as in _unary: abort holding nothing of ours, the Abort freed
            ctx = items = future = None
            await context.abort(*status)
    return call


class MethodWrapper(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once: `wrap(handler, method)` builds the wrapped
    handler the first time a method is called (again only if grpc hands over a new handler for it)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}   # by method name

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method or ""
        seen = self._wrapped.get(method)
        if seen is None or seen[0] is not handler:
            seen = (handler, self.wrap(handler, method))
            self._wrapped[method] = seen
        return seen[1]


class SyncHandlers(MethodWrapper):
    """Runs plain unary and server-streaming methods in `pool` with a `ThreadContext`; async methods (and
    the health and reflection services, which are async) pass through. The methods named in `reserved`
    ("/package.Service/Method") run in their own pool instead, so that however many calls wait in `pool`
    (for the device, for a run to stop) those still answer. Put it last among the interceptors."""

    def __init__(self, pool: concurrent.futures.Executor,
                 reserved: dict[str, concurrent.futures.Executor] | None = None):
        super().__init__()
        self._pool = pool
        self._reserved = reserved or {}

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        pool = self._reserved.get(method, self._pool)
        if handler.request_streaming:
            return handler          # no client-streaming RPC in tdb; grpc's own migration pool runs one
        if handler.response_streaming:
            fn = handler.unary_stream
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                return handler
            return grpc.unary_stream_rpc_method_handler(_stream(fn, pool), handler.request_deserializer,
                                                        handler.response_serializer)
        fn = handler.unary_unary
        if inspect.iscoroutinefunction(fn):
            return handler
        return grpc.unary_unary_rpc_method_handler(_unary(fn, pool), handler.request_deserializer,
                                                   handler.response_serializer)
