"""The Attention page opened from a link whose layer or head the served model does not have (a link made
on a bigger model, a typo): it shows layer 0 / head 0, as before, and now says so under the boxes (it
switched without a word)."""

from __future__ import annotations

from dash_helpers import assert_clean, open_page


def _box(at, label: str):
    return next(s for s in at.selectbox if s.label == label)


def _said(at) -> list[str]:
    return [c.value for c in at.caption]


def test_a_links_layer_and_head_the_model_lacks_are_said(dash):
    at = open_page(dash.address, "attention", prompt=dash.prompt, layer="7", head="9")
    n_layers, n_heads = len(_box(at, "Layer").options), len(_box(at, "Head (up close)").options)
    assert _box(at, "Layer").value == 0 and _box(at, "Head (up close)").value == 0
    said = _said(at)
    assert any(f"Layer 7 is not in this model (layers 0–{n_layers - 1}): showing layer 0." in c for c in said), said
    assert any(f"Head 9 is not in this model (heads 0–{n_heads - 1}): showing head 0." in c for c in said), said
    _box(at, "Layer").set_value(n_layers - 1).run()       # said once: a layer chosen here is kept, no note
    assert_clean(at)
    assert _box(at, "Layer").value == n_layers - 1 and not any("is not in this model" in c for c in _said(at))


def test_a_links_layer_in_range_is_kept_without_a_note(dash):
    at = open_page(dash.address, "attention", prompt=dash.prompt, layer="1", head="1")
    assert _box(at, "Layer").value == 1 and _box(at, "Head (up close)").value == 1
    assert not any("is not in this model" in c for c in _said(at))
