"""The optional OpenAI-compatible explainer against a tiny HTTP server on loopback: the request it
sends, the answer it reads, and polite failures (off, HTTP errors, unreachable, unreadable answers)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tdb_server.explain.llm import configured, explain_llm
from tdb_server.records import Records, Window


def _records() -> Records:
    w = Window(0, [1, 2, 3], ["Mr", ".", " Darcy"], [0.0, 0.1, 2.0], 2.0, 2)
    return Records("blocks.1.mlp.neuron.3", "neuron", "blocks.1.mlp.post", "heldout.txt", "0" * 64, 3, 1, [w], [],
                   2.0, 2.0, 1.0)


class _Fake(BaseHTTPRequestHandler):
    mode = "ok"
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Fake.seen.append((self.path, self.headers.get("Authorization"), body))
        if _Fake.mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        payload = {"choices": [{"message": {"content": "fires on the name ' Darcy' after 'Mr.'"}}]}
        data = b"not json" if _Fake.mode == "garbage" else json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_endpoint(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TDB_EXPLAINER_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("TDB_EXPLAINER_KEY", "sk-test")
    monkeypatch.setenv("TDB_EXPLAINER_TIMEOUT", "5")
    _Fake.seen, _Fake.mode = [], "ok"
    yield server
    server.shutdown()


def test_off_by_default(monkeypatch):
    monkeypatch.delenv("TDB_EXPLAINER_URL", raising=False)
    assert not configured()
    a = explain_llm(_records(), "local text")
    assert a.text == "" and "off" in a.error and "TDB_EXPLAINER_URL" in a.error


def test_asks_an_openai_compatible_endpoint(fake_endpoint):
    a = explain_llm(_records(), "fires on ' Darcy'")
    assert a.error == "" and "Darcy" in a.text
    (path, auth, body), = _Fake.seen
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    user = body["messages"][-1]["content"]
    assert "[[ Darcy]](2.00)" in user and "blocks.1.mlp.neuron.3" in user


@pytest.mark.parametrize("mode, words", [("error", "HTTP 500"), ("garbage", "could not read")])
def test_failures_are_reported_politely(fake_endpoint, mode, words):
    _Fake.mode = mode
    a = explain_llm(_records(), "local")
    assert a.text == "" and words in a.error and "local explanation" in a.error


def test_unreachable_endpoint(monkeypatch):
    with socket.socket() as s:     # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TDB_EXPLAINER_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("TDB_EXPLAINER_TIMEOUT", "3")
    a = explain_llm(_records(), "local")
    assert a.text == "" and "could not reach" in a.error
