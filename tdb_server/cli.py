"""The `tdb` command: `tdb serve`, `tdb dashboard`, `tdb dap`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .limits import Limits


def _limit_malloc_arenas(n: int = 2) -> None:
    """Fewer glibc malloc arenas (default 8 per core): a long-lived server with many RPC and run threads
    otherwise keeps freed memory spread over dozens of arenas. Called before torch starts its threads."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, n)   # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _serve(args: argparse.Namespace) -> int:
    _limit_malloc_arenas()
    from .limits import Limits
    from .server import serve

    limits = Limits(max_sessions=args.max_sessions, max_prompt_tokens=args.max_prompt_tokens,
                    max_batch=args.max_batch, idle_timeout_s=args.idle_timeout,
                    session_capture_bytes=int(args.session_capture_mib * 2**20),
                    total_capture_bytes=int(args.total_capture_mib * 2**20))
    token = args.token or os.environ.get("TDB_TOKEN") or None
    device_map = args.device_map
    if device_map and device_map.lstrip().startswith("{"):
        device_map = json.loads(device_map)
    return serve(model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
                 limits=limits, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                 device_map=device_map, offload_folder=args.offload_folder)


def _dashboard(args: argparse.Namespace) -> int:
    try:
        from streamlit_app.launch import run_dashboard
    except ImportError as e:
        print(f"tdb dashboard: the dashboard is not available ({e}); install the 'dashboard' extra",
              file=sys.stderr)
        return 2
    return run_dashboard(server=args.server, port=args.port, model=args.model, host=args.host)


def _dap(args: argparse.Namespace) -> int:
    from tdb_client.dap import run_stdio, run_tcp

    if args.listen is None:
        return run_stdio()
    return run_tcp(args.host, args.listen, once=args.once)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tdb", description="tdb: a debugger for transformer language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve a model over gRPC")
    p.add_argument("--model", default=None, help="a local HF model directory or a bundled model's name "
                   "(default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device-map", default=None, help='spread the model over devices with accelerate: "auto", '
                   '"balanced", or a JSON map like \'{"transformer.h.0": "cuda:0", "transformer.h.1": "cpu"}\'')
    p.add_argument("--offload-folder", default=None, help="folder for modules mapped to \"disk\"")
    p.add_argument("--token", default=None, help="require this bearer token on every RPC (or set TDB_TOKEN)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS only")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    d = Limits()
    p.add_argument("--max-sessions", type=int, default=d.max_sessions)
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, help="seconds before an idle session closes")
    p.add_argument("--session-capture-mib", type=float, default=d.session_capture_bytes / 2**20)
    p.add_argument("--total-capture-mib", type=float, default=d.total_capture_bytes / 2**20)
    p.set_defaults(fn=_serve)

    p = sub.add_parser("dashboard", help="the Streamlit dashboard")
    p.add_argument("--server", default=None, help="HOST:PORT of a running tdb server (default: start one)")
    p.add_argument("--model", default=None, help="model for the embedded server")
    p.add_argument("--host", default="127.0.0.1", help="address the dashboard listens on")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(fn=_dashboard)

    p = sub.add_parser("dap", help="Debug Adapter Protocol bridge for VS Code / nvim-dap",
                       description="Speak DAP on stdin/stdout (the default), or on TCP with --listen. The launch "
                       "configuration names a running server (\"server\": \"host:port\") or the model for an "
                       "embedded one (\"model\"; default: the bundled model).")
    p.add_argument("--listen", type=int, default=None, metavar="PORT",
                   help="serve DAP clients on TCP PORT instead of stdio (0 picks a free port; the port is printed)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind with --listen")
    p.add_argument("--once", action="store_true", help="with --listen: exit after the first client disconnects")
    p.set_defaults(fn=_dap)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
