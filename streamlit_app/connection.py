"""The dashboard's connection to a tdb server: a cached client, per-user sessions, error display.

The dashboard talks to one server, the one it was configured for ($TDB_SERVER, set by `tdb
dashboard`), and sends its token ($TDB_TOKEN) there only: a `?server=` in a URL that names another
address is ignored with a warning, so a link cannot make the dashboard hand its credential to a host
of someone else's choosing. A dashboard started with a password ($TDB_DASHBOARD_PASSWORD, required by
`tdb dashboard` when it listens beyond loopback) asks each browser session for it before anything else.

One `TdbClient` is shared by every browser tab (`st.cache_resource`), and answers that depend only on
their inputs are cached (`st.cache_data`); every page run asks the server afresh (on the cached client)
what it serves, and a server that serves another model than before (restarted on the same address) drops
both caches. Debugging sessions are per user (`st.session_state`), because a paused run belongs to the
person who paused it. Errors from the server (`TdbError`) are shown as messages, never tracebacks; a lost
server is a message too.
"""

from __future__ import annotations

import hmac
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import grpc
import streamlit as st

from tdb_client import ServerInfo, Session, TdbClient, TdbError

from . import state

DEFAULT_SERVER = "127.0.0.1:50051"
ENV_SERVER = "TDB_SERVER"          # set by `tdb dashboard` for the Streamlit process
ENV_PASSWORD = "TDB_DASHBOARD_PASSWORD"   # set by `tdb dashboard --dashboard-password` (or by hand)
SESSION_IDLE_S = 1800.0            # a tab left open keeps its paused run for half an hour

T = TypeVar("T")


def server_address() -> str:
    """The server this dashboard was configured for: $TDB_SERVER, else the default port. Never the URL's."""
    return os.environ.get(ENV_SERVER) or DEFAULT_SERVER


def ignore_foreign_server() -> None:
    """A `?server=` naming another address than the configured one is dropped from the URL, with a warning:
    the dashboard's token goes only to its own server."""
    asked = state.url_get(state.SERVER)
    if asked and asked != server_address():
        st.warning(f"This dashboard talks only to the tdb server it was started with ({server_address()}): "
                   f"`?server={asked}` in the link was ignored, and nothing was sent there.",
                   icon=":material/shield:")
        state.url_set(**{state.SERVER: None})


def signed_in() -> bool:
    """True when the dashboard has no password, or this browser session gave it; else draws the sign-in box."""
    password = os.environ.get(ENV_PASSWORD, "")
    if not password or st.session_state.get("tdb.signed_in"):
        return True
    st.title(":material/lock: tdb dashboard")
    typed = st.text_input("Dashboard password", type="password", key="tdb.password")
    if typed:
        if hmac.compare_digest(typed.encode(), password.encode()):
            st.session_state["tdb.signed_in"] = True
            del st.session_state["tdb.password"]
            st.rerun()
        st.error("wrong password", icon=":material/lock:")
    return False


@st.cache_resource(show_spinner=False)
def get_client(address: str) -> TdbClient:
    return TdbClient(address, timeout=120.0, client_name="tdb-dashboard")


def describe(e: TdbError, address: str = "") -> str:
    """A person-readable line for a TdbError."""
    if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and e.reason in (
            "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        where = f" at {address}" if address else ""
        return f"Lost the connection to the tdb server{where}: {e.message or e.code.name}. Is it still running?"
    text = f"{e.message} ({e.reason})"
    if e.suggestions and "did you mean" not in e.message:   # the server's message may name them already
        text += " — did you mean: " + ", ".join(e.suggestions[:5]) + "?"
    return text


def show_error(e: BaseException, what: str = "") -> None:
    prefix = f"{what}: " if what else ""
    if isinstance(e, TdbError):
        st.error(prefix + describe(e, server_address()), icon=":material/warning:")
    else:
        st.error(f"{prefix}{type(e).__name__}: {e}", icon=":material/warning:")
        with st.expander("details (a bug in the dashboard: please report it)"):
            st.code("".join(traceback.format_exception(e)), language=None)


@contextmanager
def shown_errors(what: str = "") -> Iterator[None]:
    """Run a block; a TdbError (or a bad input) inside it becomes an error message on the page."""
    try:
        yield
    except (TdbError, ValueError) as e:
        show_error(e, what)


def attempt(fn: Callable[[], T], what: str = "") -> T | None:
    """`fn()`, or None after showing its error."""
    try:
        return fn()
    except (TdbError, ValueError) as e:
        show_error(e, what)
        return None


@dataclass
class Context:
    """What every page gets: the server address, the client and the server's description."""

    address: str
    client: TdbClient
    info: ServerInfo

    @property
    def model(self):
        return self.info.model

    def has_analysis(self, name: str) -> bool:
        return name in self.info.analyses

    def session(self, name: str) -> Session:
        """This user's session `name` on this server (created on first use, recreated when it expired)."""
        key = f"tdb.session.{name}.{self.address}"
        s: Session | None = st.session_state.get(key)
        if s is not None and not s.closed:
            try:
                s.status()
                return s
            except TdbError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise
        s = self.client.session(name=f"dashboard-{name}", idle_timeout_s=SESSION_IDLE_S)
        st.session_state[key] = s
        return s

    def drop_session(self, name: str) -> None:
        key = f"tdb.session.{name}.{self.address}"
        s = st.session_state.pop(key, None)
        if s is not None:
            try:
                s.close()
            except TdbError:
                pass


_SERVED: dict[str, ServerInfo] = {}    # address -> what the server there said it serves, at the last page run


def _serving_now(address: str) -> ServerInfo:
    """What the server at `address` serves now: a fresh Initialize on the cached client (a few ms, no new
    channel), since a server restarted on the same address may serve another model. A client whose server
    went away may be waiting out gRPC's reconnect backoff (up to minutes) though the server is back: when
    it cannot reach the server, it is dropped and a new one tries once (waiting up to 3 s for the server)."""
    try:
        return get_client(address).initialize(refresh=True)
    except TdbError as e:
        if e.code != grpc.StatusCode.UNAVAILABLE:
            raise
    get_client.clear()
    client = get_client(address)
    client.wait_ready(timeout=3.0)
    return client.initialize(refresh=True)


def _forget_if_changed(address: str, info: ServerInfo) -> None:
    """Every cached answer (tokens, runs, analyses) and the cached client belong to the model the server
    served when they were asked: when it serves another model (or another server version) now, drop them
    all, so no page shows an answer of the model before. (A model retrained in place, with the same
    description, cannot be told apart from here.)"""
    before = _SERVED.get(address)
    if before is not None and (before.model, before.server_version) != (info.model, info.server_version):
        st.cache_data.clear()
        get_client.clear()
    _SERVED[address] = info


def connect(address: str | None = None) -> Context | None:
    """Connect (or reuse the cached connection); on failure, show why and return None."""
    address = address or server_address()
    try:
        _forget_if_changed(address, _serving_now(address))
        client = get_client(address)
        info = client.initialize()
    except TdbError as e:
        st.error(describe(e, address) if e.code != grpc.StatusCode.UNAVAILABLE
                 else f"No tdb server is answering at {address}. Start one with `tdb serve` (then "
                      f"`tdb dashboard --server HOST:PORT`), or let `tdb dashboard` start its own.",
                 icon=":material/power_off:")
        return None
    return Context(address, client, info)
