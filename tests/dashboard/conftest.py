"""Dashboard fixtures: the app under Streamlit's AppTest against a real in-process tdb server.

The server is the bundled model when it is in the package (its ground_truth.json names the induction
heads), else the tiny random GPT-2 (no tokenizer: prompts are token ids). Nothing is mocked: every
number on a page comes over the wire from the server.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dash_helpers import RANDOM_IDS, open_page  # noqa: E402


@dataclass(frozen=True)
class DashModel:
    address: str
    bundled: bool
    prompt: str                  # the page's prompt box text
    target: str
    distractor: str
    ground_truth: dict | None    # the bundled model's ground_truth.json


@pytest.fixture(scope="session")
def dash_server(request):
    """A server of the dashboard's own (its pages leave sessions open, as a browser tab would), on its own
    adapter object, so other tests' hook and session checks never see the dashboard's sessions."""
    from tdb_server.model import build_random_model, load_model
    from tdb_server.paths import bundled_models, circuit_model_path
    from tdb_server.server import create_server

    if bundled_models():
        adapter = load_model(str(circuit_model_path()), device="cpu", dtype="float32")
    else:
        adapter = build_random_model("gpt2", seed=0)
    handle, port = create_server("127.0.0.1:0", adapter)
    yield f"127.0.0.1:{port}"
    handle.stop(grace=None)


@pytest.fixture(scope="session")
def dash(request, dash_server) -> DashModel:
    from tdb_server.paths import bundled_models, circuit_model_path

    if bundled_models():
        address = dash_server
        gt_file = circuit_model_path() / "ground_truth.json"
        gt = json.loads(gt_file.read_text()) if gt_file.is_file() else None
        demo = (gt or {}).get("demo", {})
        from streamlit_app.widgets import EXAMPLE_PROMPT

        return DashModel(address, True, demo.get("prompt", EXAMPLE_PROMPT), demo.get("answer", " Darcy"),
                         demo.get("distractor", " Bingley"), gt)
    return DashModel(dash_server, False, RANDOM_IDS, "17", "42", None)


@pytest.fixture
def page(dash):
    def open_(name: str, **params: str):
        return open_page(dash.address, name, **params)
    return open_



@pytest.fixture(scope="session")
def dash_gpt2_server():
    """The tiny random GPT-2 on a server (and adapter object) of the dashboard tests' own."""
    from tdb_server.model import build_random_model
    from tdb_server.server import create_server

    handle, port = create_server("127.0.0.1:0", build_random_model("gpt2", seed=0))
    yield f"127.0.0.1:{port}"
    handle.stop(grace=None)


@pytest.fixture(scope="module")
def austen():
    """The austen model (byte-level BPE, its SAE attached) on a server of the test module's own."""
    from tdb_server.model import load_model
    from tdb_server.paths import bundled_models
    from tdb_server.server import create_server

    models = bundled_models()
    if "austen" not in models:
        pytest.skip("the austen model is not bundled")
    handle, port = create_server("127.0.0.1:0", load_model(str(models["austen"]), device="cpu", dtype="float32"))
    yield f"127.0.0.1:{port}"
    handle.stop(grace=None)
