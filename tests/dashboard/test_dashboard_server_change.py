"""A server restarted on the same address with another model: the dashboard shows the new model and none
of the old one's cached answers (tokens, runs), though every cache is keyed on the address."""

from __future__ import annotations

import pytest
from dash_helpers import assert_clean, run_page


def _serve(model: str, port: int = 0):
    from tdb_server.model import load_model
    from tdb_server.paths import bundled_models
    from tdb_server.server import create_server

    path = bundled_models().get(model)
    if path is None:
        pytest.skip(f"the bundled {model} model is not there (scripts/train_bundled.py)")
    return create_server(f"127.0.0.1:{port}", load_model(str(path), device="cpu", dtype="float32"))


def _sidebar(at) -> str:
    return " ".join(m.value for m in at.sidebar.markdown)


def _token_line(at) -> str:
    return next(c.value for c in at.caption if " tokens: " in c.value)


def test_a_server_restarted_with_another_model_is_never_answered_from_the_old_ones_caches():
    from tdb_client import TdbClient

    prompt = "When Mr. Darcy entered the room, Mr."
    handle, port = _serve("induction")
    address = f"127.0.0.1:{port}"
    try:
        first = run_page(address, "logit_lens", prompt=prompt)
        assert_clean(first)
        assert "induction" in _sidebar(first)
    finally:
        handle.stop(grace=None)
    handle, again = _serve("austen", port)
    try:
        assert again == port
        with TdbClient(address) as c:
            want = len(c.tokenize(prompt)[0])
        at = run_page(address, "logit_lens", prompt=prompt)
        assert_clean(at)
        assert "austen" in _sidebar(at) and "induction" not in _sidebar(at)
        assert f"{want} tokens: " in _token_line(at), (want, _token_line(at))
        assert _token_line(at) != _token_line(first)
    finally:
        handle.stop(grace=None)


def test_a_page_run_asks_what_the_server_serves_on_the_cached_client_not_a_new_channel(dash, monkeypatch):
    import grpc
    from dash_helpers import open_page

    opened: list[str] = []
    real = grpc.insecure_channel

    def counting(target, *a, **kw):
        opened.append(target)
        return real(target, *a, **kw)

    monkeypatch.setattr(grpc, "insecure_channel", counting)
    open_page(dash.address, "logit_lens")          # the cached client may be made here, once
    opened.clear()
    open_page(dash.address, "logit_lens")
    assert opened == [], opened


def test_a_server_that_was_down_for_a_page_run_answers_the_next_one_when_it_is_back():
    """The cached client that met no server is not left waiting out gRPC's reconnect backoff."""
    handle, port = _serve("induction")
    address = f"127.0.0.1:{port}"
    try:
        assert_clean(run_page(address, "logit_lens"))
    finally:
        handle.stop(grace=None)
    down = run_page(address, "logit_lens")
    assert any("No tdb server is answering" in e.value for e in down.error), [e.value for e in down.error]
    handle, again = _serve("induction", port)
    try:
        assert again == port
        back = run_page(address, "logit_lens")
        assert_clean(back)
        assert "induction" in _sidebar(back)
    finally:
        handle.stop(grace=None)
