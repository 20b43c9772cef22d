"""The command-line options of the client-side programs, defined once.

`tdb dap` and `tdb dashboard` (tdb_server/cli.py, in the server distribution) and their client-only
twins `python -m tdb_client.dap` and `python -m streamlit_app` (tdb_client/dap/__main__.py,
streamlit_app/__main__.py) add their flags from here, so the two spellings of each program cannot
drift apart. Plain argparse: no torch, no server import.
"""

from __future__ import annotations

import argparse


def add_dap_options(p: argparse.ArgumentParser) -> None:
    """The flags of the DAP bridge."""
    p.add_argument("--listen", type=int, default=None, metavar="PORT",
                   help="serve DAP clients on TCP PORT instead of stdio (0 picks a free port; the port is printed)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind with --listen")
    p.add_argument("--once", action="store_true", help="with --listen: exit after the first client disconnects")
    p.add_argument("--listen-token", default=None, metavar="TOKEN", help="with --listen: the credential every DAP "
                   "client sends as the launch attribute \"adapterToken\" (or set TDB_DAP_TOKEN); required when "
                   "--host is beyond loopback")
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="the tdb server launches use when they name "
                   "none (or set TDB_SERVER); --token is sent to this address only")
    p.add_argument("--token", default=None, help="the bearer token of --server (or set TDB_TOKEN); never sent to "
                   "another address")
    p.add_argument("--data-dir", action="append", default=[], metavar="FOLDER", help="a folder a launch's \"model\" "
                   "may name (repeatable; or TDB_DATA_DIRS, separated by the path separator); besides these, only "
                   "the bundled models")


def add_dashboard_options(p: argparse.ArgumentParser, *, embedded_server: bool) -> None:
    """The flags of the dashboard. With `embedded_server` (`tdb dashboard`, which can start a server of its
    own), --server is optional and --model names the embedded server's model; without it (a client-only
    install), --server is required and there is no --model."""
    if embedded_server:
        p.add_argument("--server", default=None, help="HOST:PORT of a running tdb server (default: start one)")
        p.add_argument("--model", default=None, help="model for the embedded server")
    else:
        p.add_argument("--server", required=True, help="HOST:PORT of a running tdb server")
    p.add_argument("--host", default="127.0.0.1", help="address the dashboard listens on; beyond loopback it "
                   "needs --dashboard-password")
    p.add_argument("--port", type=int, default=8501, help="the dashboard's port (0 picks a free one)")
    p.add_argument("--dashboard-password", default=None, metavar="PASSWORD", help="the password every browser "
                   "session gives before it sees a page (or set TDB_DASHBOARD_PASSWORD); required when --host is "
                   "beyond loopback, since the dashboard uses the server with its own token")
