"""Where the adapter's tdb server comes from: a running one (`"server": "host:port"`), or one started
in this process on the bundled model or a `"model"` directory, bound to 127.0.0.1:0.

Embedded servers are kept per (model, device, dtype) for the life of the process, so a `--listen`
adapter serving several IDE sessions loads each model once. This is the only module of the adapter
that imports tdb_server, and only when it has to start one.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass
from typing import Any

from ..client import TdbClient

_lock = threading.Lock()
_embedded: dict[tuple[str, str, str], "Embedded"] = {}


@dataclass
class Embedded:
    address: str
    handle: Any          # tdb_server.server.ServerHandle
    model_path: str

    def stop(self) -> None:
        self.handle.stop(grace=None)


def embedded_server(model: str | None, device: str = "auto", dtype: str = "auto") -> Embedded:
    """Load `model` (a bundled name or a directory; None = the default bundled model) and serve it."""
    from tdb_server.model import load_model
    from tdb_server.paths import resolve_model
    from tdb_server.server import create_server

    path = resolve_model(model)
    key = (path, device, dtype)
    with _lock:
        if key not in _embedded:
            adapter = load_model(path, device=device, dtype=dtype)
            handle, port = create_server("127.0.0.1:0", adapter)
            _embedded[key] = Embedded(f"127.0.0.1:{port}", handle, path)
        return _embedded[key]


def stop_embedded() -> None:
    with _lock:
        servers = list(_embedded.values())
        _embedded.clear()
    for s in servers:
        s.stop()


atexit.register(stop_embedded)


def connect(address: str, timeout: float = 10.0) -> TdbClient:
    """A client of the server at `address`, once it answers (TdbError UNAVAILABLE otherwise)."""
    client = TdbClient(address, timeout=120.0, client_name="tdb-dap")
    try:
        client.wait_ready(timeout)
        client.initialize()
    except Exception:
        client.close()
        raise
    return client
