"""`python -m tdb_client.dap`: the DAP bridge where only the client is installed (`pip install
./packages/tdb-client`: no `tdb` command, no torch). The same flags as `tdb dap` (both take them
from tdb_client/cli_options.py); launches name a running server (`--server` or the launch's
"server"), since an embedded server needs the server distribution."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import cli_options
from .main import run_stdio, run_tcp
from .options import AdapterOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tdb_client.dap", description="tdb's Debug Adapter Protocol bridge: "
                                "DAP on stdin/stdout (the default), or on TCP with --listen.")
    cli_options.add_dap_options(p)
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
