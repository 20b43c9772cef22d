"""Building and running the gRPC server.

`create_server(address, adapter)` builds and starts a server and returns (server, port) — tests
bind "127.0.0.1:0". `serve()` is the blocking entry point behind `tdb serve`: it loads the model,
prints `tdb: listening on HOST:PORT` once the port is bound, and shuts down gracefully on
SIGINT/SIGTERM. Standard gRPC health checking and server reflection are enabled when their packages
(grpcio-health-checking, grpcio-reflection) are installed; the server runs without them.

The server is gRPC's asyncio server (`grpc.aio`) on one event loop in a daemon thread ("tdb-aio"),
shared by every server of the process: grpc binds its completion poller to the first loop that uses
it, so a second loop would stop hearing from the network once the first one ended. Event streams and
long polls (servicer.py: Events, PollEvents), the health service and the token check are coroutines
on that loop: an open stream costs a waiter, not a thread, so a thousand of them leave Initialize and
health answering. Every other RPC is a plain method run in a thread pool (aio_bridge.SyncHandlers);
Initialize and CreateSession have a few threads of their own, so a client can always connect and open a
session, however many calls wait for the device or for a run to stop.
Past `Limits.max_streams` open streams and long polls, the next one is refused at once
(RESOURCE_EXHAUSTED, TOO_MANY_STREAMS).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Coroutine, Sequence

import grpc

from tdb.v1 import analysis_pb2, analysis_pb2_grpc, debugger_pb2, debugger_pb2_grpc

from . import shm
from .aio_bridge import SyncHandlers
from .decode_guard import DecodeGuard
from .analysis_servicer import AnalysisServicer
from .engine.manager import SessionManager
from .files import FileAccess
from .limits import Limits
from .model import load_model
from .paths import resolve_model
from .security import TokenAuthInterceptor, server_credentials
from .servicer import DebuggerServicer

log = logging.getLogger("tdb.server")

MAX_MESSAGE_BYTES = 256 << 20   # a patch value can be large; reads stream in ~1 MiB chunks anyway
RPC_THREADS = 128    # threads for the plain (blocking) RPCs: model work, and calls that wait for a run to stop
HANDSHAKE_THREADS = 4    # threads of their own for the calls a client starts with (they never wait for the device)
HANDSHAKE = ("/tdb.v1.Debugger/Initialize", "/tdb.v1.Debugger/CreateSession")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _server_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for gRPC servers, started on first use in a daemon thread."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            running = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(running.set)
                loop.run_forever()

            threading.Thread(target=run, name="tdb-aio", daemon=True).start()
            running.wait()
            _loop = loop
        return _loop


def _on_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` on the server loop from any other thread and return its result."""
    return asyncio.run_coroutine_threadsafe(coro, _server_loop()).result()


@dataclass
class ServerHandle:
    server: grpc.aio.Server
    port: int
    sessions: SessionManager
    pools: tuple[futures.ThreadPoolExecutor, ...]
    health: Any = None
    _stopped: bool = field(default=False, repr=False)

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop taking calls, end the sessions (their event streams end, waits return), give running calls
        `grace` seconds, cancel the rest. Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self.health is not None:
            _on_loop(self.health.enter_graceful_shutdown())
        self.sessions.shutdown()
        _on_loop(self.server.stop(grace))
        for pool in self.pools:
            pool.shutdown(wait=False, cancel_futures=True)


async def _enable_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> Any:
    health = None
    try:
        from grpc_health.v1 import health as health_module, health_pb2, health_pb2_grpc

        health = health_module.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        for name in ("", *service_names):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        service_names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    except ImportError:
        log.warning("grpcio-health-checking is not installed: no gRPC health service")
    try:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server)
    except ImportError:
        log.warning("grpcio-reflection is not installed: no server reflection")
    return health


def create_server(address: str, adapter: Any, *, max_workers: int = 0, limits: Limits | None = None,
                  token: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                  data_dirs: Sequence[str] = ()) -> tuple[ServerHandle, int]:
    """Build, bind and start a server for `adapter` on `address` ("host:port"; port 0 = any free).

    token: require `authorization: Bearer <token>` on every RPC but health checks.
    tls_cert/tls_key: PEM files; the port then speaks TLS only.
    data_dirs: folders whose files clients may name (SAE folders, corpora), besides the bundled data and
    the model's folder.
    max_workers: threads for the plain RPCs (default RPC_THREADS; Initialize and CreateSession have
    HANDSHAKE_THREADS of their own); event streams and long polls hold none (at most limits.max_streams
    of them at once)."""
    limits = limits or Limits()
    shm.sweep_dead()     # shared-memory files of servers that died without exiting
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("TLS needs both a certificate and a key")
    credentials = server_credentials(tls_cert, tls_key) if tls_cert else None
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", max(MAX_MESSAGE_BYTES, limits.max_patch_bytes + (1 << 20))),
               ("grpc.so_reuseport", 0)]
    pool = futures.ThreadPoolExecutor(max_workers=max_workers or RPC_THREADS, thread_name_prefix="tdb-rpc")
    handshake = futures.ThreadPoolExecutor(max_workers=HANDSHAKE_THREADS, thread_name_prefix="tdb-handshake")
    sessions = SessionManager(adapter, limits=limits)

    async def build() -> tuple[grpc.aio.Server, Any, int]:
        interceptors = ([TokenAuthInterceptor(token)] if token else []) + [
            DecodeGuard(limits.max_request_bytes), SyncHandlers(pool, reserved=dict.fromkeys(HANDSHAKE, handshake))]
        server = grpc.aio.server(migration_thread_pool=pool, options=options, interceptors=interceptors)
        debugger_pb2_grpc.add_DebuggerServicer_to_server(DebuggerServicer(adapter, sessions), server)
        analysis_pb2_grpc.add_AnalysisServicer_to_server(
            AnalysisServicer(adapter, limits, FileAccess.for_model(adapter, data_dirs)), server)
        names = [debugger_pb2.DESCRIPTOR.services_by_name["Debugger"].full_name,
                 analysis_pb2.DESCRIPTOR.services_by_name["Analysis"].full_name]
        health = await _enable_health_and_reflection(server, names)
        try:
            port = (server.add_secure_port(address, credentials) if credentials is not None
                    else server.add_insecure_port(address))
        except RuntimeError as e:
            raise OSError(f"cannot bind {address}: {e}") from None
        if port == 0:
            raise OSError(f"cannot bind {address}")
        await server.start()
        return server, health, port

    try:
        server, health, port = _on_loop(build())
    except BaseException:
        sessions.shutdown()
        for p in (pool, handshake):
            p.shutdown(wait=False)
        raise
    return ServerHandle(server, port, sessions, (pool, handshake), health), port


def check_port_free(host: str, port: int) -> None:
    """OSError naming the address when something already listens there (a probe bind with SO_REUSEADDR, as
    a listening server would: a port left in TIME_WAIT passes; other bind errors are left to gRPC's own
    bind). Port 0 (any free port) always passes."""
    if port == 0:
        return
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    continue         # e.g. no IPv6 here for "localhost": gRPC binds what it can, as before
                raise OSError(f"cannot bind {host}:{port}: {e.strerror} (something listens there: stop it or "
                              "give another --port)") from None


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 50051, device: str = "auto",
          dtype: str = "auto", ready: threading.Event | None = None, limits: Limits | None = None,
          token: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
          device_map: str | dict | None = None, offload_folder: str | None = None,
          data_dirs: Sequence[str] = ()) -> int:
    """Load the model, serve until SIGINT/SIGTERM, then shut down gracefully."""
    check_port_free(host, port)      # before minutes of loading a large model, not after
    adapter = load_model(resolve_model(model), device=device, dtype=dtype, device_map=device_map,
                         offload_folder=offload_folder)
    handle, bound = create_server(f"{host}:{port}", adapter, limits=limits, token=token, tls_cert=tls_cert,
                                  tls_key=tls_key, data_dirs=data_dirs)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"tdb: listening on {shown_host}:{bound}", flush=True)
    print(f"tdb: model {adapter.info.name} ({adapter.info.architecture}, {adapter.info.n_layers} layers, "
          f"{adapter.info.device}, {adapter.info.dtype})", file=sys.stderr, flush=True)
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if ready is not None:
        ready.set()
    done.wait()
    print("tdb: shutting down", file=sys.stderr, flush=True)
    handle.stop(grace=2.0)
    return 0
