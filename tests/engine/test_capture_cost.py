"""A capture costs what it holds: `capture=[]` keeps every verified site but the attention patterns, which
are computed only when a pattern site is named, matched by a glob the caller wrote (`*` included) or
under a breakpoint; captured values are the forward's own tensors, not copies."""

from __future__ import annotations

import pytest
import torch

from engine_runs import run_to_end
from tdb_server.errors import NotFound
from tdb_server.model import hooks

IDS = [5, 17, 42, 8, 99, 5, 17, 42, 3, 61]


@pytest.fixture
def patterns_computed(monkeypatch):
    """A list that gets the layer of every attention pattern the attention wrapper computes."""
    seen: list[int] = []
    real = hooks.eager_pattern

    def counted(module, *args, **kwargs):
        seen.append(module.layer_idx)
        return real(module, *args, **kwargs)
    monkeypatch.setattr(hooks, "eager_pattern", counted)
    return seen


def _run(session, capture, breakpoints=()):
    return run_to_end(session, [IDS], capture, breakpoints)


def _patterns(adapter) -> set[str]:
    return {f"blocks.{i}.attn.pattern" for i in range(adapter.info.n_layers)}


def test_the_default_capture_keeps_every_site_but_the_patterns_and_computes_none(gpt2_adapter, session,
                                                                                  patterns_computed):
    run = _run(session, [])
    verified = set(gpt2_adapter.verified_order)
    assert set(run.captured) == verified - _patterns(gpt2_adapter)
    assert patterns_computed == []
    assert not _patterns(gpt2_adapter) & set(run.order)          # not computed, so not a step either
    with pytest.raises(NotFound) as e:
        session.read_value("blocks.1.attn.pattern")
    assert e.value.reason == "NOT_CAPTURED" and "attention patterns" in e.value.message


@pytest.mark.parametrize("capture,layers", [
    (["*"], [0, 1]),                              # every site, patterns too: the caller wrote a glob
    (["blocks.*.attn.pattern"], [0, 1]),
    (["*pattern*"], [0, 1]),
    (["blocks.1.attn.pattern"], [1]),
    (["blocks.1.attn.pattern", "blocks.0.mlp.out"], [1]),
])
def test_patterns_named_or_matched_are_computed_and_kept(gpt2_adapter, session, patterns_computed, capture, layers):
    run = _run(session, capture)
    want = {f"blocks.{layer}.attn.pattern" for layer in layers}
    assert set(run.captured) & _patterns(gpt2_adapter) == want
    if capture == ["*"]:
        assert set(run.captured) == set(gpt2_adapter.verified_order)
    assert sorted(patterns_computed) == layers
    for site in want:
        p = run.captured[site]                                    # [B, H, T, T], rows sum to 1
        assert p.shape == (1, gpt2_adapter.info.n_heads, len(IDS), len(IDS))
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)


def test_a_pattern_breakpoint_computes_only_its_layer(session, patterns_computed):
    run = _run(session, [], breakpoints=("blocks.0.attn.pattern",))
    assert patterns_computed == [0] and "blocks.0.attn.pattern" in run.order
    assert "blocks.0.attn.pattern" not in run.captured            # asked for by the breakpoint, not kept


def test_nothing_captured_computes_no_pattern(session, patterns_computed):
    run = _run(session, ["none"])
    assert run.captured == {} and patterns_computed == []


def test_captures_are_the_forwards_own_tensors_not_copies(gpt2_adapter, session):
    """q, k and v are views of one projection output (GPT-2's c_attn): kept as they are, they share its
    storage; a copy anywhere on the capture path would give each its own."""
    run = _run(session, [])
    for layer in range(gpt2_adapter.info.n_layers):
        q, k, v = (run.captured[f"blocks.{layer}.attn.{x}"] for x in "qkv")
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        z = run.captured[f"blocks.{layer}.attn.z"]                # a [B, T, H, Dh] view of c_proj's input
        assert z._base is not None and z.shape[-2:] == (gpt2_adapter.info.n_heads, gpt2_adapter.info.d_head)
