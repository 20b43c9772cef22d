"""`python -m tdb_client.dap`: the DAP bridge where only the client is installed (`pip install
./packages/tdb-client`: no `tdb` command, no torch). The same flags as `tdb dap`, which
tests/dap/test_dap_module_entry.py keeps equal; launches name a running server (`--server` or the launch's
"server"), since an embedded server needs the server distribution."""

from __future__ import annotations

import argparse
import logging
import sys

from .main import run_stdio, run_tcp
from .options import AdapterOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tdb_client.dap", description="tdb's Debug Adapter Protocol bridge: "
                                "DAP on stdin/stdout (the default), or on TCP with --listen.")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = AdapterOptions.from_args(args.server, args.token, args.listen_token, args.data_dir)
    if args.listen is None:
        return run_stdio(options)
    return run_tcp(args.host, args.listen, once=args.once, options=options)


if __name__ == "__main__":
    sys.exit(main())
