"""`python -m streamlit_app --server HOST:PORT`: the dashboard where only the client is installed
(`pip install "./packages/tdb-client[dashboard]"`: no `tdb` command, no torch) against a running tdb
server. The flags of `tdb dashboard` but `--model` (an embedded server needs the server distribution),
from the same definition (tdb_client/cli_options.py)."""

from __future__ import annotations

import argparse
import sys

from tdb_client import cli_options

from .launch import run_dashboard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m streamlit_app", description="the tdb dashboard (Streamlit) for a "
                                "running tdb server")
    cli_options.add_dashboard_options(p, embedded_server=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_dashboard(server=args.server, port=args.port, host=args.host, password=args.dashboard_password)


if __name__ == "__main__":
    sys.exit(main())
