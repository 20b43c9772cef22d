"""Request handlers: one small method per DAP request, `<command>_request(arguments) -> body`, found
by name by the transport. Each turns the request into tdb calls through the typed client and the
components (breakpoint book, variable handles, site listing) and answers with the DAP body; how DAP
maps onto tdb is in adapter.py. Patches (setVariable, setExpression, a REPL assignment) are parsed by
patching.py and checked by the server.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..errors import TdbError
from . import backend
from .breakpoints import DEFAULT_WATCH, DapBreakpoint, breakpoint_body
from .events import EventTranslator
from .launch import LaunchConfig, connect_server, server_address, start_embedded
from .patching import PatchSyntaxError, parse_assignment, parse_target, parse_value
from .protocol import DapError, tdb_message
from .state import DebugState

Body = dict[str, Any]

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

# Requests that change nothing: `cancel` may drop their result while they are in flight.
READ_ONLY = frozenset({"threads", "stackTrace", "scopes", "variables", "evaluate", "source",
                       "dataBreakpointInfo", "breakpointLocations"})


# Requests a client of a listener with --listen-token may send before it presents the credential.
BEFORE_CREDENTIAL = frozenset({"initialize", "launch", "disconnect"})


class RequestHandlers:
    """The requests of one debug session, over its state and its event translation."""

    def __init__(self, state: DebugState, events: EventTranslator):
        self.state = state
        self.events = events
        self.out = state.out

    def guard(self, command: str) -> None:
        """Refuse every request but those of BEFORE_CREDENTIAL until the client presented the listener's credential."""
        if not self.state.authorized and command not in BEFORE_CREDENTIAL:
            raise DapError("this tdb dap listener requires its credential: launch with \"adapterToken\" first")

    # -- lifecycle --------------------------------------------------------------------------------

    def initialize_request(self, args: Body) -> Body:
        self.state.client_caps = dict(args)
        return dict(CAPABILITIES)

    def launch_request(self, args: Body) -> None:
        """Answered at once: a launch whose model must be loaded first loads it after the response,
        reporting progress, and sends `initialized` once the session is ready (clients time out on a
        slow launch response, never on a late `initialized`)."""
        st = self.state
        if not st.authorized:
            if not st.options.admits(args.get("adapterToken")):
                st.after_response(st.shutdown)      # no second try on this connection
                raise DapError("this tdb dap listener requires its credential: put it in the launch "
                               "configuration as \"adapterToken\" (the --listen-token it was started with)")
            st.authorized = True
        if st.session is not None or st.loading:
            raise DapError("this debug session is already launched")
        config = LaunchConfig.parse(args)
        address = server_address(args, st.options)
        if address:
            self._open(config, args, connect_server(address, args, st.options))
            st.after_response(self._launched)
            return
        path = backend.model_path(args.get("model"), st.options.data_dirs)
        device, dtype = str(args.get("device", "auto")), str(args.get("dtype", "auto"))
        if backend.is_loaded(path, device, dtype):
            self._open(config, args, start_embedded(path, args, st.options))
            st.after_response(self._launched)
            return
        st.loading = True
        st.launch_args = dict(args)
        st.after_response(lambda: threading.Thread(target=self._load, args=(config, args, path),
                                                   name="tdb-dap-load", daemon=True).start())

    def _load(self, config: LaunchConfig, args: Body, path: str) -> None:
        """Load the model (a thread of its own, after launch's response), then open the session."""
        st, pid = self.state, "tdb-load-model"
        what = args.get("model") or "the bundled model"
        with st.transport.order:
            if st.progress_on():
                self.out.event("progressStart", {"progressId": pid, "title": f"tdb: loading {what}",
                                                 "cancellable": False})
            else:
                self.out.event("output", {"category": "console", "output": f"tdb: loading {what}...\n"})
        client: Any = None
        failure = ""
        try:
            client = start_embedded(path, args, st.options)
        except (DapError, TdbError) as e:
            failure = str(e) if isinstance(e, DapError) else tdb_message(e)
        with st.transport.order:
            if st.progress_on():
                self.out.event("progressEnd", {"progressId": pid})
            st.loading = False
            if st.closing:
                if client is not None:
                    client.close()
                return
            try:
                if client is None:
                    raise DapError(failure)
                self._open(config, args, client)
            except (DapError, TdbError) as e:
                text = str(e) if isinstance(e, DapError) else tdb_message(e)
                self.out.event("output", {"category": "stderr", "output": f"tdb: launch failed: {text}\n"})
                st.send_terminated()
                return
            self._launched()

    def _open(self, config: LaunchConfig, args: Body, client: Any) -> None:
        """The tdb session on `client`'s server: the model checked, events pumped, breakpoints sent."""
        st = self.state
        try:
            info = client.model_info()
            config.check_model(info)
            session = client.session(name=str(args.get("name") or "dap"))
        except BaseException:
            client.close()
            raise
        st.client, st.info, st.session = client, info, session
        st.launch_args = {**args, "tokens": config.tokens, "generate": config.generate}
        st.book.set_launch(config.breakpoints)
        self.events.start(session.events())
        st.sync_breakpoints()

    def _launched(self) -> None:
        """Once the session is open: breakpoints the server has now checked, launch ones it refused, initialized."""
        listing = self.state.listing
        for bp in self.state.book.all():
            if bp.spec is not None and bp.kind != "launch":
                self.out.event("breakpoint", {"reason": "changed", "breakpoint": breakpoint_body(bp, listing)})
        for bp in self.state.book.of("launch"):
            if not bp.verified and bp.spec is not None:
                self.out.event("output", {"category": "stderr", "output": f"tdb: breakpoint {bp.spec.site!r} "
                                          f"of the launch configuration: {bp.message}\n"})
        self.out.event("initialized")

    def configurationDone_request(self, args: Body) -> None:
        st = self.state
        session = st.need_session()
        if st.configured:
            return
        st.configured = True
        a = st.launch_args
        no_debug = bool(a.get("noDebug"))
        if no_debug:
            session.set_breakpoints([])
        try:
            status = session.launch(a.get("prompt"), token_ids=a.get("tokens"), prepend_bos=bool(a.get("prependBos")),
                                    capture=list(a.get("capture") or ()), generate=a.get("generate"),
                                    stop_on_entry=bool(a.get("stopOnEntry")) and not no_debug, wait=False)
        except TdbError:
            st.after_response(st.send_terminated)
            raise
        st.run.run_id, st.run.running = status.run_id, True
        st.run.thread_id(status.run_id)

    def disconnect_request(self, args: Body) -> None:
        self.state.closing = True
        self.state.transport.done.set()
        self.state.shutdown()

    def terminate_request(self, args: Body) -> None:
        st = self.state
        session = st.need_session()
        if st.run.running:
            st.vars.handles.clear()
            session.terminate(wait=False)
        else:
            st.after_response(st.send_terminated)

    # -- breakpoints ------------------------------------------------------------------------------

    def _answer(self, bps: list[DapBreakpoint]) -> Body:
        self.state.sync_breakpoints()
        listing = self.state.listing
        return {"breakpoints": [breakpoint_body(bp, listing) for bp in bps]}

    def setFunctionBreakpoints_request(self, args: Body) -> Body:
        return self._answer(self.state.book.set_function(args.get("breakpoints") or []))

    def setBreakpoints_request(self, args: Body) -> Body:
        """The breakpoints of the one source named (the others' stay as they are)."""
        requested = args.get("breakpoints")
        if requested is None:
            requested = [{"line": line} for line in args.get("lines") or []]
        source = args.get("source")
        if not isinstance(source, dict):
            raise DapError("setBreakpoints needs the source its breakpoints are in")
        return self._answer(self.state.book.set_source(source, requested, self.state.listing))

    def breakpointLocations_request(self, args: Body) -> Body:
        line = int(args["line"])
        end = int(args.get("endLine") or line)
        return {"breakpoints": self.state.listing.locations(args.get("source") or {}, line, end)}

    def setExceptionBreakpoints_request(self, args: Body) -> Body:
        return {"breakpoints": []}      # no filters: an exception in the model always stops the run

    def dataBreakpointInfo_request(self, args: Body) -> Body:
        st = self.state
        name = str(args.get("name", ""))
        ref = args.get("variablesReference")
        child = st.vars.child(ref, name) if ref else None
        try:
            target = parse_target(child.evaluate_name if child else name, st.dims_of, st.stop_target())
        except PatchSyntaxError as e:
            return {"dataId": None, "description": f"not watchable: {e}"}
        if target.batch or target.positions or target.heads or target.neurons:
            return {"dataId": None, "description": f"watch the whole site or unit ({target.name}), not a slice of it"}
        return {"dataId": target.name, "accessTypes": ["write"], "canPersist": True,
                "description": f"{target.name}: stop when the condition holds (default {DEFAULT_WATCH})"}

    def setDataBreakpoints_request(self, args: Body) -> Body:
        return self._answer(self.state.book.set_data(args.get("breakpoints") or []))

    # -- execution --------------------------------------------------------------------------------

    def _resume(self, args: Body, step: str | None) -> None:
        st = self.state
        session = st.need_session()
        st.run.check(args)
        st.vars.forget()
        st.run.own_resumes += 1
        try:
            if step is None:
                session.continue_(wait=False)
            else:
                session.step(step, wait=False)
        except TdbError:
            st.run.own_resumes -= 1
            raise

    def continue_request(self, args: Body) -> Body:
        self._resume(args, None)
        return {"allThreadsContinued": True}

    def next_request(self, args: Body) -> None:
        """Step Over; at a token boundary of a generation, to the next token boundary (tdb's token step)."""
        if args.get("granularity") == "instruction":
            self._resume(args, "into")
        else:
            self._resume(args, "token" if self.state.at_token_boundary() else "over")

    def stepIn_request(self, args: Body) -> None:
        self._resume(args, "into")

    def stepOut_request(self, args: Body) -> None:
        self._resume(args, "out")

    def pause_request(self, args: Body) -> None:
        self.state.run.check(args)
        self.state.need_session().pause(wait=False)

    # -- inspection -------------------------------------------------------------------------------

    def threads_request(self, args: Body) -> Body:
        run = self.state.run
        if not run.run_id or not run.running:
            return {"threads": []}
        a = self.state.launch_args
        what = repr(a["prompt"])[:40] if a.get("prompt") is not None else f"{sum(map(len, a['tokens']))} tokens"
        return {"threads": [{"id": run.thread_id(run.run_id), "name": f"run {run.run_id}: {what}"}]}

    def stackTrace_request(self, args: Body) -> Body:
        st = self.state
        session = st.need_session()
        st.run.check(args)
        frames = session.stack()
        start = int(args.get("startFrame") or 0)
        levels = int(args.get("levels") or 0)
        shown = frames[start:start + levels] if levels else frames[start:]
        listing = st.listing
        line = listing.site_line(st.run.stop_site)
        columns_at1 = bool(st.client_caps.get("columnsStartAt1", True))
        return {"stackFrames": st.vars.stack_frames(shown, listing, line, columns_at1), "totalFrames": len(frames)}

    def scopes_request(self, args: Body) -> Body:
        st = self.state
        fid = st.vars.frame_id(args["frameId"])
        scopes = st.vars.scopes(st.need_session(), fid)
        if st.launch_args.get("generate") is not None:
            scopes.append(st.vars.generated_scope(st.run.generated, st.run.generated_ids))
        return {"scopes": scopes}

    def variables_request(self, args: Body) -> Body:
        st = self.state
        st.vars.handles.get(args["variablesReference"], ("server", "eval", "local"))     # a stale one fails first
        return {"variables": st.vars.variables(st.need_session(), args, st.stop_target())}

    def evaluate_request(self, args: Body) -> Body:
        st = self.state
        session = st.need_session()
        expr = str(args["expression"])
        context = args.get("context")
        if context in (None, "repl") and (assignment := parse_assignment(expr)) is not None:
            target, value = assignment
            return {"result": self._patch(target, value), "variablesReference": 0}
        fid = st.vars.frame_id(args["frameId"]) if args.get("frameId") is not None else 0
        if context == "hover":
            expr, modules_sites = self._hovered(expr, args)
            if modules_sites:
                return {"result": modules_sites, "variablesReference": 0}
        return st.vars.eval_var(expr, session.evaluate(expr, frame=fid))

    def _hovered(self, expr: str, args: Body) -> tuple[str, str]:
        """What a hover over `expr` evaluates: the dotted site name under the cursor, and "" (or, for a
        module's name, the text listing its sites). On a line of the listing, when the client says where
        (`source`, `line`), the hovered word is that line's site; a module's name alone (`blocks`,
        `blocks.1.attn`, as Neovim's <cexpr> reads a site name) answers the sites inside it."""
        listing = self.state.listing
        source, line = args.get("source"), args.get("line")
        if isinstance(source, dict) and isinstance(line, int) and listing.is_listing(source):
            site = listing.site_at(line)
            if site is not None and (expr == site or site.startswith(expr + ".") or expr in site.split(".")):
                return site, ""
        names = listing.site_names
        inside = [n for n in names if n.startswith(expr + ".")]
        if expr in names or not inside:
            return expr, ""
        shown = ", ".join(inside[:8]) + (", …" if len(inside) > 8 else "")
        return expr, f"{expr}: {len(inside)} sites ({shown}); hover a whole site name to see its value"

    def source_request(self, args: Body) -> Body:
        source = dict(args.get("source") or {})
        if args.get("sourceReference"):
            source["sourceReference"] = args["sourceReference"]
        return {"content": self.state.listing.content(source), "mimeType": "text/plain"}

    # -- patching ---------------------------------------------------------------------------------

    def _patch(self, target_text: str, value_text: str) -> str:
        st = self.state
        session = st.need_session()
        target = parse_target(target_text, st.dims_of, st.stop_target())
        pv = parse_value(value_text)
        value = None
        if pv.op == "set":
            value = np.asarray(pv.value, dtype=np.float32)
        elif pv.op in ("add", "scale"):
            value = float(pv.value)
        r = session.patch(target.name, pv.op, value, batch=target.batch, positions=target.positions,
                          heads=target.heads, neurons=target.neurons)
        return r.message or f"patched {target.describe()}"

    def _new_value(self, evaluate_name: str, message: str) -> Body:
        """The patched value re-evaluated; or the patch's message when it is not computed yet (pending)."""
        try:
            return self.state.vars.eval_var(evaluate_name, self.state.need_session().evaluate(evaluate_name))
        except TdbError:
            return {"result": message, "variablesReference": 0}

    def _after_patch(self) -> None:
        if self.state.invalidated_on():
            self.state.after_response(lambda: self.out.event("invalidated", {"areas": ["variables"]}))

    def setVariable_request(self, args: Body) -> Body:
        st = self.state
        ref, name = args["variablesReference"], str(args["name"])
        st.vars.handles.get(ref, ("server", "eval"))
        child = st.vars.child(ref, name)
        if child is None:
            raise DapError(f"{name} cannot be patched: only tensors of this stop can "
                           "(sites, units, x and their slices)")
        message = self._patch(child.evaluate_name, str(args["value"]))
        new = self._new_value(child.evaluate_name, message)
        self._after_patch()
        return st.vars.changed_value(new, child)

    def setExpression_request(self, args: Body) -> Body:
        expr = str(args["expression"])
        message = self._patch(expr, str(args["value"]))
        new = self._new_value(expr, message)
        self._after_patch()
        return self.state.vars.changed_value(new)
