"""The stop decisions of a run (tdb_server/engine/stops.py), without a model, a session or a thread:
which breakpoints are armed at a site, hit counts, and where each kind of step ends."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tdb_server.engine import stops
from tdb_server.engine.breakpoints import BreakpointSpec, parse_hit_condition
from tdb_server.engine.types import When

# the site order of a two-layer model's run (no attention patterns)
ORDER = ["embed"]
for _L in range(2):
    ORDER += [f"blocks.{_L}.resid_pre", f"blocks.{_L}.attn.q", f"blocks.{_L}.attn.k", f"blocks.{_L}.attn.v",
              f"blocks.{_L}.attn.z", f"blocks.{_L}.attn.out", f"blocks.{_L}.resid_mid", f"blocks.{_L}.mlp.pre",
              f"blocks.{_L}.mlp.post", f"blocks.{_L}.mlp.out", f"blocks.{_L}.resid_post"]
ORDER += ["final_norm", "logits"]


def _first_stop(step: stops.Step, after: str) -> str:
    """Where a step started at `after` ends: the first later site at which it is done."""
    return next(site for site in ORDER[ORDER.index(after) + 1:] if stops.step_done(step, site, ORDER))


def _bp(site: str, when: When = When.AFTER, hit: str = "", tokens: tuple[int, int] | None = None,
        verified: bool = True) -> BreakpointSpec:
    return BreakpointSpec(id=1, name=site, when=when, sites=[site], hit_condition=parse_hit_condition(hit),
                          tokens=tokens, verified=verified)


def test_armed_breakpoints_match_site_when_token_and_verification():
    after, before = _bp("blocks.0.attn.out"), _bp("blocks.0.attn.out", When.BEFORE)
    later, unverified = _bp("blocks.0.attn.out", tokens=(2, 3)), _bp("blocks.0.attn.out", verified=False)
    bps = [after, before, later, unverified]
    index_after, index_before = stops.by_site(bps, When.AFTER), stops.by_site(bps, When.BEFORE)
    assert stops.armed(index_after, "blocks.0.attn.out", 0) == [after]
    assert stops.armed(index_after, "blocks.0.attn.out", 2) == [after, later]
    assert stops.armed(index_before, "blocks.0.attn.out", 0) == [before]
    assert stops.armed(index_after, "blocks.1.attn.out", 0) == []


@pytest.mark.parametrize("cond, stops_on", [("", [1, 2, 3, 4]), ("2", [2]), (">=3", [3, 4]), (">2", [3, 4]),
                                            ("%2", [2, 4])])
def test_hit_conditions_count_every_hit(cond, stops_on):
    bp = _bp("logits", hit=cond)
    assert [n for n in range(1, 5) if stops.count_hit(bp)] == stops_on
    assert bp.hits == 4


def test_step_into_ends_at_the_next_site():
    assert _first_stop(("into", ORDER.index("blocks.0.attn.q")), "blocks.0.attn.q") == "blocks.0.attn.k"


def test_step_over_leaves_the_block():
    start = ORDER.index("blocks.0.attn.z")
    assert _first_stop(("over", start), "blocks.0.attn.z") == "blocks.1.resid_pre"
    assert _first_stop(("over", 0), "embed") == "blocks.0.resid_pre"      # outside blocks: the next site


@pytest.mark.parametrize("start, end", [
    ("blocks.0.attn.q", "blocks.0.attn.out"),         # attn -> attn.out
    ("blocks.0.mlp.pre", "blocks.0.mlp.out"),         # mlp -> mlp.out
    ("blocks.0.attn.out", "blocks.0.resid_post"),     # from a module's last site: one level up
    ("blocks.0.resid_mid", "blocks.0.resid_post"),    # block -> resid_post
    ("blocks.0.resid_post", "logits"),                # from a block's last site: the model's end
    ("embed", "logits"),
])
def test_step_out_ends_at_the_end_of_the_enclosing_module(start, end):
    assert stops.step_out_target(start, ORDER) == end
    assert _first_stop(("out", ORDER.index(start)), start) == end


def test_steps_from_a_token_boundary():
    assert stops.step_done(("into", stops.BOUNDARY), "embed", ORDER)
    assert not stops.step_done(("over", stops.BOUNDARY), "embed", ORDER)
    assert not stops.step_done(("token", 3), "logits", ORDER)
    assert stops.reaches_boundary(("token", 3)) and stops.reaches_boundary(("over", 3))
    assert not stops.reaches_boundary(("into", 3)) and not stops.reaches_boundary(None)


def test_where_a_step_starts():
    def stop(site: str, when: When = When.AFTER, reason: str = "breakpoint") -> SimpleNamespace:
        return SimpleNamespace(site=site, when=when, reason=reason)

    assert stops.step_start(5, stop("blocks.0.attn.z")) == 5
    assert stops.step_start(5, stop("blocks.0.attn.z", When.BEFORE)) == 4     # from "before S", into runs S
    assert stops.step_start(-1, stop("", reason="token")) == stops.BOUNDARY
    assert stops.step_start(0, stop("embed", When.BEFORE, "entry")) == -1
