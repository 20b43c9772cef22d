"""`python -m streamlit_app --server HOST:PORT`: the dashboard where only the client is installed
(`pip install "./packages/tdb-client[dashboard]"`: no `tdb` command, no torch) against a running tdb
server. The flags of `tdb dashboard` but `--model` (an embedded server needs the server distribution);
tests/dashboard/test_dashboard_module_entry.py keeps them equal."""

from __future__ import annotations

import argparse
import sys

from .launch import run_dashboard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamlit_app", description="the tdb dashboard (Streamlit) for a "
                                "running tdb server")
    p.add_argument("--server", required=True, help="HOST:PORT of a running tdb server")
    p.add_argument("--host", default="127.0.0.1", help="address the dashboard listens on; beyond loopback it "
                   "needs --dashboard-password")
    p.add_argument("--port", type=int, default=8501, help="the dashboard's port (0 picks a free one)")
    p.add_argument("--dashboard-password", default=None, metavar="PASSWORD", help="the password every browser "
                   "session gives before it sees a page (or set TDB_DASHBOARD_PASSWORD); required when --host is "
                   "beyond loopback, since the dashboard uses the server with its own token")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_dashboard(server=args.server, port=args.port, host=args.host, password=args.dashboard_password)


if __name__ == "__main__":
    sys.exit(main())
