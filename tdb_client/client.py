"""The typed Python client of a tdb server.

    from tdb_client import TdbClient

    with TdbClient("127.0.0.1:50051") as tdb:
        print(tdb.model_info().n_layers)
        with tdb.session() as s:
            s.set_breakpoints(["blocks.1.attn.out"])
            stop = s.launch("Mr. Darcy ... Mr.", capture=["*"])   # paused at blocks.1.attn.out; "*": patterns too
            pattern = s.read("blocks.1.attn.pattern")     # numpy [batch, head, query_pos, key_pos]
            cache = s.read_cache()                        # {site: numpy}, one request: what has run so far
            s.patch("blocks.1.attn.head.2", "zero")       # zero one head's write, at this stop
            done = s.continue_()                          # RunStatus, exited
            print(done.result.top[0][:3])

Every failed call raises `TdbError` (code, reason, message). Results are dataclasses and numpy arrays.
"""

from __future__ import annotations

import os
import threading
import uuid
import warnings
from typing import Any, Sequence

import grpc
import numpy as np

from tdb.v1 import debugger_pb2 as pb, debugger_pb2_grpc

from . import _enums as enums
from . import _reads, _wire, serde
from .analysis import AnalysisMixin
from ._rpc import _Stream, _Stub
from .errors import TdbError, TdbWarning
from .types import (Breakpoint, BreakpointStatus, EvalResult, Event, Frame, Generate, ModelInfo, PatchResult, ReplayReport,
                    RunResult,
                    RunStatus, Scope, ServerInfo, TensorSummary, Variable)

PROTOCOL_VERSION = "1.2"    # the protocol this client speaks (tdb_server.PROTOCOL_VERSION)
MAX_MESSAGE_BYTES = 256 << 20


def _open_shared(path: str) -> int:
    """Open a server's shared-memory file: only a `tdb-*` file directly in /dev/shm, never through a link
    (the client unlinks what it opens, so a server must not be able to name any other file)."""
    if os.path.dirname(path) != "/dev/shm" or not os.path.basename(path).startswith("tdb-"):
        raise PermissionError(f"not a tdb shared-memory file: {path!r}")
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))


def _wire_dtype(dtype: str | None) -> int:
    if not dtype:
        return 0
    if dtype not in _wire.WIRE_BY_NAME:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(_wire.WIRE_BY_NAME)}")
    return _wire.WIRE_BY_NAME[dtype]


def _rpc_of(req: Any) -> str:
    return "ReadTensors" if isinstance(req, pb.ReadTensorsRequest) else "ReadTensor"


def _what(req: Any) -> str:
    if isinstance(req, pb.ReadTensorsRequest):
        return f"{len(req.expressions) or 'every captured'} sites"
    return req.expression


class TdbClient(AnalysisMixin):
    """A connection to one tdb server. Use as a context manager, or call close()."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = 120.0,
                 client_name: str = "tdb_client", token: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False,
                 metadata: Sequence[tuple[str, str]] | None = None):
        """address: "host:port". token: the server's bearer token (default: $TDB_TOKEN).
        root_certificates (PEM bytes) or tls=True (system roots): connect with TLS."""
        self.address = address
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if root_certificates is not None or tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        # A per-client affinity key: a load balancer hashing on it sends all of this client's calls (and so
        # its sessions) to one server (see docs/deploy.md).
        self.affinity_key = uuid.uuid4().hex
        md = [("tdb-affinity", self.affinity_key), *(metadata or [])]
        token = token if token is not None else os.environ.get("TDB_TOKEN")
        if token:
            md.append(("authorization", f"Bearer {token}"))
        if md:
            self._channel = grpc.intercept_channel(self._channel, _MetadataInterceptor(md))
        self._rpc = _Stub(self._channel, timeout, debugger_pb2_grpc.DebuggerStub)
        self._client_name = client_name
        self._info: ServerInfo | None = None
        self._shm: bool | None = None        # reads through shared memory (decided at the first read)

    def __enter__(self) -> "TdbClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server accepts connections (raises TdbError UNAVAILABLE otherwise)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TdbError(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE",
                           f"no tdb server answered at {self.address} within {timeout:g} s. Is one running "
                           "there? Start one with `tdb serve` (or `tdb serve --port PORT`).") from None

    # -- handshake -------------------------------------------------------------------------------

    def initialize(self, refresh: bool = False) -> ServerInfo:
        """Protocol version, capabilities and model info (cached after the first call; `refresh` asks the
        server again, e.g. one restarted on the same address)."""
        if self._info is None or refresh:
            self._info = serde.server_info_from_proto(self._rpc("Initialize", pb.InitializeRequest(
                client_name=self._client_name, protocol_version=PROTOCOL_VERSION)))
        return self._info

    def model_info(self) -> ModelInfo:
        return self.initialize().model

    def _use_shared_memory(self) -> bool:
        """Reads go through shared memory when the server is on this host (a loopback address, no TLS
        needed to reach it) and offers it; any refusal or failure turns it off for this client."""
        if self._shm is None:
            host = self.address.rsplit(":", 1)[0].strip("[]")
            local = host in ("localhost", "::1") or host.startswith("127.")
            self._shm = local and os.path.isdir("/dev/shm") and \
                bool(self.capabilities().get("supportsSharedMemoryReads"))
        return self._shm

    def capabilities(self) -> dict[str, bool]:
        return self.initialize().capabilities

    def tokenize(self, text: str, prepend_bos: bool = False) -> tuple[list[int], list[str]]:
        r = self._rpc("Tokenize", pb.TokenizeRequest(text=text, prepend_bos=prepend_bos))
        return list(r.ids), list(r.tokens)

    def replay(self, recording: str, *, stop_on_mismatch: bool = False, keep_session: bool = False,
               timeout: float = 600.0) -> ReplayReport:
        """Replay a recording (JSON text or a path to one) in a fresh session on this server.

        keep_session: leave that session open at the recording's last state (Session(client, report.session_id, 0, report.session_secret))."""
        text = recording
        if not recording.lstrip().startswith("{"):
            with open(recording, encoding="utf-8") as f:
                text = f.read()
        return serde.replay_report_from_proto(self._rpc("ReplayRecording", pb.ReplayRecordingRequest(
            json=text, stop_on_mismatch=stop_on_mismatch, keep_session=keep_session), timeout=timeout))

    # -- sessions --------------------------------------------------------------------------------

    def session(self, name: str = "", idle_timeout_s: float = 0.0) -> "Session":
        """Create a debugging session (closed when the `with` block ends)."""
        r = self._rpc("CreateSession", pb.CreateSessionRequest(name=name, idle_timeout_s=idle_timeout_s))
        return Session(self, r.session_id, r.idle_timeout_s, r.session_secret)


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, metadata: list[tuple[str, str]]):
        self._md = metadata

    def _details(self, d: Any) -> Any:
        md = list(d.metadata or []) + self._md
        return d._replace(metadata=md) if hasattr(d, "_replace") else d

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)


_status = serde.run_status_from_proto


class Session:
    """A debugging session on the server: breakpoints, runs, inspection, patches, events."""

    def __init__(self, client: TdbClient, session_id: str, idle_timeout_s: float, secret: str = ""):
        self.client, self.id, self.idle_timeout_s = client, session_id, idle_timeout_s
        # the session's secret goes with every call naming it (the server answers NOT_FOUND without it);
        # `metadata` is for calls made with raw stubs
        self.metadata: tuple[tuple[str, str], ...] = (("tdb-session-secret", secret),)
        self._rpc = client._rpc.with_metadata(*self.metadata)
        self.closed = False
        self._live_run = ""      # the run this client last saw running or paused: where a patch goes

    def _saw(self, msg: Any) -> RunStatus:
        """A run status, remembered: a patch is sent for the run this client last saw live."""
        st = _status(msg)
        self._live_run = st.run_id if st.state in ("running", "paused") else ""
        return st

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._rpc("CloseSession", pb.CloseSessionRequest(session_id=self.id))
            except TdbError as e:
                if e.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise

    # -- breakpoints -----------------------------------------------------------------------------

    def set_breakpoints(self, breakpoints: Sequence[str | Breakpoint]) -> list[BreakpointStatus]:
        """Replace the session's breakpoints. Strings are sites/units/globs with default options."""
        bps = [Breakpoint(b) if isinstance(b, str) else b for b in breakpoints]
        return serde.breakpoint_statuses_from_proto(self._rpc("SetBreakpoints", pb.SetBreakpointsRequest(
            session_id=self.id, breakpoints=[serde.breakpoint_to_proto(b) for b in bps])))

    # -- runs ------------------------------------------------------------------------------------

    def launch(self, prompt: str | Sequence[str] | None = None, *, token_ids: Sequence[Sequence[int]] | None = None,
               prepend_bos: bool = False, capture: Sequence[str] = (), stop_on_entry: bool = False,
               generate: "Generate | int | None" = None, wait: bool = True, timeout: float = 60.0) -> RunStatus:
        """Start a forward pass on a prompt (or a batch of prompts, or token ids).

        generate: a `Generate` (or a number of new tokens, greedy) to step through generation token by token.
        With `wait` (default) returns once the run has stopped (breakpoint, entry, token) or ended.
        A prompt word the model does not know (its tokenizer writes the unknown token) gives a TdbWarning,
        also in the returned status's `warnings`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        req = pb.LaunchRequest(session_id=self.id, prompts=prompts, prepend_bos=prepend_bos, capture=list(capture),
                               stop_on_entry=stop_on_entry, wait=wait, wait_timeout_ms=int(timeout * 1000))
        for ids in token_ids or []:
            req.token_ids.add(ids=[int(i) for i in ids])
        if generate is not None:
            options = Generate(generate) if isinstance(generate, int) else generate
            req.generate.CopyFrom(serde.generate_to_proto(options))
        status = self._saw(self._rpc("Launch", req, timeout=timeout + 30))
        for text in status.warnings:
            warnings.warn(text, TdbWarning, stacklevel=2)
        return status

    def continue_(self, wait: bool = True, timeout: float = 60.0) -> RunStatus:
        return self._saw(self._rpc("Continue", pb.ContinueRequest(session_id=self.id, wait=wait,
                                                                wait_timeout_ms=int(timeout * 1000)), timeout=timeout + 30))

    def step(self, kind: str = "into", wait: bool = True, timeout: float = 60.0) -> RunStatus:
        """kind: "into" (next site), "over" (past the current block), "out" (end of the enclosing module),
        "token" (generation: to the next token boundary)."""
        step = serde.choice(kind, enums.STEP_KIND, "step kind")
        return self._saw(self._rpc("Step", pb.StepRequest(session_id=self.id, kind=step, wait=wait,
                                                        wait_timeout_ms=int(timeout * 1000)), timeout=timeout + 30))

    def pause(self, wait: bool = True, timeout: float = 60.0) -> RunStatus:
        return self._saw(self._rpc("Pause", pb.PauseRequest(session_id=self.id, wait=wait,
                                                          wait_timeout_ms=int(timeout * 1000)), timeout=timeout + 30))

    def terminate(self, wait: bool = True, timeout: float = 60.0) -> RunStatus:
        return self._saw(self._rpc("Terminate", pb.TerminateRequest(session_id=self.id, wait=wait,
                                                                  wait_timeout_ms=int(timeout * 1000)), timeout=timeout + 30))

    def status(self, wait: bool = False, timeout: float = 60.0) -> RunStatus:
        return self._saw(self._rpc("GetRunStatus", pb.GetRunStatusRequest(session_id=self.id, wait=wait,
                                                                        wait_timeout_ms=int(timeout * 1000)), timeout=timeout + 30))

    def result(self, run_id: str = "", top_k: int = 10, include_logits: bool = True) -> RunResult:
        """The result of a finished run (the latest by default): top tokens and last-position logits."""
        return serde.run_result_from_proto(self._rpc("GetResult", pb.GetResultRequest(
            session_id=self.id, run_id=run_id, top_k=top_k, include_logits=include_logits)))

    # -- events ----------------------------------------------------------------------------------

    def events(self, after_seq: int = 0, timeout: float | None = None) -> "EventStream":
        """Stream the session's events (replaying retained ones after `after_seq`). Iterate it; `close()` it
        (from any thread) to stop."""
        return EventStream(self._rpc.stream("Events", pb.EventsRequest(session_id=self.id, after_seq=after_seq),
                                            timeout=timeout))

    def poll_events(self, after_seq: int = 0, max_events: int = 0, timeout: float = 0.0) -> tuple[list[Event], int, bool]:
        """Events after `after_seq` (waiting up to `timeout` s for one): (events, last_seq, truncated)."""
        r = self._rpc("PollEvents", pb.PollEventsRequest(session_id=self.id, after_seq=after_seq,
                                                         max_events=max_events, timeout_ms=int(timeout * 1000)))
        return [serde.event_from_proto(e) for e in r.events], r.last_seq, r.truncated

    # -- inspection ------------------------------------------------------------------------------

    def stack(self) -> list[Frame]:
        """Frames of the current stop, innermost first (site, attn/mlp, block, model)."""
        return serde.frames_from_proto(self._rpc("GetStack", pb.GetStackRequest(session_id=self.id)))

    def scopes(self, frame: Frame | int) -> list[Scope]:
        fid = frame.id if isinstance(frame, Frame) else frame
        return serde.scopes_from_proto(self._rpc("GetScopes", pb.GetScopesRequest(session_id=self.id, frame_id=fid)))

    def variables(self, ref: Scope | Variable | int, start: int = 0, count: int = 0) -> list[Variable]:
        vref = ref if isinstance(ref, int) else ref.variables_reference
        return serde.variables_from_proto(self._rpc("GetVariables", pb.GetVariablesRequest(
            session_id=self.id, variables_reference=vref, start=start, count=count)))

    def read(self, site: str, selector: str = "", *, dtype: str | None = None, run_id: str = "",
             chunk_bytes: int = 0, shared_memory: bool | None = None) -> np.ndarray:
        """A site's value (or any expression) as numpy, streamed in chunks and checksummed, or, from a
        server on this host, through shared memory (`shared_memory`: None = whenever the server offers it).

        `selector` is an index appended to the site, e.g. read("blocks.1.attn.pattern", "[0, 2]").
        `dtype` converts on the server ("float32", "float16", "bfloat16", ...); bfloat16 arrives as float32.
        """
        expression = site + selector
        req = pb.ReadTensorRequest(session_id=self.id, expression=expression, run_id=run_id, chunk_bytes=chunk_bytes,
                                   dtype=_wire_dtype(dtype))
        got = self._read(req, shared_memory)
        if not got:
            raise TdbError(grpc.StatusCode.DATA_LOSS, "EMPTY_STREAM", f"no data for {expression}")
        return got[0][1]

    def read_cache(self, sites: str | Sequence[str] | None = None, *, dtype: str | None = None, run_id: str = "",
                   chunk_bytes: int = 0, shared_memory: bool | None = None) -> dict[str, np.ndarray]:
        """A run's activation cache in one request: {site: numpy array} — like TransformerLens's
        `run_with_cache`, read after the run (or at a stop: what has run so far).

        sites: None = every site the run captured (the launch's `capture`), in the model's order; else
        site names, globs over the captured sites ("blocks.*.resid_post": its sites in the model's order)
        and expressions ("blocks.0.attn.out[0, -1]"), in the order given, each read once. dtype, run_id, chunk_bytes, shared_memory: as `read`; from a server on this host the whole
        cache is one shared-memory file. A server older than protocol 1.2 is read one site at a time."""
        entries = [sites] if isinstance(sites, str) else None if sites is None else list(sites)
        if entries == []:
            return {}                                  # on the wire, no names means every captured site
        if not self.client.capabilities().get("supportsBatchReads"):
            return self._read_each(entries, dtype, run_id, chunk_bytes, shared_memory)
        req = pb.ReadTensorsRequest(session_id=self.id, expressions=entries or [], run_id=run_id,
                                    chunk_bytes=chunk_bytes, dtype=_wire_dtype(dtype))
        return dict(self._read(req, shared_memory))

    def _read_each(self, entries: list[str] | None, dtype: str | None, run_id: str, chunk_bytes: int,
                   shared_memory: bool | None) -> dict[str, np.ndarray]:
        """read_cache from a server without ReadTensors: one read per site (globs over the model's sites)."""
        out = {}
        for name, from_glob in _reads.expand(entries, [x.name for x in self.client.model_info().sites]):
            try:
                out[name] = self.read(name, dtype=dtype, run_id=run_id, chunk_bytes=chunk_bytes,
                                      shared_memory=shared_memory)
            except TdbError as e:
                if not (from_glob and e.reason in ("NOT_CAPTURED", "NOT_YET_RUN")):
                    raise
        return out

    def _read(self, req: Any, shared_memory: bool | None) -> list[tuple[str, np.ndarray]]:
        """A ReadTensor or ReadTensors request's tensors, through shared memory when asked (None: when the
        server offers it), streamed otherwise or when shared memory is refused (and from then on)."""
        if shared_memory if shared_memory is not None else self.client._use_shared_memory():
            got = self._read_shared(req)
            if got is not None:
                return got
            self.client._shm = False                  # refused or unreachable: stream from now on
            req.shared_memory = False
        stream = self._rpc.stream(_rpc_of(req), req, timeout=600)
        try:
            return _reads.streamed(stream, _what(req))
        finally:
            stream.close()

    def _read_shared(self, req: Any) -> list[tuple[str, np.ndarray]] | None:
        """The read through the one shared-memory file the server wrote; None when the server refuses it or
        the file cannot be opened here (another host, another user, another /dev/shm)."""
        req.shared_memory = True
        try:
            chunks = list(self._rpc.stream(_rpc_of(req), req, timeout=600))
        except TdbError as e:
            if e.reason == "SHM_UNAVAILABLE":
                return None
            raise
        if not chunks:
            return []                                 # ReadTensors of a run that captured nothing
        path = chunks[0].shared_memory_path
        if not any(c.shared_memory_path for c in chunks):
            return _reads.streamed(chunks, _what(req))  # a small read (or an older server) comes streamed
        if any(c.shared_memory_path != path for c in chunks):
            return None
        try:
            fd = _open_shared(path)
        except OSError:
            return None
        try:
            os.unlink(path)
        except OSError:
            pass
        try:
            return _reads.mapped(fd, chunks, _what(req))
        finally:
            os.close(fd)

    def stats(self, expression: str, run_id: str = "") -> TensorSummary:
        return serde.tensor_summary_from_proto(self._rpc("TensorStats", pb.TensorStatsRequest(
            session_id=self.id, expression=expression, run_id=run_id)))

    def evaluate(self, expression: str, *, run_id: str = "", frame: Frame | int = 0, max_elements: int = 0) -> EvalResult:
        """Evaluate an expression of the tdb expression language (see Capabilities.expression_functions)."""
        fid = frame.id if isinstance(frame, Frame) else frame
        return serde.eval_result_from_proto(self._rpc("Evaluate", pb.EvaluateRequest(
            session_id=self.id, expression=expression, frame_id=fid, max_elements=max_elements, run_id=run_id)))

    # -- patching --------------------------------------------------------------------------------

    def patch(self, site: str, op: str = "zero", value: Any = None, *, scalar: float = 0.0,
              positions: Sequence[int] = (), heads: Sequence[int] = (), neurons: Sequence[int] = (),
              batch: Sequence[int] = (), source_run_id: str = "", mean_over: str = "",
              tokens: Sequence[int] = (), run_id: str | None = None) -> PatchResult:
        """Patch a site or unit: op in set | add | scale | zero | mean | copy_from_run.

        At a stop on `site` the value is replaced now; a site that has not run yet gets the patch when it
        runs; with no active run the patch applies to every following run (until clear_patches).
        run_id: the run the patch is for (default: the run this session last reported running or paused,
        or none; "": the server's choice, the live run if any). Should that run end first (a Continue from
        another thread won the race), the server refuses (FAILED_PRECONDITION, RUN_ENDED) rather than
        patching every later run."""
        req = serde.patch_to_proto(self.id, site, op, value, scalar=scalar, positions=positions, heads=heads,
                                   neurons=neurons, batch=batch, source_run_id=source_run_id, mean_over=mean_over,
                                   tokens=tokens, run_id=self._live_run if run_id is None else run_id)
        return serde.patch_result_from_proto(self._rpc("Patch", req))

    def clear_patches(self) -> int:
        return self._rpc("ClearPatches", pb.ClearPatchesRequest(session_id=self.id)).cleared

    # -- record and replay -----------------------------------------------------------------------

    def export_recording(self, path: str | None = None) -> str:
        """This session's recording (JSON: model identity + actions + outcomes); also written to `path`."""
        text = self._rpc("ExportRecording", pb.ExportRecordingRequest(session_id=self.id)).json
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text


class EventStream:
    """An iterator of Event; close() cancels the underlying stream."""

    def __init__(self, stream: _Stream):
        self._stream = stream

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> Event:
        return serde.event_from_proto(next(self._stream))

    def close(self) -> None:
        self._stream.close()


class EventCollector:
    """Collects a session's events on a background thread (handy in tests and notebooks)."""

    def __init__(self, session: Session, after_seq: int = 0):
        self.events: list[Event] = []
        self._cv = threading.Condition()
        self._it = session.events(after_seq)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self._it:
                with self._cv:
                    self.events.append(ev)
                    self._cv.notify_all()
        except TdbError:
            pass

    def wait_for(self, kind: str, count: int = 1, timeout: float = 30.0) -> list[Event]:
        with self._cv:
            self._cv.wait_for(lambda: sum(e.kind == kind for e in self.events) >= count, timeout=timeout)
            return [e for e in self.events if e.kind == kind]

    def close(self) -> None:
        self._it.close()
        self._thread.join(timeout=5)
