"""Names of any size and shape are refused with a clear SiteError before any costly work (suggestions
cost |name| x |candidates|; a layer of a million digits would not even convert to an int)."""

from __future__ import annotations

import pytest

from tdb_server.model.sites import (MAX_NAME_LEN, SiteError, expand_glob, expand_nodes, parse_layer_node, parse_site,
                                    parse_unit)

HUGE = [
    "blocks." + "9" * 1_000_000 + ".attn.out",
    "blocks." + "9" * 1_000_000 + ".attn.head.1",
    "blocks." + "9" * 1_000_000,
    "x" * 10_000_000,
    "blocks.*" * 100_000,
]


@pytest.mark.parametrize("name", HUGE, ids=lambda n: f"{n[:12]}..({len(n)})")
def test_huge_names_are_refused_by_their_length(gpt2_adapter, name):
    info = gpt2_adapter.info
    for parse in (lambda: parse_site(name, info.n_layers), lambda: parse_unit(name, info.n_layers),
                  lambda: parse_layer_node(name, info.n_layers), lambda: expand_nodes(name, info, {}),
                  lambda: expand_glob(name, info.sites)):
        with pytest.raises(SiteError) as e:
            parse()
        assert f"at most {MAX_NAME_LEN}" in e.value.message and len(e.value.message) < 300


def test_names_at_the_limit_still_get_suggestions(gpt2_adapter):
    with pytest.raises(SiteError) as e:
        parse_site("blocks.1.atn.out", gpt2_adapter.info.n_layers)
    assert "blocks.1.attn.out" in e.value.suggestions
