"""A step's stop describes itself in words that read after its reason ("step"): the dashboard shows
"step: stepped into blocks.0.resid_mid", the IDE the description alone (it used to read "step into to ...")."""

from __future__ import annotations

IDS = [[5, 17, 42, 8, 99, 5, 17, 42, 3, 61]]


def test_each_kind_of_step_says_what_it_did(client):
    with client.session() as s:
        s.set_breakpoints(["blocks.0.attn.out"])
        s.launch(token_ids=IDS)
        into = s.step("into")
        assert into.stop.reason == "step" and into.stop.description == f"stepped into {into.stop.site}"
        over = s.step("over")
        assert over.stop.description == f"stepped over to {over.stop.site}"
        out = s.step("out")
        assert out.stop.description == f"stepped out to {out.stop.site}"
        s.terminate()
