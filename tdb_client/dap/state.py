"""What one IDE debug session knows, shared by the request handlers and the event translation: the
adapter's options, the connection to the tdb server and its session, the client's capabilities and
launch configuration, the run (one DAP thread), where it stopped and what it generated so far, and the
components (breakpoint book, variable handles). Handlers and events read and change it under the
transport's ordering lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import ModelInfo
from ..client import EventStream, Session, TdbClient
from ..errors import TdbError
from .breakpoints import BreakpointBook
from .listing import SiteListing
from .options import AdapterOptions
from .patching import UNIT_SELECTION
from .protocol import DapError
from .transport import Transport
from .variables import Variables

_GLOB = frozenset("*?[")


@dataclass
class RunThread:
    """The run as a DAP thread: thread ids per run, whether it runs, and where it last stopped."""

    ids: dict[str, int] = field(default_factory=dict)
    run_id: str = ""
    running: bool = False
    stop_site: str = ""
    stop_hits: tuple[int, ...] = ()
    own_resumes: int = 0                # resumes the IDE asked for: their `continued` events are not sent
    generated: list[str] = field(default_factory=list)       # generation: the text so far, per batch item
    generated_ids: list[list[int]] = field(default_factory=list)

    def new_tokens(self, token_ids: list[int], texts: list[str]) -> None:
        """A generation step's tokens (one per batch item) and what each adds to the text so far."""
        while len(self.generated) < len(texts):
            self.generated.append("")
            self.generated_ids.append([])
        for b, (t, text) in enumerate(zip(token_ids, texts)):
            self.generated[b] += text
            self.generated_ids[b].append(t)

    def thread_id(self, run_id: str) -> int:
        if run_id not in self.ids:
            self.ids[run_id] = len(self.ids) + 1
        return self.ids[run_id]

    def check(self, args: dict[str, Any]) -> None:
        """Refuse a request naming a thread other than the run's."""
        tid = args.get("threadId")
        if tid is not None and (not self.run_id or tid != self.thread_id(self.run_id)):
            raise DapError(f"unknown thread {tid!r}: the run's thread is "
                           f"{self.thread_id(self.run_id) if self.run_id else 'not started yet'}")


class DebugState:
    """One IDE debug session (one connection): one tdb session, one run at a time."""

    def __init__(self, transport: Transport, options: AdapterOptions | None = None):
        self.options = options or AdapterOptions()
        self.authorized = not self.options.listen_token     # a listener's client, until it presents the token
        self.loading = False                  # launch answered, the model still loading
        self.transport = transport
        self.out = transport.out
        self.client: TdbClient | None = None
        self.session: Session | None = None
        self.info: ModelInfo | None = None
        self.client_caps: dict[str, Any] = {}
        self.launch_args: dict[str, Any] = {}
        self.book = BreakpointBook()
        self.vars = Variables()
        self.run = RunThread()
        self.configured = False
        self.terminated_sent = False
        self.closing = False
        self.progress: set[str] = set()       # progress ids started and not yet ended
        self.stream: EventStream | None = None
        self.pump: threading.Thread | None = None
        self._shut = False

    # -- what the client said ----------------------------------------------------------------------

    @property
    def listing(self) -> SiteListing:
        return SiteListing(self.info, self.client_caps.get("linesStartAt1", True))

    def progress_on(self) -> bool:
        return bool(self.client_caps.get("supportsProgressReporting"))

    def invalidated_on(self) -> bool:
        return bool(self.client_caps.get("supportsInvalidatedEvent"))

    # -- the tdb session ---------------------------------------------------------------------------

    def need_session(self) -> Session:
        if self.session is None:
            raise DapError("the model is still loading: wait for the `initialized` event" if self.loading
                           else "no debug session yet: send launch first")
        return self.session

    def sync_breakpoints(self) -> None:
        def scratch() -> Session:
            assert self.client is not None      # a session exists, so its client does
            return self.client.session(name="tdb-dap breakpoint check")

        self.book.sync(self.session, scratch, bool(self.launch_args.get("noDebug")))

    def dims_of(self, name: str) -> tuple[str, ...] | None:
        """The dims a patch target or watch can select along: a site's, from the model info; any other
        name is left to the server (a unit selects batch and pos; a name it does not know, it refuses)."""
        if self.info is None:
            return None
        for s in self.info.sites:
            if s.name == name:
                return s.dims
        return UNIT_SELECTION

    def at_token_boundary(self) -> bool:
        """Whether the run is stopped between two generated tokens (a stop at no site, after the first)."""
        return self.launch_args.get("generate") is not None and self.run.stop_site == "" and \
            bool(self.run.generated)

    def stop_target(self) -> str:
        """What `x` is at this stop: the unit of a unit breakpoint that stopped here, else the site.

        A unit breakpoint is one the server accepted that names neither a site nor a pattern of sites."""
        sites = set(self.info.site_names) if self.info else set()
        for sid in self.run.stop_hits:
            bp = self.book.by_server_id(sid)
            if bp is not None and bp.spec is not None and bp.spec.site not in sites and not _GLOB & set(bp.spec.site):
                return bp.spec.site
        return self.run.stop_site

    # -- events the handlers and the event translation both send -----------------------------------

    def send_terminated(self) -> None:
        if not self.terminated_sent:
            self.terminated_sent = True
            self.out.event("terminated", {})

    def after_response(self, action: Callable[[], None]) -> None:
        self.transport.after_response(action)

    # -- the end -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close the tdb session (which ends its run) and the connection to the server; idempotent."""
        self.closing = True
        if self._shut:
            return
        self._shut = True
        if self.stream is not None:
            self.stream.close()
        if self.session is not None:
            try:
                self.session.close()
            except TdbError:
                pass
        if self.client is not None:
            self.client.close()
        self.transport.done.set()
