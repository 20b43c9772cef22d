"""Fit and finish, headless: circuit graphs read as graphs (integer axes, a legend that tells q from head,
edge signs explained), and no page calls anything Streamlit has deprecated. (Page widths are checked in
a real browser: test_dashboard_browser.py.)"""

from __future__ import annotations

import pytest
from dash_helpers import assert_clean, charts, run_page

PAGES = ("explore", "component", "debugger", "patching", "attention", "logit_lens", "circuit")


def _layers(spec: dict) -> list[dict]:
    return spec.get("layer", [spec])


def _graph(at) -> dict:
    [graph] = [ch for ch in charts(at) if any(layer.get("mark", {}).get("type") == "rule" or layer.get("mark") == "rule"
                                              for layer in _layers(ch))]
    return graph


def _encoding(graph: dict, mark: str) -> dict:
    return next(layer["encoding"] for layer in _layers(graph)
                if (layer.get("mark", {}).get("type") if isinstance(layer.get("mark"), dict) else layer.get("mark")) == mark)


@pytest.mark.parametrize("mode", ["information flow", "circuit"])
def test_circuit_graphs_have_integer_axes_a_legend_in_words_and_explained_edges(dash, mode):
    params = dict(prompt=dash.prompt, mode=mode)
    if mode == "circuit":
        if not dash.bundled:
            pytest.skip("the circuit needs the bundled model's demo")
        params.update(prompt2=dash.ground_truth["demo"]["variants"][0]["prompt"], target=dash.target,
                      distractor=dash.distractor)
    at = run_page(dash.address, "circuit", **params)
    assert_clean(at)
    graph = _graph(at)
    rule = _encoding(graph, "rule")
    y_axis = rule["y"]["axis"]
    assert y_axis["format"] == "d" and all(float(v).is_integer() for v in y_axis["values"])
    x_axis = rule["x"]["axis"]
    assert all(float(v).is_integer() for v in x_axis["values"])
    colours = dict(zip(rule["color"]["scale"]["domain"], rule["color"]["scale"]["range"]))
    assert colours["q"] != colours["head"] and len(set(colours.values())) == len(colours)
    assert "head's query" in rule["color"]["legend"]["labelExpr"]
    assert rule["strokeDash"]["field"] == "sign"                       # solid raises, dashed lowers
    assert any("dashed ones lower it" in c.value for c in at.caption)
    labels = graph["frames"]
    if mode == "information flow":                                      # positions on the axis, no node labels
        assert all(not str(v) for f in labels if "short" in f for v in f["short"])


def test_no_page_calls_a_deprecated_streamlit_api(dash, monkeypatch):
    from streamlit import deprecation_util

    said: list[str] = []
    monkeypatch.setattr(deprecation_util, "_shown_warnings", set())
    monkeypatch.setattr(deprecation_util._LOGGER, "warning", lambda msg, *a, **k: said.append(str(msg)))
    for page in PAGES:
        at = run_page(dash.address, page, prompt=dash.prompt)
        assert not at.exception, page
    assert not said, said
