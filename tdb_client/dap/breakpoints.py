"""The breakpoint book: every breakpoint the IDE set, what the server said about each, and syncing
the lot to the server.

DAP sets breakpoints a set at a time, and each request replaces its own set only:
setFunctionBreakpoints the function breakpoints, setDataBreakpoints the data breakpoints, and
setBreakpoints the breakpoints of the one source it names (an editor sends one request per file that
has breakpoints: a request for `train.py` leaves those of `austen.tdbsites` alone). The launch
configuration's "breakpoints" (for clients without a function-breakpoint UI) are one more set. The
book keeps one set per key: "function", "data", "launch", and `source:<file>` per source. Only the
site listing's breakpoints reach the server; those of any other source are kept, unverified, so the
reply names the source they were set in.

The server's SetBreakpoints replaces everything, so every change sends the union of the sets, once.
The server keeps the hit counts of breakpoints it is sent again. A set the server refuses outright
(a condition that does not parse, a bad hit condition) is probed one breakpoint at a time on a scratch
session, never on the debug session, so the breakpoints already counting hits are not disturbed.

Data breakpoints are watch conditions on a site or unit (default `any_nan or any_inf`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc

from .. import Breakpoint
from ..client import Session
from ..errors import TdbError
from .listing import SiteListing
from .protocol import DapError, tdb_message

DEFAULT_WATCH = "any_nan or any_inf"
KEYS = ("function", "data", "launch")     # the sets besides the sources'; the union goes function, sources, data, launch


def source_key(source: dict[str, Any], listing: SiteListing) -> str:
    """The book's key for a setBreakpoints source: the listing is one key however it is named."""
    if listing.is_listing(source):
        return "source:" + listing.name
    where = source.get("path") or source.get("name") or ""
    ref = source.get("sourceReference")
    return f"source:{where}" + (f"#{ref}" if ref else "")


@dataclass
class DapBreakpoint:
    """One breakpoint as the IDE set it, and what the server said about it."""

    kind: str                           # "function" | "source" | "data" | "launch" (from the launch config)
    id: int
    spec: Breakpoint | None             # None: refused before reaching the server
    line: int | None = None             # source breakpoints: the line (IDE numbering)
    verified: bool = False
    message: str = ""
    source: dict[str, Any] | None = None    # source breakpoints: the source as the IDE named it


def breakpoint_body(bp: DapBreakpoint, listing: SiteListing) -> dict[str, Any]:
    """A DAP Breakpoint (a source breakpoint names the source it was set in: the listing as the adapter
    serves it, any other source as the IDE sent it)."""
    body: dict[str, Any] = {"id": bp.id, "verified": bp.verified}
    if bp.message:
        body["message"] = bp.message
    if bp.kind == "source" and bp.line is not None:
        src = bp.source or {}
        body["source"] = listing.source() if listing.is_listing(src) else src
        body["line"] = bp.line
    return body


def launch_breakpoints(raw: Any) -> list[Breakpoint]:
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


class BreakpointBook:
    """The IDE's breakpoint sets, ids the IDE sees, and the server's ids of those it accepted."""

    def __init__(self) -> None:
        self._sets: dict[str, list[DapBreakpoint]] = {key: [] for key in KEYS}
        self._ids = itertools.count(1)
        self._by_server_id: dict[int, DapBreakpoint] = {}

    def _new(self, kind: str, spec: Breakpoint | None = None, line: int | None = None) -> DapBreakpoint:
        return DapBreakpoint(kind, next(self._ids), spec, line=line)

    def of(self, key: str) -> list[DapBreakpoint]:
        return self._sets[key]

    def all(self) -> list[DapBreakpoint]:
        """Every breakpoint: function, then each source's (in the order first set), data, launch."""
        sources = [k for k in self._sets if k.startswith("source:")]
        return [bp for key in ("function", *sources, "data", "launch") for bp in self._sets[key]]

    def by_server_id(self, server_id: int) -> DapBreakpoint | None:
        return self._by_server_id.get(server_id)

    def hits(self, server_ids: Sequence[int]) -> list[DapBreakpoint]:
        """The breakpoints a stop names, in the server's order (ids the book does not know are left out)."""
        return [self._by_server_id[i] for i in server_ids if i in self._by_server_id]

    # -- the sets, from the requests ---------------------------------------------------------------

    def set_function(self, requested: list[dict[str, Any]]) -> list[DapBreakpoint]:
        out = []
        for b in requested:
            name = str(b.get("name", "")).strip()
            spec = Breakpoint(name, condition=b.get("condition") or "", hit_condition=b.get("hitCondition") or "")
            bp = self._new("function", spec if name else None)
            if not name:
                bp.message = "a function breakpoint needs a site name, e.g. blocks.1.attn.out"
            out.append(bp)
        self._sets["function"] = out
        return out

    def set_source(self, source: dict[str, Any], requested: list[dict[str, Any]],
                   listing: SiteListing) -> list[DapBreakpoint]:
        """Line breakpoints (and log points) in one source; only the site listing's reach the server."""
        ours = listing.is_listing(source)
        out = []
        for b in requested:
            line = int(b.get("line", 0))
            bp = self._new("source", line=line)
            bp.source = dict(source)
            site = listing.site_at(line)
            if not ours:
                bp.message = listing.refusal(source)
            elif site is None:
                bp.message = f"line {line} is not a site of {listing.info.name if listing.info else 'the model'}"
            else:
                bp.spec = Breakpoint(site, condition=b.get("condition") or "",
                                     hit_condition=b.get("hitCondition") or "", log_message=b.get("logMessage") or "")
            out.append(bp)
        self._sets[source_key(source, listing)] = out
        return out

    def set_data(self, requested: list[dict[str, Any]]) -> list[DapBreakpoint]:
        out = []
        for b in requested:
            bp = self._new("data")
            if b.get("accessType", "write") != "write":
                bp.message = "sites are only written: watch them with accessType 'write'"
            else:
                bp.spec = Breakpoint(str(b.get("dataId", "")), condition=b.get("condition") or DEFAULT_WATCH,
                                     hit_condition=b.get("hitCondition") or "")
            out.append(bp)
        self._sets["data"] = out
        return out

    def set_launch(self, specs: list[Breakpoint]) -> list[DapBreakpoint]:
        self._sets["launch"] = [self._new("launch", spec) for spec in specs]
        return self._sets["launch"]

    # -- the server --------------------------------------------------------------------------------

    def sync(self, session: Session | None, scratch: Callable[[], Session], no_debug: bool = False) -> None:
        """Send the union of the sets to the server (SetBreakpoints replaces the set) and note its answers.
        `scratch()` opens a session to probe a set the server refuses in, breakpoint by breakpoint."""
        if session is None:
            for bp in self.all():
                if bp.spec is not None:
                    bp.verified, bp.message = False, "pending: checked when the debug session starts"
            return
        if no_debug:
            return
        wanted = [bp for bp in self.all() if bp.spec is not None]
        try:
            statuses = session.set_breakpoints([bp.spec for bp in wanted])
            good = wanted
        except TdbError as e:
            if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            good = self._acceptable(scratch(), wanted)
            statuses = session.set_breakpoints([bp.spec for bp in good])
        self._by_server_id = {}
        for bp, st in zip(good, statuses):
            self._by_server_id[st.id] = bp
            bp.verified, bp.message = st.verified, st.message

    @staticmethod
    def _acceptable(probe: Session, wanted: list[DapBreakpoint]) -> list[DapBreakpoint]:
        """The breakpoints the server takes, tried one at a time on `probe` (a scratch session, closed
        here); those it refuses (a condition that does not parse ...) are marked unverified with its message."""
        good = []
        with probe:
            for bp in wanted:
                try:
                    probe.set_breakpoints([bp.spec])
                    good.append(bp)
                except TdbError as one:
                    bp.verified, bp.message = False, tdb_message(one)
        return good
