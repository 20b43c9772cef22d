"""Event translation: the tdb session's event stream, pumped on its own thread, becomes DAP events.

    run_started   -> thread (started)
    stopped       -> stopped (reason "function breakpoint" / "data breakpoint" when every breakpoint
                     hit is of that kind); the stop's handles are forgotten
    continued     -> continued, unless the IDE asked for the resume itself (it knows)
    output        -> output (log points carry the listing line of their site)
    token         -> output: the token generated and the text so far (kept for the Generated scope)
    progress      -> progressStart / progressUpdate / progressEnd, if the client supports them
    invalidated   -> invalidated, if the client supports it
    run_exited    -> output (the generated text, or the result's next tokens), thread (exited), exited,
                     terminated
    terminated    -> terminated, when the server closed the session (idle timeout, shutdown)

Each event is translated under the transport's ordering lock, after any response being sent. A server
at its ceiling of event streams (RESOURCE_EXHAUSTED TOO_MANY_STREAMS) is polled instead, without waiting.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Iterator

from .. import Event
from ..client import EventStream
from ..errors import TdbError
from .protocol import tdb_message
from .state import DebugState

_STOP_REASONS = {"breakpoint": "breakpoint", "step": "step", "pause": "pause", "entry": "entry",
                 "exception": "exception", "token": "step"}     # "token": a generation's stopAtTokens boundary
_EXIT_CODES = {"exited": 0, "failed": 1, "terminated": 2}
POLL_S = 0.1   # between polls, when the server admits no more event streams


class EventTranslator:
    """Pumps one session's events and sends what each means to the IDE."""

    def __init__(self, state: DebugState):
        self.state = state
        self.out = state.out
        self._by_kind: dict[str, Callable[[Event], None]] = {
            "run_started": self._run_started, "stopped": self._stopped, "continued": self._continued,
            "output": self._output, "progress": self._progress, "invalidated": self._invalidated,
            "run_exited": self._run_exited, "terminated": self._terminated, "token": self._token,
        }

    def start(self, stream: EventStream) -> None:
        """Pump `stream` on a thread of its own until it ends or the adapter closes."""
        self.state.stream = stream
        self.state.pump = threading.Thread(target=self._pump, args=(stream,), name="tdb-dap-events", daemon=True)
        self.state.pump.start()

    def _pump(self, stream: EventStream) -> None:
        try:
            self._deliver(stream)
        except TdbError as e:
            if e.reason != "TOO_MANY_STREAMS":
                self._lost(e)
                return
            self._note("tdb: the server holds as many event streams as it admits; polling for events instead\n")
            try:   # a poll that does not wait is always served
                self._deliver(self._polled())
            except TdbError as again:
                self._lost(again)

    def _deliver(self, events: Iterable[Event]) -> None:
        order = self.state.transport.order
        for ev in events:
            with order:
                if self.state.closing:
                    return
                self.on_event(ev)

    def _polled(self) -> Iterator[Event]:
        """The session's events by polling without waiting (every POLL_S), for when no stream is admitted."""
        after = 0
        while not self.state.closing:
            events, _, _ = self.state.session.poll_events(after)
            for ev in events:
                yield ev
                after = ev.seq
            if not events:
                time.sleep(POLL_S)

    def _note(self, text: str) -> None:
        with self.state.transport.order:
            if not self.state.closing:
                self.out.event("output", {"category": "console", "output": text})

    def _lost(self, e: TdbError) -> None:
        with self.state.transport.order:
            if not self.state.closing:
                self.out.event("output", {"category": "stderr",
                                          "output": f"tdb: lost the server's event stream: {tdb_message(e)}\n"})
                self.state.send_terminated()

    def on_event(self, ev: Event) -> None:
        handler = self._by_kind.get(ev.kind)
        if handler is not None:
            handler(ev)

    # -- one method per event kind --------------------------------------------------------------------

    def _run_started(self, ev: Event) -> None:
        self.out.event("thread", {"reason": "started", "threadId": self.state.run.thread_id(ev.run_id)})

    def _stopped(self, ev: Event) -> None:
        stop = ev.stop
        if stop is None:
            return
        run = self.state.run
        self.state.vars.forget()
        run.stop_site, run.stop_hits = stop.site, stop.hit_breakpoint_ids
        hits = self.state.book.hits(stop.hit_breakpoint_ids)
        reason = _STOP_REASONS.get(stop.reason, stop.reason)
        if reason == "breakpoint" and hits and all(b.kind == "data" for b in hits):
            reason = "data breakpoint"
        elif reason == "breakpoint" and hits and all(b.kind in ("function", "launch") for b in hits):
            reason = "function breakpoint"
        description = stop.description
        if stop.reason == "breakpoint" and hits and description.startswith("breakpoint ["):
            # the server numbers breakpoints its own way: name them by the ids the IDE was given
            description = f"breakpoint {[b.id for b in hits]}{description[description.index(']') + 1:]}"
        body: dict[str, Any] = {"reason": reason, "threadId": run.thread_id(ev.run_id),
                                "description": description, "allThreadsStopped": True,
                                "hitBreakpointIds": [b.id for b in hits]}
        if stop.exception:
            body["text"] = stop.exception
        self.out.event("stopped", body)

    def _continued(self, ev: Event) -> None:
        run = self.state.run
        if run.own_resumes > 0:
            run.own_resumes -= 1          # the IDE knows: it asked for the resume
            return
        self.state.vars.forget()
        self.out.event("continued", {"threadId": run.thread_id(ev.run_id), "allThreadsContinued": True})

    def _output(self, ev: Event) -> None:
        site = ev.data.get("site", "")
        body: dict[str, Any] = {"category": "stderr" if ev.data.get("category") == "stderr" else "console",
                                "output": ev.text if ev.text.endswith("\n") else ev.text + "\n"}
        listing = self.state.listing
        if site and listing.site_line(site):
            body["source"], body["line"] = listing.source(), listing.site_line(site)
        self.out.event("output", body)

    def _token(self, ev: Event) -> None:
        run = self.state.run
        texts = [str(t) for t in ev.data.get("texts", [])]
        appended = [str(t) for t in ev.data.get("appended", [])] or texts   # a server before `appended`: the tokens
        run.new_tokens([int(i) for i in ev.data.get("token_ids", [])], appended)
        step = ev.data.get("step", 0)
        lines = [f"tdb: token {step}: {texts[0]!r} -> {run.generated[0]!r}"] if len(texts) == 1 else \
            [f"tdb: token {step} (batch {b}): {t!r} -> {run.generated[b]!r}" for b, t in enumerate(texts)]
        self.out.event("output", {"category": "console", "output": "\n".join(lines) + "\n"})

    def _progress(self, ev: Event) -> None:
        if not self.state.progress_on():
            return
        started = self.state.progress
        pid = f"tdb-{ev.data.get('id') or 'progress'}"
        pct = max(0.0, min(100.0, 100.0 * float(ev.data.get("fraction") or 0.0)))
        if pid not in started:
            started.add(pid)
            self.out.event("progressStart", {"progressId": pid, "title": ev.data.get("title") or "tdb",
                                             "message": ev.text, "percentage": pct, "cancellable": False})
        elif pct >= 100.0:
            started.discard(pid)
            self.out.event("progressEnd", {"progressId": pid, "message": ev.text})
        else:
            self.out.event("progressUpdate", {"progressId": pid, "message": ev.text, "percentage": pct})

    def _invalidated(self, ev: Event) -> None:
        if self.state.invalidated_on():
            self.out.event("invalidated", {"areas": ["all"]})

    def _run_exited(self, ev: Event) -> None:
        result = ev.result
        if result is None:
            return
        run = self.state.run
        tid = run.thread_id(ev.run_id)
        if ev.run_id == run.run_id:
            run.running = False
        self.state.vars.forget()
        line = f"tdb: run {result.run_id} {result.state}"
        if result.exception:
            line += f": {result.exception}"
        for b, text in enumerate(result.generated_text):
            line += f"\n  generated{f' (batch {b})' if len(result.generated_text) > 1 else ''}: {text!r}"
        for b, top in enumerate(result.top):
            tops = ", ".join(f"{t.text!r} {t.prob:.3f}" for t in top[:5])
            line += f"\n  next token{f' (batch {b})' if len(result.top) > 1 else ''}: {tops}"
        self.out.event("output", {"category": "console", "output": line + "\n"})
        self.out.event("thread", {"reason": "exited", "threadId": tid})
        self.out.event("exited", {"exitCode": _EXIT_CODES.get(result.state, 1)})
        self.state.send_terminated()

    def _terminated(self, ev: Event) -> None:
        if not ev.run_id:
            self.state.send_terminated()             # the server closed the session (idle timeout, shutdown)
