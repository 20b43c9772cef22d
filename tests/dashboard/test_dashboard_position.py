"""Positions in the dashboard: the Position box (Component and Logit lens pages) after the prompt
changes, where a position past the new prompt's end becomes its last position and the page says so (it
was reset without a word); a link's trace position on Explore that is no number at all."""

from __future__ import annotations

import pytest
from dash_helpers import assert_clean, open_page


def _position(at):
    return next(s for s in at.selectbox if s.label == "Position")


def _said(at) -> list[str]:
    return [c.value for c in at.caption]


@pytest.mark.parametrize("name, params", [("component", {"component": "blocks.1.attn.head.1"}),
                                          ("logit_lens", {})])
def test_a_position_past_a_shorter_prompts_end_becomes_its_last_and_the_page_says_so(dash, name, params):
    at = open_page(dash.address, name, prompt=dash.prompt, **params)
    n_long = len(_position(at).options)
    _position(at).set_value(n_long - 1).run()
    assert_clean(at)
    short = " ".join(dash.prompt.split()[:3])
    at.text_area(key="url.prompt").set_value(short).run()
    assert_clean(at)
    box = _position(at)
    n = len(box.options)
    assert n < n_long, (n, n_long)
    assert box.value == n - 1
    assert any(f"Position {n_long - 1} is past the end of this {n}-token prompt" in c for c in _said(at)), _said(at)
    _position(at).set_value(0).run()                  # said once: a position chosen on this prompt is kept
    assert _position(at).value == 0 and not any("past the end" in c for c in _said(at))


def test_a_links_position_past_the_prompts_end_is_said_too(dash):
    at = open_page(dash.address, "component", prompt=dash.prompt, component="blocks.1.attn.head.1", pos="400")
    n = len(_position(at).options)
    assert _position(at).value == n - 1
    assert any(f"Position 400 is past the end of this {n}-token prompt" in c for c in _said(at)), _said(at)


def test_a_links_trace_position_that_is_no_number_is_a_warning_not_a_page_failure(dash):
    from dash_helpers import run_page

    at = run_page(dash.address, "explore", prompt=dash.prompt, trace="blocks.1.attn.head.1", pos="abc")
    assert not at.exception and not at.error, [e.value for e in at.error]
    said = [w.value for w in at.warning]
    assert any("`?pos=abc`" in w and "not traced" in w for w in said), said
    assert at.dataframe, "the node table is still there, untraced"
