"""Where the adapter's tdb server comes from: a running one (`"server": "host:port"`), or one started
in this process on the bundled model or a `"model"` directory, bound to 127.0.0.1:0.

A `"model"` directory obeys the allow-list of the server's own files (tdb_server/files.py): it must lie
inside the bundled data or a folder given to `tdb dap --data-dir`, and the embedded server started on
it lets clients name files under those folders and the model's own. Embedded servers are kept per
(model, device, dtype) for the life of the process, so a `--listen` adapter serving several IDE
sessions loads each model once. This is the only module of the adapter that imports tdb_server, and
only when it has to start one.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..client import TdbClient
from .protocol import DapError

_lock = threading.Lock()
_embedded: dict[tuple[str, str, str], "Embedded"] = {}


@dataclass
class Embedded:
    address: str
    handle: Any          # tdb_server.server.ServerHandle
    model_path: str

    def stop(self) -> None:
        self.handle.stop(grace=None)


def model_path(model: str | None, data_dirs: Sequence[str] = ()) -> str:
    """The folder of `model` (a bundled name, a directory under the allow-list, or None for the default
    bundled model); DapError, with tdb's own words, for anything else. Fast: nothing is loaded."""
    try:
        from tdb_server.errors import TdbServerError
        from tdb_server.files import FileAccess
        from tdb_server.paths import BUNDLED_DIR, bundled_models, resolve_model
    except ImportError:
        raise DapError("this tdb dap cannot start a server of its own (tdb_server is not installed, as with the "
                       "tdb-client distribution): name a running one with \"server\" in the launch configuration "
                       "or start the bridge as `python -m tdb_client.dap --server HOST:PORT`") from None

    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise DapError("'model' must be a bundled model's name or a model folder")
    try:
        path = resolve_model(model)
    except FileNotFoundError as e:
        raise DapError(f"no model to load: {e}") from None
    names = ", ".join(bundled_models()) or "none"
    try:
        FileAccess([BUNDLED_DIR, *data_dirs]).check(path, "model")
    except TdbServerError:
        raise DapError(f"model {model!r} is not a bundled model ({names}) nor inside a folder tdb dap may load "
                       "models from: start `tdb dap --data-dir FOLDER` (or set TDB_DATA_DIRS) to allow one") from None
    if not (Path(path) / "config.json").is_file():
        raise DapError(f"model {model!r} is not a bundled model ({names}) nor a model folder "
                       "(a folder with a config.json, as save_pretrained writes)")
    return path


def is_loaded(path: str, device: str = "auto", dtype: str = "auto") -> bool:
    """Whether an embedded server on the model folder `path` is already running (no loading to wait for)."""
    with _lock:
        return (path, device, dtype) in _embedded


def embedded_server(path: str, device: str = "auto", dtype: str = "auto", data_dirs: Sequence[str] = ()) -> Embedded:
    """Load the model folder `path` (from model_path) and serve it, or the server already on it."""
    from tdb_server.model import load_model
    from tdb_server.server import create_server

    key = (path, device, dtype)
    with _lock:
        if key not in _embedded:
            adapter = load_model(path, device=device, dtype=dtype)
            handle, port = create_server("127.0.0.1:0", adapter, data_dirs=list(data_dirs))
            _embedded[key] = Embedded(f"127.0.0.1:{port}", handle, path)
        return _embedded[key]


def stop_embedded() -> None:
    with _lock:
        servers = list(_embedded.values())
        _embedded.clear()
    for s in servers:
        s.stop()


atexit.register(stop_embedded)


def connect(address: str, token: str = "", timeout: float = 10.0) -> TdbClient:
    """A client of the server at `address`, once it answers (TdbError UNAVAILABLE otherwise). `token` is
    sent as given ("" sends none: the client never falls back to $TDB_TOKEN here)."""
    client = TdbClient(address, timeout=120.0, client_name="tdb-dap", token=token)
    try:
        client.wait_ready(timeout)
        client.initialize()
    except Exception:
        client.close()
        raise
    return client
