"""The `tdb` command: `tdb serve`, `tdb dashboard`, `tdb dap`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tdb_client import cli_options

from . import __version__
from .errors import TdbServerError
from .limits import Limits
from .paths import bundled_models


def _limit_malloc_arenas(n: int = 2) -> None:
    """Fewer glibc malloc arenas (default 8 per core): a long-lived server with many RPC and run threads
    otherwise keeps freed memory spread over dozens of arenas. Called before torch starts its threads."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, n)   # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


# `tdb serve` flags for the server's limits: (flag, Limits field, flag unit -> field unit, help)
MiB = 2**20
LIMIT_FLAGS = [
    ("--max-sessions", "max_sessions", 1, "sessions open at once (RESOURCE_EXHAUSTED beyond)"),
    ("--max-prompt-tokens", "max_prompt_tokens", 1, "tokens per prompt, for debug runs and analyses alike (the "
     "model's own context length also applies)"),
    ("--max-batch", "max_batch", 1, "sequences in one debug run"),
    ("--idle-timeout", "idle_timeout_s", 1, "seconds without a request (and no open event stream) before a "
     "session is closed and its memory freed"),
    ("--session-capture-mib", "session_capture_bytes", MiB, "activations one session may keep (its current and "
     "retained runs; the oldest finished runs are dropped first)"),
    ("--total-capture-mib", "total_capture_bytes", MiB, "activations all sessions together may keep"),
    ("--max-read-mib", "max_read_bytes", MiB, "one ReadTensor or Evaluate result"),
    ("--max-expr-mib", "max_expr_bytes", MiB, "what one operation of an expression (Evaluate, reads, breakpoint "
     "conditions, log points) may allocate; four times this in all"),
    ("--max-sessions-per-client", "max_sessions_per_client", 1, "sessions one client may hold at once (a remote "
     "client: its address; on this host: its connection); RESOURCE_EXHAUSTED beyond"),
    ("--max-idle-timeout", "max_idle_timeout_s", 1, "the longest idle timeout (seconds) a client may ask for its "
     "session"),
    ("--max-analysis-s", "max_analysis_s", 1, "seconds one analysis (patch sweep, circuit, activation records) may "
     "run before DEADLINE_EXCEEDED"),
    ("--records-cache-mib", "records_cache_bytes", MiB, "the activation-records disk cache ($TDB_CACHE/records); the "
     "least recently used files are removed beyond it"),
    ("--max-patch-mib", "max_patch_bytes", MiB, "a tensor sent with Patch (also the largest request accepted)"),
    ("--max-request-mib", "max_request_bytes", MiB, "one request other than Patch and ReplayRecording (a prompt, an "
     "expression, a breakpoint list), refused before it is parsed; RESOURCE_EXHAUSTED beyond"),
    ("--max-streams", "max_streams", 1, "open event streams and long polls at once (they hold no thread: other calls "
     "keep answering); beyond, RESOURCE_EXHAUSTED at once"),
]


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(**{field: type(getattr(Limits, field))(getattr(args, flag[2:].replace("-", "_")) * scale)
                     for flag, field, scale, _ in LIMIT_FLAGS})


def _serve(args: argparse.Namespace) -> int:
    _limit_malloc_arenas()
    from .server import serve

    limits = limits_from_args(args)
    token = args.token or os.environ.get("TDB_TOKEN") or None
    device_map = args.device_map
    if device_map and device_map.lstrip().startswith("{"):
        device_map = json.loads(device_map)
    try:
        return serve(model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
                     limits=limits, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                     device_map=device_map, offload_folder=args.offload_folder, data_dirs=args.data_dir)
    except (TdbServerError, OSError, ValueError) as e:     # a wrong flag, not a bug: one line, no traceback
        print(f"tdb serve: {_serve_error(e, args.model)}", file=sys.stderr)
        return 1


def _serve_error(e: Exception, model: str | None) -> str:
    """What went wrong starting the server, in tdb's words: a model name that is neither bundled nor a
    folder gets the bundled names, not the Hugging Face hub's advice (tdb never downloads)."""
    if getattr(e, "reason", "") == "MODEL_NOT_FOUND" and model and not os.path.isdir(model):
        return (f"no model {model!r}: not a bundled model ({', '.join(sorted(bundled_models())) or 'none installed'}), "
                "not a model folder, and not in the local Hugging Face cache (tdb never downloads)")
    return str(e)


def _dashboard(args: argparse.Namespace) -> int:
    try:
        from streamlit_app.launch import run_dashboard
    except ImportError as e:
        print(f"tdb dashboard: the dashboard is not available ({e}); install the 'dashboard' extra",
              file=sys.stderr)
        return 2
    return run_dashboard(server=args.server, port=args.port, model=args.model, host=args.host,
                         password=args.dashboard_password)


def _dap(args: argparse.Namespace) -> int:
    from tdb_client.dap import AdapterOptions, run_stdio, run_tcp

    options = AdapterOptions.from_args(args.server, args.token, args.listen_token, args.data_dir)
    if args.listen is None:
        return run_stdio(options)
    return run_tcp(args.host, args.listen, once=args.once, options=options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.fn(args)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also read by scripts/gen_docs.py for docs/reference/cli.md)."""
    parser = argparse.ArgumentParser(prog="tdb", description="tdb: a debugger for transformer language models")
    parser.add_argument("--version", action="version", version=f"tdb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve a model over gRPC")
    p.add_argument("--model", default=None, help="a local HF model directory or a bundled model's name "
                   "(default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond 127.0.0.1: set --token, and TLS "
                   "across machines)")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (the `listening` line says which)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's own dtype")
    p.add_argument("--device-map", default=None, help='spread the model over devices with accelerate: "auto", '
                   '"balanced", or a JSON map like \'{"transformer.h.0": "cuda:0", "transformer.h.1": "cpu"}\'')
    p.add_argument("--offload-folder", default=None, help="folder for modules mapped to \"disk\"")
    p.add_argument("--token", default=None, help="require this bearer token on every RPC (or set TDB_TOKEN)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS only")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--data-dir", action="append", default=[], metavar="FOLDER",
                   help="a folder whose files clients may name (SAE folders, corpora for activation records); "
                   "repeatable. Besides these, only the bundled data and the model's own folder")
    d = Limits()
    for flag, field, scale, text in LIMIT_FLAGS:
        default = getattr(d, field)
        if scale != 1:
            default = default / scale
        p.add_argument(flag, type=type(default), default=default, help=f"{text} (default %(default)s)")
    p.set_defaults(fn=_serve)

    p = sub.add_parser("dashboard", help="the Streamlit dashboard")
    cli_options.add_dashboard_options(p, embedded_server=True)
    p.set_defaults(fn=_dashboard)

    p = sub.add_parser("dap", help="Debug Adapter Protocol bridge for VS Code / nvim-dap",
                       description="Speak DAP on stdin/stdout (the default), or on TCP with --listen. The launch "
                       "configuration names a running server (\"server\": \"host:port\") or the model for an "
                       "embedded one (\"model\"; default: the bundled model).")
    cli_options.add_dap_options(p)
    p.set_defaults(fn=_dap)
    return parser


if __name__ == "__main__":
    sys.exit(main())
