"""What a new user sees on first opening a page, before typing anything: each page's defaults are
enough to draw its answer (the served model's demo)."""

from __future__ import annotations

from dash_helpers import charts, open_page


def test_the_circuit_mode_opens_on_the_demo_with_a_corrupted_prompt_filled_in(dash):
    # the Patching page's default: the demo with the distractor in place of the answer
    at = open_page(dash.address, "circuit", mode="circuit")
    assert not [i.value for i in at.info if "corrupted prompt" in i.value]
    boxes = {t.label: t.value for t in at.text_area}
    assert boxes["Corrupted prompt (same length)"].strip(), boxes
    assert boxes["Corrupted prompt (same length)"] != boxes["Clean prompt"]
    assert charts(at), "no circuit graph drawn"
