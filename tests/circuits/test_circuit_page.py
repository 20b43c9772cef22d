"""The Circuit dashboard page (Streamlit AppTest) against a real in-process server (random GPT-2):
both graphs draw, their numbers come from the server, and a head opens on the Component page."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tdb_client import Target, TdbClient

APP = Path(__file__).resolve().parents[2] / "streamlit_app" / "app.py"
CLEAN = "5 17 42 8 63 17 42 8 63 21"
BAD = "5 17 42 8 91 17 42 8 77 21"


def _run(address: str, **params: str):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    os.environ["TDB_SERVER"] = address      # as `tdb dashboard` sets it; the URL cannot choose the server
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update(page="circuit", **params)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _specs(at):
    return [el for el in _walk(at.main) if getattr(el, "type", "") == "vega_lite_chart"]


def _walk(node):
    yield node
    kids = getattr(node, "children", None)
    for child in kids.values() if isinstance(kids, dict) else []:
        yield from _walk(child)


def test_information_flow_page(gpt2_server):
    at = _run(gpt2_server, prompt=CLEAN)
    assert _specs(at), "no chart drawn"
    with TdbClient(gpt2_server) as c:
        f = c.information_flow([int(t) for t in CLEAN.split()])
    assert any(f"{len(f.graph.edges)} edges on routes" in m.value for m in at.caption)


def test_circuit_page_and_component_link(gpt2_server):
    at = _run(gpt2_server, mode="circuit", prompt=CLEAN, prompt2=BAD, target="42", distractor="17")
    assert _specs(at)
    with TdbClient(gpt2_server) as c:
        r = c.circuit([int(t) for t in CLEAN.split()], [int(t) for t in BAD.split()], Target([42], [17]))
    caption = " ".join(m.value for m in at.caption)
    assert f"faithfulness {r.faithfulness:.3f}" in caption, caption
    heads = [b for b in at.selectbox if b.label == "Head"]
    if heads:   # the circuit has a head: open it
        name = heads[0].value
        [b for b in at.button if b.label == "Open on Component page"][0].click().run()
        assert at.query_params.get("page") == "component"
        assert [t.value for t in at.text_input if t.label == "Component"] == [name]   # (the default is left out of the URL)
