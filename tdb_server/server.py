"""Building and running the gRPC server.

`create_server(address, adapter)` builds and starts a server and returns (server, port) — tests
bind "127.0.0.1:0". `serve()` is the blocking entry point behind `tdb serve`: it loads the model,
prints `tdb: listening on HOST:PORT` once the port is bound, and shuts down gracefully on
SIGINT/SIGTERM. Standard gRPC health checking and server reflection are enabled when their packages
(grpcio-health-checking, grpcio-reflection) are installed; the server runs without them.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Sequence

import grpc

from tdb.v1 import analysis_pb2, analysis_pb2_grpc, debugger_pb2, debugger_pb2_grpc

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
RESERVED_WORKERS = 16    # threads no stream or long poll may take: Initialize, health, control calls always answer


@dataclass
class ServerHandle:
    server: grpc.Server
    port: int
    sessions: SessionManager
    health: Any = None

    def stop(self, grace: float | None = 2.0) -> None:
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        self.sessions.shutdown()
        self.server.stop(grace).wait()


def _enable_health_and_reflection(server: grpc.Server, service_names: list[str]) -> Any:
    health = None
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        for name in ("", *service_names):
            health.set(name, health_pb2.HealthCheckResponse.SERVING)
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
    max_workers: RPC threads (default: limits.max_streams for event streams and long polls, which the
    servicer admits up to that many, plus RESERVED_WORKERS for everything else)."""
    limits = limits or Limits()
    max_workers = max_workers or limits.max_streams + RESERVED_WORKERS
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", max(MAX_MESSAGE_BYTES, limits.max_patch_bytes + (1 << 20))),
               ("grpc.so_reuseport", 0)]
    interceptors = [TokenAuthInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tdb-rpc"),
                         options=options, interceptors=interceptors)
    sessions = SessionManager(adapter, limits=limits)
    debugger_pb2_grpc.add_DebuggerServicer_to_server(DebuggerServicer(adapter, sessions), server)
    analysis_pb2_grpc.add_AnalysisServicer_to_server(AnalysisServicer(adapter, limits, FileAccess.for_model(adapter, data_dirs)), server)
    names = [debugger_pb2.DESCRIPTOR.services_by_name["Debugger"].full_name,
             analysis_pb2.DESCRIPTOR.services_by_name["Analysis"].full_name]
    health = _enable_health_and_reflection(server, names)
    if bool(tls_cert) != bool(tls_key):
        sessions.shutdown()
        raise ValueError("TLS needs both a certificate and a key")
    try:
        if tls_cert:
            port = server.add_secure_port(address, server_credentials(tls_cert, tls_key))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        sessions.shutdown()
        raise OSError(f"cannot bind {address}: {e}") from None
    if port == 0:
        sessions.shutdown()
        raise OSError(f"cannot bind {address}")
    server.start()
    return ServerHandle(server, port, sessions, health), port


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 50051, device: str = "auto",
          dtype: str = "auto", ready: threading.Event | None = None, limits: Limits | None = None,
          token: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
          device_map: str | dict | None = None, offload_folder: str | None = None,
          data_dirs: Sequence[str] = ()) -> int:
    """Load the model, serve until SIGINT/SIGTERM, then shut down gracefully."""
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
