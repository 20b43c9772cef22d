"""Suggestions for a mistyped unit keep the index typed: `blocks.1.attn.haed.3` -> `blocks.1.attn.head.3`
(as an ablation, a patch or a breakpoint), not `head.0`."""

import pytest

from tdb_server.model import SiteError, parse_site, parse_unit


def test_a_mistyped_unit_suggests_the_unit_with_its_index():
    with pytest.raises(SiteError) as e:
        parse_unit("blocks.1.attn.haed.3", n_layers=2, n_heads=4)
    assert e.value.suggestions[0] == "blocks.1.attn.head.3", e.value.suggestions
    with pytest.raises(SiteError) as e:
        parse_unit("blocks.0.mlp.nueron.17", n_layers=2, d_mlp=64)
    assert e.value.suggestions[0] == "blocks.0.mlp.neuron.17", e.value.suggestions


def test_an_index_past_the_model_is_suggested_in_range():
    with pytest.raises(SiteError) as e:
        parse_unit("blocks.1.attn.haed.9", n_layers=2, n_heads=4)
    assert "blocks.1.attn.head.3" in e.value.suggestions and not any("head.9" in s for s in e.value.suggestions)


def test_a_breakpoint_on_a_mistyped_unit_suggests_the_unit():
    # breakpoints parse a name that is not unit-shaped as a site
    with pytest.raises(SiteError) as e:
        parse_site("blocks.1.attn.haed.3", 2)
    assert e.value.suggestions[0] == "blocks.1.attn.head.3", e.value.suggestions
    with pytest.raises(SiteError) as e:
        parse_site("blocks.0.attn.patern", 2)
    assert e.value.suggestions[0] == "blocks.0.attn.pattern"
