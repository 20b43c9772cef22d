"""The Debugger gRPC servicer: one method per RPC, translating protos <-> engine calls (through
serde.py, where every conversion lives), nothing else.

`_rpc` is the one place that turns errors into gRPC statuses: a TdbServerError keeps its code and
reason (sent as `tdb-reason` trailing metadata); anything unexpected becomes INTERNAL, logged with
its traceback. No handler can take the server down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import grpc
import torch

from tdb.v1 import common_pb2, debugger_pb2 as pb, debugger_pb2_grpc

from google.protobuf import json_format

from . import PROTOCOL_VERSION, __version__, bounds, recording, serde, shm, wire
from .aio_bridge import abort_async
from .engine import reads
from .engine.events import Event, Invalidated
from .engine.manager import SessionManager
from .engine.session import DEFAULT_WAIT_S, Session
from .engine.types import RunStatus
from .errors import InvalidArgument, ResourceExhausted, TdbServerError, is_allocation_failure
from .model.tokens import tokenize

log = logging.getLogger("tdb.server")


def _abort(context: grpc.ServicerContext, err: TdbServerError) -> None:
    md = [("tdb-reason", err.reason)]
    if err.suggestions:
        md.append(("tdb-suggestions", ",".join(err.suggestions)))
    context.set_trailing_metadata(md)
    context.abort(grpc.StatusCode[err.code.name], err.message)


def _convert(context: grpc.ServicerContext, e: BaseException) -> None:
    if isinstance(e, TdbServerError):
        _abort(context, e)
    if isinstance(e, torch.OutOfMemoryError):
        _abort(context, ResourceExhausted(f"out of memory on the model's device: {e}", reason="OUT_OF_MEMORY"))
    if is_allocation_failure(e):
        _abort(context, ResourceExhausted(f"out of host memory for this request: {type(e).__name__}: {e}",
                                          reason="OUT_OF_MEMORY"))
    log.exception("internal error in a tdb handler")
    context.set_trailing_metadata([("tdb-reason", "INTERNAL")])
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


def _rpc(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - the one conversion point
            _convert(context, e)
    return unary


def _rpc_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    @functools.wraps(fn)
    def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as e:  # noqa: BLE001
            _convert(context, e)
    return stream


def _rpc_async(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`_rpc` for a coroutine method (it runs on the server's event loop, holding no thread)."""
    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except Exception as e:  # noqa: BLE001
            await abort_async(context, e, _convert)
    return unary


def _rpc_async_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(fn)
    async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as e:  # noqa: BLE001
            await abort_async(context, e, _convert)
    return stream


def _wait_s(ms: int, context: Any) -> float:
    """How long to wait for a run or an event: as asked (or the default), but answered before the
    client's deadline, with whatever state there is (a RUNNING status, no events) rather than a
    DEADLINE_EXCEEDED and a worker thread kept waiting for nobody."""
    wait = ms / 1000.0 if ms > 0 else DEFAULT_WAIT_S
    left = context.time_remaining()
    return wait if left is None else min(wait, max(0.0, left - 0.05))


def _recorded(session: Session, rpc: str, request: Any, status: RunStatus) -> pb.RunStatus:
    msg = serde.status_to_proto(status)
    recording.record(session, rpc, request, recording.outcome(msg))
    return msg


class _StreamSlots:
    """Admission for calls that wait (event streams, long polls): at most `limits.max_streams` at once.
    They wait on the event loop and hold no thread, but each costs memory and a connection's stream; past
    the ceiling, a prompt RESOURCE_EXHAUSTED, never a hang."""

    def __init__(self, n: int):
        self.n = n
        self._free = threading.BoundedSemaphore(n)

    @contextlib.contextmanager
    def held(self, what: str) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            raise ResourceExhausted(f"the server holds {self.n} event streams and long polls already; close one, or "
                                    f"poll without waiting (tdb serve --max-streams raises the ceiling): {what}",
                                    reason="TOO_MANY_STREAMS")
        try:
            yield
        finally:
            self._free.release()


READ_BATCH_BYTES = 4 << 20                                     # chunk data one hand-off of `_batched` carries
_READ_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="tdb-read")


def _take(chunks: Iterator[Any], limit: int) -> list[Any]:
    """The next messages of a stream, up to `limit` bytes (at least one; [] at its end)."""
    out: list[Any] = []
    size = 0
    for msg in chunks:
        out.append(msg)
        size += msg.ByteSize()
        if size >= limit:
            break
    return out


async def _batched(make: Callable[[Callable[[], bool]], Iterator[Any]]) -> AsyncIterator[Any]:
    """A blocking stream of messages (`make(is_active)`) sent from the event loop: its messages computed in
    `_READ_POOL`, READ_BATCH_BYTES at a time (so at most that much waits in memory). When the client leaves,
    `is_active` turns False and the stream is closed in the pool once the batch being computed is done."""
    stopped = threading.Event()
    chunks = make(lambda: not stopped.is_set())
    future: concurrent.futures.Future | None = None
    try:
        while True:
            future = _READ_POOL.submit(_take, chunks, READ_BATCH_BYTES)
            batch = await asyncio.wrap_future(future)
            future = None
            if not batch:
                return
            for msg in batch:
                yield msg
    finally:
        stopped.set()
        if future is not None:
            future.add_done_callback(lambda _: chunks.close())     # runs at once if it is done already
        else:
            chunks.close()


SESSION_SECRET = "tdb-session-secret"     # the metadata key of CreateSessionResponse.session_secret


def client_of(peer: str) -> str:
    """Who a session counts against in the per-client quota: a remote client's address (without its port);
    on this host, where every process of every local user connects from the same address, the connection."""
    return peer if shm.local_peer(peer) else peer.rsplit(":", 1)[0]


def _secret(context: Any) -> str:
    """The session secret the caller sent (metadata), or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_SECRET:
            return value
    return ""


class DebuggerServicer(debugger_pb2_grpc.DebuggerServicer):
    def __init__(self, adapter: Any, sessions: SessionManager):
        self.adapter = adapter
        self.sessions = sessions
        self.stream_slots = _StreamSlots(sessions.limits.max_streams)

    # -- handshake -------------------------------------------------------------------------------

    @_rpc
    def Initialize(self, request: pb.InitializeRequest, context: grpc.ServicerContext) -> pb.InitializeResponse:
        major = PROTOCOL_VERSION.split(".")[0]
        if request.protocol_version and request.protocol_version.split(".")[0] != major:
            raise InvalidArgument(f"client speaks protocol {request.protocol_version}; this server speaks "
                                  f"{PROTOCOL_VERSION}", reason="PROTOCOL_MISMATCH")
        return pb.InitializeResponse(protocol_version=PROTOCOL_VERSION, server_version=__version__,
                                     capabilities=serde.capabilities(limits=self.sessions.limits.as_dict()),
                                     model=serde.model_info_to_proto(self.adapter))

    @_rpc
    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        ids = tokenize(self.adapter, request.text, "text", self.sessions.limits.max_prompt_tokens)
        tok = self.adapter.tokenizer
        if request.prepend_bos and tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        return pb.TokenizeResponse(ids=ids, tokens=self.adapter.token_texts(ids))

    # -- sessions --------------------------------------------------------------------------------

    @_rpc
    def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.ServicerContext) -> pb.CreateSessionResponse:
        s = self.sessions.create(request.name, request.idle_timeout_s, owner=client_of(context.peer()))
        return pb.CreateSessionResponse(session_id=s.id, idle_timeout_s=s.idle_timeout_s, session_secret=s.secret)

    def _session(self, request: Any, context: Any) -> Session:
        """The session a request names, if the caller sent its secret (NOT_FOUND otherwise: engine/manager.py)."""
        return self.sessions.get(request.session_id, _secret(context))

    @_rpc
    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionResponse:
        self.sessions.close(self._session(request, context).id)
        return pb.CloseSessionResponse()

    @_rpc
    def SetBreakpoints(self, request: pb.SetBreakpointsRequest, context: grpc.ServicerContext) -> pb.SetBreakpointsResponse:
        s = self._session(request, context)
        specs = s.set_breakpoints(serde.breakpoints_from_proto(request.breakpoints))
        recording.record(s, "SetBreakpoints", request, {})
        return pb.SetBreakpointsResponse(breakpoints=[serde.breakpoint_status_to_proto(b) for b in specs])

    # -- runs ------------------------------------------------------------------------------------

    @_rpc
    def Launch(self, request: pb.LaunchRequest, context: grpc.ServicerContext) -> pb.RunStatus:
        s = self._session(request, context)
        r = serde.launch_from_proto(request)
        run = s.launch(r.prompts, r.token_ids, r.prepend_bos, r.capture, r.stop_on_entry, r.gen)
        if request.wait:
            s.wait(run, _wait_s(request.wait_timeout_ms, context))
        return _recorded(s, "Launch", request, s.checked_status(run))

    def _control(self, request: Any, context: Any, command: str, step: str | None = None) -> pb.RunStatus:
        s = self._session(request, context)
        run = s.resume(command, step)
        if request.wait:
            s.wait(run, _wait_s(request.wait_timeout_ms, context))
        return _recorded(s, "Step" if step else "Continue", request, s.checked_status(run))

    @_rpc
    def Continue(self, request: pb.ContinueRequest, context: grpc.ServicerContext) -> pb.RunStatus:
        return self._control(request, context, "continue")

    @_rpc
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.RunStatus:
        return self._control(request, context, "step", serde.step_kind_from_proto(request.kind))

    @_rpc
    def Pause(self, request: pb.PauseRequest, context: grpc.ServicerContext) -> pb.RunStatus:
        s = self._session(request, context)
        run = s.pause()
        if request.wait:
            s.wait(run, _wait_s(request.wait_timeout_ms, context))
        return _recorded(s, "Pause", request, s.status(run))

    @_rpc
    def Terminate(self, request: pb.TerminateRequest, context: grpc.ServicerContext) -> pb.RunStatus:
        s = self._session(request, context)
        run = s.terminate()
        if request.wait:
            run.finished.wait(_wait_s(request.wait_timeout_ms, context))
        return _recorded(s, "Terminate", request, s.status(run))

    @_rpc
    def GetRunStatus(self, request: pb.GetRunStatusRequest, context: grpc.ServicerContext) -> pb.RunStatus:
        s = self._session(request, context)
        if request.wait and s.current is not None:
            s.wait(s.current, _wait_s(request.wait_timeout_ms, context))
        return serde.status_to_proto(s.status())

    @_rpc
    def GetResult(self, request: pb.GetResultRequest, context: grpc.ServicerContext) -> pb.RunResult:
        bounds.in_range("top_k", request.top_k, 0, self.adapter.info.vocab_size, "0 = 10")
        run = self._session(request, context).run_for(request.run_id)
        return serde.result_to_proto(run.build_result(top_k=request.top_k or 10, include_logits=request.include_logits))

    # -- events ----------------------------------------------------------------------------------

    @_rpc_async_stream
    async def Events(self, request: pb.EventsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Event]:
        """Waits on the event loop (no thread held); a client that leaves cancels the wait. An admitted stream
        sends its headers at once, so a client knows it holds a slot before the first event."""
        s = self._session(request, context)
        with self.stream_slots.held("Events"):
            await context.send_initial_metadata(())
            async for ev in self._events(s, request.after_seq):
                yield ev

    async def _events(self, s: Session, after: int) -> AsyncIterator[pb.Event]:
        with s.cv:
            s.streams += 1          # an open stream keeps the session alive
        try:
            events, truncated = s.events.since(after)
            if truncated:
                dropped = Invalidated(what="events dropped from the replay ring")
                yield serde.event_to_proto(Event(seq=after, time=0.0, run_id="", body=dropped))
            while True:
                events, _ = s.events.since(after)
                for ev in events:
                    yield serde.event_to_proto(ev)
                    after = ev.seq
                if s.events.closed and not s.events.since(after)[0]:
                    return
                await s.events.wait_async(after)
        finally:
            with s.cv:
                s.streams -= 1
            s.touch()

    @_rpc_async
    async def PollEvents(self, request: pb.PollEventsRequest, context: grpc.aio.ServicerContext) -> pb.PollEventsResponse:
        bounds.in_range("max_events", request.max_events, 0, bounds.MAX_POLL_EVENTS, "0 = no limit")
        s = self._session(request, context)
        if request.timeout_ms > 0:
            with self.stream_slots.held("PollEvents with a timeout"):
                await s.events.wait_async(request.after_seq, min(_wait_s(request.timeout_ms, context), 30.0))
        events, truncated = s.events.since(request.after_seq, request.max_events)
        return pb.PollEventsResponse(events=[serde.event_to_proto(ev) for ev in events], last_seq=s.events.last_seq,
                                     truncated=truncated)

    # -- inspection ------------------------------------------------------------------------------

    @_rpc
    def GetStack(self, request: pb.GetStackRequest, context: grpc.ServicerContext) -> pb.GetStackResponse:
        frames, stop_id = self._session(request, context).stack()
        return pb.GetStackResponse(frames=[serde.frame_to_proto(f) for f in frames], stop_id=stop_id)

    @_rpc
    def GetScopes(self, request: pb.GetScopesRequest, context: grpc.ServicerContext) -> pb.GetScopesResponse:
        scopes = self._session(request, context).scopes(request.frame_id)
        return pb.GetScopesResponse(scopes=[serde.scope_to_proto(x) for x in scopes])

    @_rpc
    def GetVariables(self, request: pb.GetVariablesRequest, context: grpc.ServicerContext) -> pb.GetVariablesResponse:
        if request.start < 0 or request.count < 0:
            raise InvalidArgument("start and count must be >= 0", reason="BAD_RANGE")
        s = self._session(request, context)
        variables = s.variables(request.variables_reference, request.start, request.count)
        return pb.GetVariablesResponse(variables=[serde.variable_to_proto(v) for v in variables])

    @_rpc_stream
    def ReadTensor(self, request: pb.ReadTensorRequest, context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        reads.check_chunk_bytes(request.chunk_bytes)
        session = self._session(request, context)
        dtype = serde.read_dtype_from_proto(request.dtype)
        items = reads.one(session, request.expression, request.run_id, dtype, self.sessions.limits.max_read_bytes)
        yield from self._send(session, request, items, dtype, context, lambda name: request)

    @_rpc_async_stream
    async def ReadTensors(self, request: pb.ReadTensorsRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.TensorChunk]:
        """The chunks of `_read_tensors`, computed in a thread a batch at a time (`_batched`): a cache of
        many small tensors pays one thread hand-off per batch, not one per tensor."""
        async for chunk in _batched(lambda is_active: self._read_tensors(request, context, is_active)):
            yield chunk

    def _read_tensors(self, request: pb.ReadTensorsRequest, context: Any,
                      is_active: Callable[[], bool]) -> Iterator[pb.TensorChunk]:
        reads.check_request(len(request.expressions), request.chunk_bytes)
        session = self._session(request, context)
        dtype = serde.read_dtype_from_proto(request.dtype)
        items = reads.resolve(session, request.expressions, request.run_id, dtype, self.sessions.limits.max_read_bytes)
        # recorded as one ReadTensor per tensor: a recording replays (and checks) each of them
        yield from self._send(session, request, items, dtype, context, lambda name: pb.ReadTensorRequest(
            expression=name, dtype=request.dtype, run_id=request.run_id, shared_memory=request.shared_memory),
            is_active)

    def _send(self, session: Session, request: Any, items: list[reads.Item], dtype: torch.dtype | None,
              context: Any, recorded_as: Callable[[str], pb.ReadTensorRequest],
              is_active: Callable[[], bool] | None = None) -> Iterator[pb.TensorChunk]:
        serde.check_read_dtypes(items, dtype)
        if request.shared_memory:
            shm.check_peer(context.peer())
        for chunk in reads.chunks(items, dtype, chunk_bytes=request.chunk_bytes, shared=request.shared_memory,
                                  max_unclaimed=self.sessions.limits.max_read_bytes,
                                  is_active=is_active or context.is_active):
            if chunk.last:
                # recorded with the checksum just computed: hashing a large read again would cost more than sending it
                recording.record(session, "ReadTensor", recorded_as(chunk.name), recording.read_digest(
                    torch.empty(chunk.shape, dtype=chunk.dtype, device="meta"), chunk.crc32))
            yield serde.chunk_to_proto(chunk)

    @_rpc
    def TensorStats(self, request: pb.TensorStatsRequest, context: grpc.ServicerContext) -> common_pb2.TensorSummary:
        s = self._session(request, context)
        summary = wire.summarize(s.read_value(request.expression, request.run_id))
        recording.record(s, "TensorStats", request, {"summary": json_format.MessageToDict(summary)})
        return summary

    @_rpc
    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:
        bounds.in_range("max_elements", request.max_elements, 0, bounds.MAX_EVAL_ELEMENTS, "0 = 4096")
        s = self._session(request, context)
        run = s.run_for(request.run_id)
        if request.frame_id:
            s.check_frame(request.frame_id)   # stale frames are ABORTED
        value = s.evaluate_value(request.expression, run)
        resp = serde.evaluate_to_proto(value, request.max_elements or 4096, s.decode, s.adapter.info.vocab_size)
        recording.record(s, "Evaluate", request, recording.outcome_of("Evaluate", resp))
        return resp

    # -- patching --------------------------------------------------------------------------------

    @_rpc
    def Patch(self, request: pb.PatchRequest, context: grpc.ServicerContext) -> pb.PatchResponse:
        s = self._session(request, context)
        p = serde.patch_from_proto(request, self.sessions.limits.max_patch_bytes)
        spec, now = s.patch(p.name, p.op, p.selector, p.value, p.scalar, p.source_run_id, p.mean_over, p.tokens,
                            run_id=p.run_id)
        recording.record(s, "Patch", request, {})
        return pb.PatchResponse(patch_id=spec.id, applied_now=now, scope=spec.scope,
                                message=f"{spec.describe()}: {'applied at this stop' if now else 'registered'}")

    @_rpc
    def ClearPatches(self, request: pb.ClearPatchesRequest, context: grpc.ServicerContext) -> pb.ClearPatchesResponse:
        s = self._session(request, context)
        cleared = s.clear_patches()
        recording.record(s, "ClearPatches", request, {})
        return pb.ClearPatchesResponse(cleared=cleared)

    # -- record and replay -----------------------------------------------------------------------

    @_rpc
    def ExportRecording(self, request: pb.ExportRecordingRequest, context: grpc.ServicerContext) -> pb.Recording:
        return pb.Recording(json=recording.export(self._session(request, context)))

    @_rpc
    def ReplayRecording(self, request: pb.ReplayRecordingRequest, context: grpc.ServicerContext) -> pb.ReplayReport:
        if len(request.json) > 64 << 20:
            raise InvalidArgument("recording larger than 64 MiB", reason="BAD_RECORDING")
        return recording.replay(self, request.json, request.stop_on_mismatch, request.keep_session,
                                owner=client_of(context.peer()))
