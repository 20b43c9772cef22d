"""The site grammar: names, order, errors with suggestions, globs, shapes, hierarchy."""

import pytest

from tdb_server.model import (
    SiteError, all_sites, enclosing, expand_glob, parse_site, parse_unit, sites_in,
)
from tdb_server.errors import InvalidArgument


def test_all_sites_execution_order():
    sites = all_sites(2)
    assert sites[0] == "embed" and sites[-2:] == ["final_norm", "logits"]
    assert sites[1:13] == [f"blocks.0.{k}" for k in (
        "resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.out",
        "resid_mid", "mlp.pre", "mlp.post", "mlp.out", "resid_post")]
    assert len(sites) == 1 + 2 * 12 + 2 and len(set(sites)) == len(sites)


def test_parse_site():
    s = parse_site("blocks.1.attn.z", 2)
    assert (s.name, s.layer, s.kind, s.module) == ("blocks.1.attn.z", 1, "attn.z", "attn")
    assert parse_site("logits", 2).layer is None
    assert parse_site("blocks.0.resid_mid", 2).module is None


def test_unknown_site_suggests_nearest():
    with pytest.raises(SiteError) as e:
        parse_site("blocks.0.attn.patern", 2)
    assert "blocks.0.attn.pattern" in str(e.value) and "blocks.0.attn.pattern" in e.value.suggestions
    assert isinstance(e.value, ValueError) and isinstance(e.value, InvalidArgument)
    with pytest.raises(SiteError, match="not one of 0..1"):
        parse_site("blocks.2.resid_pre", 2)
    with pytest.raises(SiteError, match="not one of"):
        parse_site("blocks.01.resid_pre", 2)
    with pytest.raises(SiteError, match="unit name"):
        parse_site("blocks.0.attn.head.1", 2)
    with pytest.raises(SiteError, match="did you mean"):
        parse_site("logit", 2)


def test_parse_unit():
    u = parse_unit("blocks.1.attn.head.3", n_layers=2, n_heads=4)
    assert (u.kind, u.layer, u.index, u.site) == ("head", 1, 3, "blocks.1.attn.z")
    u = parse_unit("blocks.0.mlp.neuron.17")
    assert (u.kind, u.site) == ("neuron", "blocks.0.mlp.post")
    u = parse_unit("blocks.0.resid_post.sae.latent.5")
    assert (u.kind, u.index, u.site) == ("latent", 5, "blocks.0.resid_post")
    with pytest.raises(SiteError, match="out of range"):
        parse_unit("blocks.0.attn.head.4", n_heads=4)
    with pytest.raises(SiteError) as e:
        parse_unit("blocks.0.attn.heads.1", n_layers=2)
    assert e.value.suggestions


def test_expand_glob():
    sites = all_sites(3)
    assert expand_glob("blocks.*.mlp.out", sites) == [f"blocks.{i}.mlp.out" for i in range(3)]
    assert expand_glob("blocks.1.attn.*", sites)[0] == "blocks.1.attn.q"
    assert expand_glob("logits", sites) == ["logits"]
    with pytest.raises(SiteError):
        expand_glob("blocks.*.mlp.outt", sites)
    with pytest.raises(SiteError):
        expand_glob("logitz", sites)


def test_hierarchy():
    assert enclosing("blocks.3.attn.z") == ("blocks.3", "blocks.3.attn")
    assert enclosing("blocks.3.resid_mid") == ("blocks.3",)
    assert enclosing("logits") == ()
    assert sites_in("blocks.1.mlp", 2) == ["blocks.1.mlp.pre", "blocks.1.mlp.post", "blocks.1.mlp.out"]
    assert sites_in("blocks.0", 2)[-1] == "blocks.0.resid_post"
    with pytest.raises(SiteError):
        sites_in("blocks.5", 2)
