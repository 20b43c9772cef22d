"""Shared fixtures: an in-process server on 127.0.0.1:0 over a model, and a connected client.

Tests go through the real wire (a gRPC channel over loopback), like a user's client would."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tdb_client import TdbClient  # noqa: E402
from tdb_server.model import build_random_model, load_model  # noqa: E402
from tdb_server.paths import bundled_models  # noqa: E402
from tdb_server.server import create_server  # noqa: E402


@pytest.fixture(autouse=True)
def _hermetic_environment(monkeypatch):
    """Each test starts without the user's (or an earlier test's) $TDB_SERVER / $TDB_TOKEN: dashboard tests
    set $TDB_SERVER as `tdb dashboard` does, and the DAP bridge sends its token where it names."""
    for name in ("TDB_SERVER", "TDB_TOKEN", "TDB_DAP_TOKEN", "TDB_DASHBOARD_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def gpt2_adapter():
    """A tiny random-weight GPT-2 (2 layers, 4 heads)."""
    return build_random_model("gpt2", seed=0)


@pytest.fixture(scope="session")
def bundled_adapter():
    """The bundled model with the verified induction circuit (scripts/train_bundled.py; its ground truth is in
    ground_truth.json next to it)."""
    if not bundled_models():
        pytest.fail("no bundled model in tdb_server/bundled/: run scripts/train_bundled.py")
    from tdb_server.paths import circuit_model_path

    return load_model(str(circuit_model_path()), device="cpu", dtype="float32")


def _serve(adapter, **kw):
    kw.setdefault("data_dirs", [tempfile.gettempdir()])   # tests write SAEs and corpora under tmp_path
    handle, port = create_server("127.0.0.1:0", adapter, **kw)
    return handle, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def gpt2_server(gpt2_adapter):
    handle, addr = _serve(gpt2_adapter)
    yield addr
    handle.stop(grace=None)


@pytest.fixture(scope="session")
def bundled_server(bundled_adapter):
    handle, addr = _serve(bundled_adapter)
    yield addr
    handle.stop(grace=None)


@pytest.fixture
def client(gpt2_server):
    with TdbClient(gpt2_server, timeout=60) as c:
        yield c


@pytest.fixture
def bundled_client(bundled_server):
    with TdbClient(bundled_server, timeout=120) as c:
        yield c


@pytest.fixture
def make_server():
    """Start extra servers with custom options (stopped at the end of the test)."""
    handles = []

    def make(adapter, **kw):
        handle, addr = _serve(adapter, **kw)
        handles.append(handle)
        return handle, addr

    yield make
    for h in handles:
        h.stop(grace=None)
