"""The debug adapter: DAP requests in, tdb calls out through the typed client, tdb events back as DAP
events. One `DebugAdapter` serves one IDE debug session (one connection), which drives one tdb
session and one forward pass (one DAP thread).

How DAP maps onto tdb:

    thread                 the run (one per launch)
    stack frame            the site path at the stop: blocks.1.attn.out > blocks.1.attn > blocks.1 > model
    source                 a virtual document listing the model's sites in execution order, one a line
                           (frames point at the stop's line; line breakpoints and log points go there)
    scopes / variables     the server's Value / Captured / Patches scopes; tensors expand lazily by
                           their first dimension
    function breakpoints   site names, units and globs (blocks.1.attn.out, blocks.1.attn.head.2, blocks.*.mlp.out)
    data breakpoints       watch conditions on a site or unit (default `any_nan or any_inf`; edit the
                           condition, e.g. `norm > 40`)
    setVariable / setExpression / REPL `a = b`   patches (mini-syntax in patching.py)
    evaluate               the server's expression language
    next / stepIn / stepOut   step over the block / into the next site / out of the module;
                           granularity "instruction" makes `next` move one site

Requests are read on one thread and handled in order on another, so `cancel` can reach a request
still queued (or a read-only one in flight). Every response to a request that resumes the run is sent
before the events that follow from it: the handler and the event pump share one ordering lock.
Server frame ids and variables references (stop_id << 20 | index) never reach the IDE: the adapter
hands out its own small integers and forgets them whenever the run resumes.
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import grpc
import numpy as np

from ..client import EventStream, Session, TdbClient
from ..errors import TdbError
from ..types import Breakpoint, EvalResult, Event, ModelInfo
from . import backend
from .patching import PatchSyntaxError, parse_assignment, parse_target, parse_value, unit_dims
from .protocol import Channel, FramingError, read_message

log = logging.getLogger("tdb.dap")

SOURCE_REFERENCE = 1
DEFAULT_WATCH = "any_nan or any_inf"
READ_ONLY = frozenset({"threads", "stackTrace", "scopes", "variables", "evaluate", "source",
                       "dataBreakpointInfo", "breakpointLocations"})
_STOP_REASONS = {"breakpoint": "breakpoint", "step": "step", "pause": "pause", "entry": "entry",
                 "exception": "exception"}
_EXIT_CODES = {"exited": 0, "failed": 1, "terminated": 2}
_SIMPLE_EXPR = re.compile(r"^[A-Za-z_][\w.]*(\[[^\]]*\])*$")

CAPABILITIES: dict[str, Any] = {
    "supportsConfigurationDoneRequest": True,
    "supportsFunctionBreakpoints": True,
    "supportsConditionalBreakpoints": True,
    "supportsHitConditionalBreakpoints": True,
    "supportsLogPoints": True,
    "supportsDataBreakpoints": True,
    "supportsBreakpointLocationsRequest": True,
    "supportsEvaluateForHovers": True,
    "supportsSetVariable": True,
    "supportsSetExpression": True,
    "supportsSteppingGranularity": True,
    "supportsTerminateRequest": True,
    "supportsCancelRequest": True,
    "supportsDelayedStackTraceLoading": True,
    "exceptionBreakpointFilters": [],
}


class DapError(Exception):
    """A request failed: the message goes back in the response (success: false)."""


class Handles:
    """Small integers for the IDE standing for server references; never reused, cleared on resume."""

    def __init__(self) -> None:
        self._next = itertools.count(1)
        self._items: dict[int, tuple] = {}

    def add(self, payload: tuple) -> int:
        h = next(self._next)
        self._items[h] = payload
        return h

    def get(self, handle: Any, kind: str | tuple[str, ...]) -> tuple:
        item = self._items.get(handle) if isinstance(handle, int) else None
        kinds = (kind,) if isinstance(kind, str) else kind
        if item is None or item[0] not in kinds:
            raise DapError(f"unknown or stale reference {handle!r}: the run has moved on since, refresh the view")
        return item

    def clear(self) -> None:
        self._items.clear()


@dataclass
class DapBreakpoint:
    """One breakpoint as the IDE set it, and what the server said about it."""

    kind: str                           # "function" | "source" | "data" | "launch" (from the launch config)
    id: int
    spec: Breakpoint | None             # None: refused before reaching the server
    line: int | None = None             # source breakpoints: the line (IDE numbering)
    verified: bool = False
    message: str = ""


@dataclass
class Child:
    """A variable the IDE has seen, so setVariable / dataBreakpointInfo can find what it names."""

    evaluate_name: str
    handle: int
    indexed: int


def _summary_text(shape: tuple[int, ...], mean: float, norm: float, lo: float, hi: float, nans: int = 0) -> str:
    text = f"{list(shape)} mean={mean:.4g} norm={norm:.4g} min={lo:.4g} max={hi:.4g}"
    return text + (f" nan={nans}" if nans else "")


def _np_summary(a: np.ndarray) -> str:
    f = a.astype(np.float64)
    finite = f[np.isfinite(f)]
    nans = int(np.isnan(f).sum())
    if finite.size == 0:
        return f"{list(a.shape)} (no finite values) nan={nans}"
    return _summary_text(a.shape, float(finite.mean()), float(np.sqrt((finite ** 2).sum())), float(finite.min()),
                         float(finite.max()), nans)


def _child_expr(expr: str, i: int) -> str:
    return f"{expr}[{i}]" if _SIMPLE_EXPR.match(expr) else f"({expr})[{i}]"


def _launch_breakpoints(raw: Any) -> list[Breakpoint]:
    """The launch configuration's "breakpoints": site names, or {site, condition, hitCondition, logMessage}
    (for clients without a function-breakpoint UI, e.g. nvim-dap)."""
    out = []
    for b in raw or []:
        if isinstance(b, str) and b.strip():
            out.append(Breakpoint(b.strip()))
        elif isinstance(b, dict) and isinstance(b.get("site"), str) and b["site"].strip():
            out.append(Breakpoint(b["site"].strip(), condition=str(b.get("condition") or ""),
                                  hit_condition=str(b.get("hitCondition") or ""),
                                  log_message=str(b.get("logMessage") or "")))
        else:
            raise DapError(f"bad entry in 'breakpoints': {b!r} (a site name, or an object with 'site')")
    return out


def _tdb_message(e: TdbError) -> str:
    return e.message or f"{e.code.name} ({e.reason})"


class DebugAdapter:
    """Serves one DAP connection. `serve(reader)` returns when the client disconnects or leaves."""

    def __init__(self, channel: Channel):
        self.out = channel
        self.client: TdbClient | None = None
        self.session: Session | None = None
        self.info: ModelInfo | None = None
        self.client_caps: dict[str, Any] = {}
        self.launch_args: dict[str, Any] = {}
        self.handles = Handles()
        self.children: dict[tuple[int, str], Child] = {}
        self.bps: dict[str, list[DapBreakpoint]] = {"function": [], "source": [], "data": [], "launch": []}
        self.server_bps: dict[int, DapBreakpoint] = {}
        self._bp_ids = itertools.count(1)
        self._threads: dict[str, int] = {}
        self._run_id = ""
        self._running_run = False
        self._stop_site = ""
        self._stop_hits: tuple[int, ...] = ()
        self._own_resumes = 0
        self._configured = False
        self._terminated_sent = False
        self._closing = False
        self._progress: set[str] = set()
        self._stream: EventStream | None = None
        self._pump: threading.Thread | None = None
        self._order = threading.RLock()
        self._after: list[Callable[[], None]] = []
        # request queue and cancellation
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._pending: dict[int, str] = {}          # request seq -> "queued" | "running" | "cancelled"
        self._pending_lock = threading.Lock()
        self._inflight_read_only = False
        self._shut = False
        self.done = threading.Event()

    # -- the connection ---------------------------------------------------------------------------

    def serve(self, reader: BinaryIO) -> None:
        self.reader = threading.Thread(target=self._read_loop, args=(reader,), name="tdb-dap-reader", daemon=True)
        self.reader.start()
        try:
            while not self.done.is_set():
                request = self._queue.get()
                if request is None:
                    break
                self._handle(request)
        finally:
            self._shutdown()

    def _read_loop(self, reader: BinaryIO) -> None:
        while True:
            try:
                msg = read_message(reader)
            except FramingError as e:
                log.warning("dropping a malformed message: %s", e)
                self.out.event("output", {"category": "stderr", "output": f"tdb dap: malformed message: {e}\n"})
                continue
            except (OSError, ValueError):
                msg = None
            if msg is None:
                self._queue.put(None)
                return
            if msg.get("type") != "request":
                continue                                # responses to reverse requests: we send none
            if msg.get("command") == "cancel":
                self._cancel(msg)
                continue
            with self._pending_lock:
                if isinstance(msg.get("seq"), int):
                    self._pending[msg["seq"]] = "queued"
            self._queue.put(msg)

    def _cancel(self, request: dict[str, Any]) -> None:
        """Cancel a queued request, or a read-only one in flight (its result is dropped)."""
        args = request.get("arguments") or {}
        if "progressId" in args:
            self.out.error(request, "tdb progress cannot be cancelled from the IDE")
            return
        rid = args.get("requestId")
        with self._pending_lock:
            state = self._pending.get(rid)
            if state == "queued" or (state == "running" and self._inflight_read_only):
                self._pending[rid] = "cancelled"
        self.out.response(request)

    def _handle(self, request: dict[str, Any]) -> None:
        seq, command = request.get("seq"), request.get("command")
        with self._pending_lock:
            if self._pending.get(seq) == "cancelled":
                self._pending.pop(seq, None)
                self.out.error(request, "cancelled", show_user=False)
                return
            self._pending[seq] = "running"
            self._inflight_read_only = command in READ_ONLY
        with self._order:
            try:
                fn = _HANDLERS.get(command) if isinstance(command, str) else None
                if fn is None:
                    raise DapError(f"unknown request {command!r}")
                args = request.get("arguments") or {}
                if not isinstance(args, dict):
                    raise DapError("arguments must be an object")
                body = fn(self, args)
                with self._pending_lock:
                    cancelled = self._pending.get(seq) == "cancelled"
                if cancelled:
                    self.out.error(request, "cancelled", show_user=False)
                else:
                    self.out.response(request, body if body is not None else {})
            except (DapError, PatchSyntaxError) as e:
                self.out.error(request, str(e))
            except TdbError as e:
                self.out.error(request, _tdb_message(e))
            except (KeyError, TypeError, ValueError) as e:
                self.out.error(request, f"bad arguments for {command!r}: {type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - the adapter must survive a bug in one handler
                log.exception("internal error handling %s", command)
                self.out.error(request, f"internal error in the tdb adapter: {type(e).__name__}: {e}")
            finally:
                with self._pending_lock:
                    self._pending.pop(seq, None)
                    self._inflight_read_only = False
                after, self._after = self._after, []
                for f in after:
                    f()

    def _shutdown(self) -> None:
        """Close the tdb session (which ends its run) and the connection to the server; idempotent."""
        self._closing = True
        if self._shut:
            return
        self._shut = True
        if self._stream is not None:
            self._stream.close()
        if self.session is not None:
            try:
                self.session.close()
            except TdbError:
                pass
        if self.client is not None:
            self.client.close()
        self.done.set()

    # -- helpers ----------------------------------------------------------------------------------

    def _need_session(self) -> Session:
        if self.session is None:
            raise DapError("no debug session yet: send launch first")
        return self.session

    def _line(self, index0: int) -> int:
        return index0 + (1 if self.client_caps.get("linesStartAt1", True) else 0)

    def _index0(self, line: int) -> int:
        return line - (1 if self.client_caps.get("linesStartAt1", True) else 0)

    def _source(self) -> dict[str, Any]:
        """The virtual site listing; `.tdbsites` is the language the VS Code manifest allows breakpoints in."""
        name = re.sub(r"[^\w.-]+", "_", self.info.name if self.info else "model")
        return {"name": f"{name}.tdbsites", "sourceReference": SOURCE_REFERENCE, "origin": "tdb: the model's sites"}

    def _site_line(self, site: str) -> int:
        names = self.info.site_names if self.info else []
        return self._line(names.index(site)) if site in names else 0

    def _dims_of(self, name: str) -> tuple[str, ...] | None:
        dims = unit_dims(name)
        if dims is not None:
            return dims
        for s in self.info.sites if self.info else ():
            if s.name == name:
                return s.dims
        return None

    def _stop_target(self) -> str:
        """What `x` is at this stop: the unit of a unit breakpoint that stopped here, else the site."""
        for sid in self._stop_hits:
            bp = self.server_bps.get(sid)
            if bp is not None and bp.spec is not None and unit_dims(bp.spec.site) is not None:
                return bp.spec.site
        return self._stop_site

    def _thread_id(self, run_id: str) -> int:
        if run_id not in self._threads:
            self._threads[run_id] = len(self._threads) + 1
        return self._threads[run_id]

    def _check_thread(self, args: dict[str, Any]) -> None:
        tid = args.get("threadId")
        if tid is not None and (not self._run_id or tid != self._thread_id(self._run_id)):
            raise DapError(f"unknown thread {tid!r}: the run's thread is "
                           f"{self._thread_id(self._run_id) if self._run_id else 'not started yet'}")

    def _send_terminated(self) -> None:
        if not self._terminated_sent:
            self._terminated_sent = True
            self.out.event("terminated", {})

    def _progress_on(self) -> bool:
        return bool(self.client_caps.get("supportsProgressReporting"))

    # -- breakpoints ------------------------------------------------------------------------------

    def _bp_body(self, bp: DapBreakpoint) -> dict[str, Any]:
        body: dict[str, Any] = {"id": bp.id, "verified": bp.verified}
        if bp.message:
            body["message"] = bp.message
        if bp.kind == "source" and bp.line is not None:
            body["source"], body["line"] = self._source(), bp.line
        return body

    def _sync(self) -> None:
        """Send the union of the IDE's breakpoints to the server (SetBreakpoints replaces the set)."""
        if self.session is None:
            for bp in self._all_bps():
                if bp.spec is not None:
                    bp.verified, bp.message = False, "pending: checked when the debug session starts"
            return
        if self.launch_args.get("noDebug"):
            return
        wanted = [bp for bp in self._all_bps() if bp.spec is not None]
        try:
            statuses = self.session.set_breakpoints([bp.spec for bp in wanted])
            good = wanted
        except TdbError as e:
            if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            good = []
            for bp in wanted:           # find the breakpoints the server refuses (bad condition ...)
                try:
                    self.session.set_breakpoints([bp.spec])
                    good.append(bp)
                except TdbError as one:
                    bp.verified, bp.message = False, _tdb_message(one)
            statuses = self.session.set_breakpoints([bp.spec for bp in good])
        self.server_bps = {}
        for bp, st in zip(good, statuses):
            self.server_bps[st.id] = bp
            bp.verified, bp.message = st.verified, st.message

    def _all_bps(self) -> list[DapBreakpoint]:
        return [*self.bps["function"], *self.bps["source"], *self.bps["data"], *self.bps["launch"]]

    def _replace_bps(self, kind: str, bps: list[DapBreakpoint]) -> dict[str, Any]:
        self.bps[kind] = bps
        self._sync()
        return {"breakpoints": [self._bp_body(bp) for bp in bps]}

    # -- requests: lifecycle ------------------------------------------------------------------------

    def initialize(self, args: dict[str, Any]) -> dict[str, Any]:
        self.client_caps = dict(args)
        return dict(CAPABILITIES)

    def launch(self, args: dict[str, Any]) -> None:
        if self.session is not None:
            raise DapError("this debug session is already launched")
        prompt, tokens = args.get("prompt"), args.get("tokens")
        if args.get("generate"):
            raise DapError("'generate' is not supported yet: the tdb server runs one forward pass per launch "
                           "(there is no generation in its protocol); remove 'generate' from the launch configuration")
        if (prompt is None) == (tokens is None):
            raise DapError("give exactly one of 'prompt' (text) or 'tokens' (token ids) in the launch configuration")
        if prompt is not None and not (isinstance(prompt, str) and prompt or isinstance(prompt, list) and prompt
                                       and all(isinstance(p, str) and p for p in prompt)):
            raise DapError("'prompt' must be a non-empty string (or a list of them, for a batch)")
        if tokens is not None:
            rows = tokens if tokens and all(isinstance(t, list) for t in tokens) else [tokens]
            if not rows or not all(isinstance(r, list) and r and all(isinstance(i, int) and not isinstance(i, bool)
                                                                      for i in r) for r in rows):
                raise DapError("'tokens' must be a non-empty list of token ids (or a list of such lists, for a batch)")
            tokens = rows
        launch_bps = _launch_breakpoints(args.get("breakpoints"))
        client = self._connect(args)
        try:
            info = client.model_info()
            if prompt is not None and not info.has_tokenizer:
                raise DapError(f"model {info.name} has no tokenizer: give 'tokens' instead of 'prompt'")
            for b, row in enumerate(tokens or []):
                bad = [i for i in row if not 0 <= i < info.vocab_size]
                if bad:
                    raise DapError(f"token id {bad[0]} (sequence {b}) is outside the vocabulary [0, {info.vocab_size})")
                if info.max_positions and len(row) > info.max_positions:
                    raise DapError(f"sequence {b} has {len(row)} tokens; {info.name} takes at most "
                                   f"{info.max_positions}")
            session = client.session(name=str(args.get("name") or "dap"))
        except BaseException:
            client.close()
            raise
        self.client, self.info, self.session = client, info, session
        self.launch_args = {**args, "tokens": tokens}
        self.bps["launch"] = [DapBreakpoint("launch", next(self._bp_ids), spec) for spec in launch_bps]
        self._stream = session.events()
        self._pump = threading.Thread(target=self._pump_events, name="tdb-dap-events", daemon=True)
        self._pump.start()
        self._sync()
        changed = [bp for bp in self._all_bps() if bp.spec is not None and bp.kind != "launch"]

        def ready() -> None:
            for bp in changed:
                self.out.event("breakpoint", {"reason": "changed", "breakpoint": self._bp_body(bp)})
            for bp in self.bps["launch"]:
                if not bp.verified:
                    self.out.event("output", {"category": "stderr", "output": f"tdb: breakpoint {bp.spec.site!r} "
                                              f"of the launch configuration: {bp.message}\n"})
            self.out.event("initialized")
        self._after.append(ready)

    def _connect(self, args: dict[str, Any]) -> TdbClient:
        if args.get("server"):
            return backend.connect(str(args["server"]))
        what = args.get("model") or "the bundled model"
        pid = "tdb-load-model"
        if self._progress_on():
            self.out.event("progressStart", {"progressId": pid, "title": f"tdb: loading {what}", "cancellable": False})
        try:
            server = backend.embedded_server(args.get("model"), str(args.get("device", "auto")),
                                             str(args.get("dtype", "auto")))
        except Exception as e:  # noqa: BLE001 - any failure to load is the user's launch error
            raise DapError(f"cannot start a tdb server on {what}: {getattr(e, 'message', None) or e}") from None
        finally:
            if self._progress_on():
                self.out.event("progressEnd", {"progressId": pid})
        return backend.connect(server.address)

    def configurationDone(self, args: dict[str, Any]) -> None:
        session = self._need_session()
        if self._configured:
            return
        self._configured = True
        a = self.launch_args
        if a.get("noDebug"):
            session.set_breakpoints([])
        try:
            st = session.launch(a.get("prompt"), token_ids=a.get("tokens"), prepend_bos=bool(a.get("prependBos")),
                                capture=list(a.get("capture") or ()), stop_on_entry=bool(a.get("stopOnEntry")),
                                wait=False)
        except TdbError:
            self._after.append(self._send_terminated)
            raise
        self._run_id, self._running_run = st.run_id, True
        self._thread_id(st.run_id)

    def disconnect(self, args: dict[str, Any]) -> None:
        self._closing = True
        self.done.set()
        self._shutdown()

    def terminate(self, args: dict[str, Any]) -> None:
        session = self._need_session()
        if self._running_run:
            self.handles.clear()
            session.terminate(wait=False)
        else:
            self._after.append(self._send_terminated)

    # -- requests: breakpoints --------------------------------------------------------------------

    def setFunctionBreakpoints(self, args: dict[str, Any]) -> dict[str, Any]:
        out = []
        for b in args.get("breakpoints") or []:
            name = str(b.get("name", "")).strip()
            spec = Breakpoint(name, condition=b.get("condition") or "", hit_condition=b.get("hitCondition") or "")
            bp = DapBreakpoint("function", next(self._bp_ids), spec if name else None)
            if not name:
                bp.message = "a function breakpoint needs a site name, e.g. blocks.1.attn.out"
            out.append(bp)
        return self._replace_bps("function", out)

    def setBreakpoints(self, args: dict[str, Any]) -> dict[str, Any]:
        source = args.get("source") or {}
        ours = source.get("sourceReference") == SOURCE_REFERENCE or (
            self.info is not None and source.get("name") == self._source()["name"])
        requested = args.get("breakpoints")
        if requested is None:
            requested = [{"line": line} for line in args.get("lines") or []]
        names = self.info.site_names if self.info else []
        out = []
        for b in requested:
            line = int(b.get("line", 0))
            bp = DapBreakpoint("source", next(self._bp_ids), None, line=line)
            i = self._index0(line)
            if not ours:
                bp.message = "tdb breakpoints go in the model's site listing (or use function breakpoints)"
            elif not 0 <= i < len(names):
                bp.message = f"line {line} is not a site of {self.info.name if self.info else 'the model'}"
            else:
                bp.spec = Breakpoint(names[i], condition=b.get("condition") or "",
                                     hit_condition=b.get("hitCondition") or "", log_message=b.get("logMessage") or "")
            out.append(bp)
        return self._replace_bps("source", out)

    def breakpointLocations(self, args: dict[str, Any]) -> dict[str, Any]:
        source = args.get("source") or {}
        if source.get("sourceReference") != SOURCE_REFERENCE or self.info is None:
            return {"breakpoints": []}
        line = int(args["line"])
        end = int(args.get("endLine") or line)
        n = len(self.info.site_names)
        return {"breakpoints": [{"line": ln} for ln in range(line, end + 1) if 0 <= self._index0(ln) < n]}

    def setExceptionBreakpoints(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"breakpoints": []}      # no filters: an exception in the model always stops the run

    def dataBreakpointInfo(self, args: dict[str, Any]) -> dict[str, Any]:
        name = str(args.get("name", ""))
        ref = args.get("variablesReference")
        child = self.children.get((ref, name)) if ref else None
        text = child.evaluate_name if child else name
        try:
            target = parse_target(text, self._dims_of, self._stop_target())
        except PatchSyntaxError as e:
            return {"dataId": None, "description": f"not watchable: {e}"}
        if target.batch or target.positions or target.heads or target.neurons:
            return {"dataId": None, "description": f"watch the whole site or unit ({target.name}), not a slice of it"}
        return {"dataId": target.name, "accessTypes": ["write"], "canPersist": True,
                "description": f"{target.name}: stop when the condition holds (default {DEFAULT_WATCH})"}

    def setDataBreakpoints(self, args: dict[str, Any]) -> dict[str, Any]:
        out = []
        for b in args.get("breakpoints") or []:
            bp = DapBreakpoint("data", next(self._bp_ids), None)
            if b.get("accessType", "write") != "write":
                bp.message = "sites are only written: watch them with accessType 'write'"
            else:
                bp.spec = Breakpoint(str(b.get("dataId", "")), condition=b.get("condition") or DEFAULT_WATCH,
                                     hit_condition=b.get("hitCondition") or "")
            out.append(bp)
        return self._replace_bps("data", out)

    # -- requests: execution ----------------------------------------------------------------------

    def _resume(self, args: dict[str, Any], step: str | None) -> None:
        session = self._need_session()
        self._check_thread(args)
        self.handles.clear()
        self.children.clear()
        self._own_resumes += 1
        try:
            if step is None:
                session.continue_(wait=False)
            else:
                session.step(step, wait=False)
        except TdbError:
            self._own_resumes -= 1
            raise

    def continue_(self, args: dict[str, Any]) -> dict[str, Any]:
        self._resume(args, None)
        return {"allThreadsContinued": True}

    def next(self, args: dict[str, Any]) -> None:
        self._resume(args, "into" if args.get("granularity") == "instruction" else "over")

    def stepIn(self, args: dict[str, Any]) -> None:
        self._resume(args, "into")

    def stepOut(self, args: dict[str, Any]) -> None:
        self._resume(args, "out")

    def pause(self, args: dict[str, Any]) -> None:
        self._check_thread(args)
        self._need_session().pause(wait=False)

    # -- requests: inspection ---------------------------------------------------------------------

    def threads(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self._run_id or not self._running_run:
            return {"threads": []}
        a = self.launch_args
        what = repr(a["prompt"])[:40] if a.get("prompt") is not None else f"{sum(map(len, a['tokens']))} tokens"
        return {"threads": [{"id": self._thread_id(self._run_id), "name": f"run {self._run_id}: {what}"}]}

    def stackTrace(self, args: dict[str, Any]) -> dict[str, Any]:
        session = self._need_session()
        self._check_thread(args)
        frames = session.stack()
        start = int(args.get("startFrame") or 0)
        levels = int(args.get("levels") or 0)
        shown = frames[start:start + levels] if levels else frames[start:]
        line = self._site_line(self._stop_site)
        out = []
        for f in shown:
            column = 1 if line and self.client_caps.get("columnsStartAt1", True) else 0
            fr: dict[str, Any] = {"id": self.handles.add(("frame", f.id, f.site)), "name": f.name,
                                  "line": line, "column": column}
            if line:
                fr["source"] = self._source()
            out.append(fr)
        return {"stackFrames": out, "totalFrames": len(frames)}

    def scopes(self, args: dict[str, Any]) -> dict[str, Any]:
        _, fid, _site = self.handles.get(args["frameId"], "frame")
        out = []
        for s in self._need_session().scopes(fid):
            h = self.handles.add(("server", s.variables_reference, "scope"))
            scope: dict[str, Any] = {"name": s.name, "variablesReference": h, "namedVariables": s.named_variables,
                                     "expensive": False}
            if s.name == "Value":
                scope["presentationHint"] = "locals"
            out.append(scope)
        return {"scopes": out}

    def variables(self, args: dict[str, Any]) -> dict[str, Any]:
        ref = args["variablesReference"]
        item = self.handles.get(ref, ("server", "eval"))
        filt = args.get("filter")
        start, count = int(args.get("start") or 0), int(args.get("count") or 0)
        if item[0] == "eval":
            return {"variables": [] if filt == "named" else self._eval_children(ref, item, start, count)}
        _, sref, kind = item
        if (kind == "tensor" and filt == "named") or (kind == "scope" and filt == "indexed"):
            return {"variables": []}
        out = []
        for v in self._need_session().variables(sref, start, count):
            h = self.handles.add(("server", v.variables_reference, "tensor")) if v.variables_reference else 0
            var: dict[str, Any] = {"name": v.name, "value": v.value, "variablesReference": h}
            if v.type:
                var["type"] = v.type
            if v.evaluate_name:
                var["evaluateName"] = v.evaluate_name
                self.children[(ref, v.name)] = Child(v.evaluate_name, h, v.indexed_variables)
            if h and v.indexed_variables:
                var["indexedVariables"] = v.indexed_variables
            out.append(var)
        return {"variables": out}

    def _eval_var(self, expr: str, r: EvalResult) -> dict[str, Any]:
        """An evaluate result as a DAP value: summaries for tensors, expandable by the first dim."""
        s = r.summary
        if s is None or s.numel <= 1 or not s.shape:
            return {"result": r.text, "variablesReference": 0}
        text = r.text if s.numel <= 8 else _summary_text(s.shape, s.mean, s.norm, s.min, s.max, s.nan_count)
        h = self.handles.add(("eval", expr, tuple(s.shape), r.value))
        return {"result": text, "type": f"tensor {s.dtype} {list(s.shape)}", "variablesReference": h,
                "indexedVariables": s.shape[0]}

    def _eval_children(self, ref: int, item: tuple, start: int, count: int) -> list[dict[str, Any]]:
        _, expr, shape, value = item
        n = shape[0]
        end = min(n, start + count) if count else n
        out = []
        for i in range(max(start, 0), end):
            name, cexpr = f"[{i}]", _child_expr(expr, i)
            if value is not None:
                a = np.asarray(value[i])
                if a.ndim == 0:
                    var = {"name": name, "value": f"{a.item():.6g}", "variablesReference": 0}
                else:
                    h = self.handles.add(("eval", cexpr, tuple(a.shape), a))
                    var = {"name": name, "value": _np_summary(a) if a.size > 8 else np.array2string(a, precision=4),
                           "type": f"tensor {a.dtype} {list(a.shape)}", "variablesReference": h,
                           "indexedVariables": a.shape[0]}
            else:
                r = self._need_session().evaluate(cexpr)
                ev = self._eval_var(cexpr, r)
                var = {"name": name, "value": ev["result"], "variablesReference": ev["variablesReference"]}
                for k in ("type", "indexedVariables"):
                    if k in ev:
                        var[k] = ev[k]
            var["evaluateName"] = cexpr
            self.children[(ref, name)] = Child(cexpr, var["variablesReference"], var.get("indexedVariables", 0))
            out.append(var)
        return out

    def evaluate(self, args: dict[str, Any]) -> dict[str, Any]:
        session = self._need_session()
        expr = str(args["expression"])
        if args.get("context") in (None, "repl") and (assignment := parse_assignment(expr)) is not None:
            target, value = assignment
            return {"result": self._patch(target, value), "variablesReference": 0}
        fid = 0
        if args.get("frameId") is not None:
            fid = self.handles.get(args["frameId"], "frame")[1]
        return self._eval_var(expr, session.evaluate(expr, frame=fid))

    def source(self, args: dict[str, Any]) -> dict[str, Any]:
        ref = args.get("sourceReference") or (args.get("source") or {}).get("sourceReference")
        if ref != SOURCE_REFERENCE or self.info is None:
            raise DapError(f"no source {ref!r}: the only source is the model's site listing ({SOURCE_REFERENCE})")
        width = max(len(s.name) for s in self.info.sites) + 2
        lines = [f"{s.name:<{width}}[{', '.join(s.dims)}]" + ("" if s.verified else "   (never reached)")
                 for s in self.info.sites]
        return {"content": "\n".join(lines) + "\n", "mimeType": "text/plain"}

    # -- requests: patching -----------------------------------------------------------------------

    def _patch(self, target_text: str, value_text: str) -> str:
        session = self._need_session()
        target = parse_target(target_text, self._dims_of, self._stop_target())
        pv = parse_value(value_text)
        value = None
        if pv.op == "set":
            value = np.asarray(pv.value, dtype=np.float32)
        elif pv.op in ("add", "scale"):
            value = float(pv.value)
        r = session.patch(target.name, pv.op, value, batch=target.batch, positions=target.positions,
                          heads=target.heads, neurons=target.neurons)
        return r.message or f"patched {target.describe()}"

    def _new_value(self, evaluate_name: str, message: str) -> dict[str, Any]:
        try:
            return self._eval_var(evaluate_name, self._need_session().evaluate(evaluate_name))
        except TdbError:
            return {"result": message, "variablesReference": 0}   # not computed yet: a pending patch

    def _after_patch(self) -> None:
        if self.client_caps.get("supportsInvalidatedEvent"):
            self._after.append(lambda: self.out.event("invalidated", {"areas": ["variables"]}))

    def setVariable(self, args: dict[str, Any]) -> dict[str, Any]:
        ref, name = args["variablesReference"], str(args["name"])
        self.handles.get(ref, ("server", "eval"))
        child = self.children.get((ref, name))
        if child is None:
            raise DapError(f"{name} cannot be patched: only tensors of this stop can "
                           "(sites, units, x and their slices)")
        message = self._patch(child.evaluate_name, str(args["value"]))
        new = self._new_value(child.evaluate_name, message)
        self._after_patch()
        body: dict[str, Any] = {"value": new["result"], "variablesReference": child.handle or new["variablesReference"]}
        if child.handle and child.indexed:
            body["indexedVariables"] = child.indexed
        elif "indexedVariables" in new:
            body["indexedVariables"] = new["indexedVariables"]
        if "type" in new:
            body["type"] = new["type"]
        return body

    def setExpression(self, args: dict[str, Any]) -> dict[str, Any]:
        expr = str(args["expression"])
        message = self._patch(expr, str(args["value"]))
        new = self._new_value(expr, message)
        self._after_patch()
        body = {"value": new["result"], "variablesReference": new["variablesReference"]}
        for k in ("type", "indexedVariables"):
            if k in new:
                body[k] = new[k]
        return body

    # -- server events -> DAP events --------------------------------------------------------------

    def _pump_events(self) -> None:
        stream = self._stream
        try:
            for ev in stream:
                with self._order:
                    if self._closing:
                        return
                    self._on_event(ev)
        except TdbError as e:
            with self._order:
                if not self._closing:
                    self.out.event("output", {"category": "stderr",
                                              "output": f"tdb: lost the server's event stream: {_tdb_message(e)}\n"})
                    self._send_terminated()

    def _on_event(self, ev: Event) -> None:
        kind = ev.kind
        if kind == "run_started":
            self.out.event("thread", {"reason": "started", "threadId": self._thread_id(ev.run_id)})
        elif kind == "stopped" and ev.stop is not None:
            stop = ev.stop
            self.handles.clear()
            self.children.clear()
            self._stop_site, self._stop_hits = stop.site, stop.hit_breakpoint_ids
            hits = [self.server_bps[i] for i in stop.hit_breakpoint_ids if i in self.server_bps]
            reason = _STOP_REASONS.get(stop.reason, stop.reason)
            if reason == "breakpoint" and hits and all(b.kind == "data" for b in hits):
                reason = "data breakpoint"
            elif reason == "breakpoint" and hits and all(b.kind in ("function", "launch") for b in hits):
                reason = "function breakpoint"
            body: dict[str, Any] = {"reason": reason, "threadId": self._thread_id(ev.run_id),
                                    "description": stop.description, "allThreadsStopped": True,
                                    "hitBreakpointIds": [b.id for b in hits]}
            if stop.exception:
                body["text"] = stop.exception
            self.out.event("stopped", body)
        elif kind == "continued":
            if self._own_resumes > 0:
                self._own_resumes -= 1          # the IDE knows: it asked for the resume
                return
            self.handles.clear()
            self.children.clear()
            self.out.event("continued", {"threadId": self._thread_id(ev.run_id), "allThreadsContinued": True})
        elif kind == "output":
            site = ev.data.get("site", "")
            body = {"category": "stderr" if ev.data.get("category") == "stderr" else "console",
                    "output": ev.text if ev.text.endswith("\n") else ev.text + "\n"}
            if site and self._site_line(site):
                body["source"], body["line"] = self._source(), self._site_line(site)
            self.out.event("output", body)
        elif kind == "progress":
            self._on_progress(ev)
        elif kind == "invalidated":
            if self.client_caps.get("supportsInvalidatedEvent"):
                self.out.event("invalidated", {"areas": ["all"]})
        elif kind == "run_exited" and ev.result is not None:
            self._on_exit(ev)
        elif kind == "terminated" and not ev.run_id:
            self._send_terminated()             # the server closed the session (idle timeout, shutdown)

    def _on_progress(self, ev: Event) -> None:
        if not self._progress_on():
            return
        pid = f"tdb-{ev.data.get('id') or 'progress'}"
        pct = max(0.0, min(100.0, 100.0 * float(ev.data.get("fraction") or 0.0)))
        if pid not in self._progress:
            self._progress.add(pid)
            self.out.event("progressStart", {"progressId": pid, "title": ev.data.get("title") or "tdb",
                                             "message": ev.text, "percentage": pct, "cancellable": False})
        elif pct >= 100.0:
            self._progress.discard(pid)
            self.out.event("progressEnd", {"progressId": pid, "message": ev.text})
        else:
            self.out.event("progressUpdate", {"progressId": pid, "message": ev.text, "percentage": pct})

    def _on_exit(self, ev: Event) -> None:
        result = ev.result
        tid = self._thread_id(ev.run_id)
        if ev.run_id == self._run_id:
            self._running_run = False
        self.handles.clear()
        self.children.clear()
        line = f"tdb: run {result.run_id} {result.state}"
        if result.exception:
            line += f": {result.exception}"
        for b, top in enumerate(result.top):
            tops = ", ".join(f"{t.text!r} {t.prob:.3f}" for t in top[:5])
            line += f"\n  next token{f' (batch {b})' if len(result.top) > 1 else ''}: {tops}"
        self.out.event("output", {"category": "console", "output": line + "\n"})
        self.out.event("thread", {"reason": "exited", "threadId": tid})
        self.out.event("exited", {"exitCode": _EXIT_CODES.get(result.state, 1)})
        self._send_terminated()


_HANDLERS: dict[str, Callable[[DebugAdapter, dict[str, Any]], Any]] = {
    "initialize": DebugAdapter.initialize,
    "launch": DebugAdapter.launch,
    "configurationDone": DebugAdapter.configurationDone,
    "disconnect": DebugAdapter.disconnect,
    "terminate": DebugAdapter.terminate,
    "setFunctionBreakpoints": DebugAdapter.setFunctionBreakpoints,
    "setBreakpoints": DebugAdapter.setBreakpoints,
    "breakpointLocations": DebugAdapter.breakpointLocations,
    "setExceptionBreakpoints": DebugAdapter.setExceptionBreakpoints,
    "dataBreakpointInfo": DebugAdapter.dataBreakpointInfo,
    "setDataBreakpoints": DebugAdapter.setDataBreakpoints,
    "continue": DebugAdapter.continue_,
    "next": DebugAdapter.next,
    "stepIn": DebugAdapter.stepIn,
    "stepOut": DebugAdapter.stepOut,
    "pause": DebugAdapter.pause,
    "threads": DebugAdapter.threads,
    "stackTrace": DebugAdapter.stackTrace,
    "scopes": DebugAdapter.scopes,
    "variables": DebugAdapter.variables,
    "evaluate": DebugAdapter.evaluate,
    "source": DebugAdapter.source,
    "setVariable": DebugAdapter.setVariable,
    "setExpression": DebugAdapter.setExpression,
}
