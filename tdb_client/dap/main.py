"""Running the adapter: over stdio (the IDE starts `tdb dap` per debug session) or over TCP
(`tdb dap --listen PORT`: DAP "server" mode, one adapter per connection, until killed).

On stdio the protocol owns the process's original stdout: file descriptor 1 is pointed at stderr so
that nothing printed while loading a model (warnings, progress bars) can corrupt the stream. When
the client disconnects (or closes stdin) the process exits.

A listener bound beyond loopback serves only clients that present its own credential (`--listen-token`
or $TDB_DAP_TOKEN, sent as the launch attribute "adapterToken"), and refuses to start without one:
whoever reaches the port would otherwise drive the tdb server with the adapter's token and load models
from the adapter's disk.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from dataclasses import replace
from typing import NoReturn

from . import backend
from .adapter import DebugAdapter
from .options import AdapterOptions, is_loopback
from .protocol import Channel

log = logging.getLogger("tdb.dap")


def run_stdio(options: AdapterOptions | None = None) -> NoReturn:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    # stdio is the IDE's own pipe: the listener's credential has nothing to guard there
    DebugAdapter(Channel(out), replace(options or AdapterOptions(), listen_token="")).serve(sys.stdin.buffer)
    # The reader thread may still be blocked reading stdin, which the interpreter cannot finalize
    # under it: clean up explicitly and leave without finalizing.
    backend.stop_embedded()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


def _serve_connection(conn: socket.socket, options: AdapterOptions | None) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader, writer = conn.makefile("rb"), conn.makefile("wb")
        adapter = DebugAdapter(Channel(writer), options)
        try:
            adapter.serve(reader)
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)      # unblocks the adapter's reader thread
            except OSError:
                pass
            if adapter.reader is not None:
                adapter.reader.join(timeout=5)
            reader.close()
            try:
                writer.close()
            except OSError:
                pass


def run_tcp(host: str = "127.0.0.1", port: int = 0, once: bool = False, options: AdapterOptions | None = None) -> int:
    """Listen on host:port (0 = any free port), print `tdb dap: listening on HOST:PORT`, serve clients.
    Beyond loopback, only with a listener credential (2 and a message on stderr without one)."""
    options = options or AdapterOptions()
    if not is_loopback(host) and not options.listen_token:
        print(f"tdb dap: refusing to listen on {host or 'every address'} without a credential of its own: "
              "beyond loopback anyone who reaches the port could drive the tdb server. Start it with "
              "--listen-token TOKEN (or set TDB_DAP_TOKEN); each client then sends it as the launch "
              "attribute \"adapterToken\".", file=sys.stderr, flush=True)
        return 2
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.create_server((host, port), family=family)
    bound = server.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"tdb dap: listening on {shown}:{bound}", flush=True)
    try:
        with server:
            while True:
                conn, peer = server.accept()
                log.info("DAP client connected from %s", peer)
                if once:
                    _serve_connection(conn, options)
                    return 0
                threading.Thread(target=_serve_connection, args=(conn, options), name="tdb-dap-conn",
                                 daemon=True).start()
    except KeyboardInterrupt:
        return 0
