"""The Debugger page, headless: breakpoints from the model's sites, launch, stepping moves the stack,
variables expand to a heatmap / histogram of the real tensor, a patch at the stop changes the result,
and the event log fills."""

from __future__ import annotations

import numpy as np
from dash_helpers import RANDOM_IDS, assert_clean, button, charts, frame, open_page

from tdb_client import TdbClient

IDS = RANDOM_IDS


def _stack(at) -> list[str]:
    return list(at.radio(key=next(k for k in _keys(at) if k.startswith("dbg.frame."))).options)


def _keys(at) -> list[str]:
    return [r.key for r in at.radio if r.key]


def test_launch_step_inspect_patch_continue(dash_gpt2_server):
    at = open_page(dash_gpt2_server, "debugger", prompt=IDS, bp="blocks.0.attn.out")
    assert at.multiselect(key="url.bp").value == ["blocks.0.attn.out"]
    assert not button(at, "Launch").disabled and button(at, "Into").disabled

    button(at, "Launch").click().run()
    assert_clean(at)
    assert any("paused" in s.value and "blocks.0.attn.out" in s.value for s in at.success)
    assert _stack(at) == ["blocks.0.attn.out", "blocks.0.attn", "blocks.0", "model"]
    assert not button(at, "Into").disabled                          # the toolbar follows the new state

    # the variables table and the tensor viewer show the real tensor
    variables = frame(at)
    assert "blocks.0.attn.out" in set(variables["name"])
    heat = charts(at)[-1]["frames"][0]
    with TdbClient(dash_gpt2_server) as c, c.session() as s:
        s.launch(token_ids=[[int(t) for t in IDS.split()]], capture=["blocks.0.attn.out"])
        want = s.read("blocks.0.attn.out")[0]                      # [pos, d_model]
    got = heat.pivot(index="row", columns="col", values="value")
    assert got.shape == want.shape and np.isclose(got.to_numpy().sum(), want.sum(), rtol=1e-4, atol=1e-6)
    at.radio(key=next(k for k in _keys(at) if k.startswith("dbg.view."))).set_value("histogram").run()
    assert_clean(at)
    hist = charts(at)[-1]["frames"][0]
    assert hist["count"].sum() == want.size

    # stepping moves the stack
    button(at, "Into").click().run()
    assert_clean(at)
    assert _stack(at)[0] == "blocks.0.resid_mid"
    button(at, "Over").click().run()
    assert _stack(at)[0] != "blocks.0.resid_mid"

    # patch at the stop (zero everything from here on), then continue: the result changes
    at.text_input(key="dbg.patch.site").set_value("blocks.1.attn.out")
    at.selectbox(key="dbg.patch.op").set_value("zero")
    at.button[[b.label for b in at.button].index("Apply patch")].click().run()
    assert_clean(at)
    assert any("patch" in s.value for s in at.success)
    button(at, "Continue").click().run()
    assert_clean(at)
    assert any("the run finished" in i.value for i in at.info)
    assert charts(at)[-1]["encoding"]["x"]["field"] == "prob"         # next-token candidates

    log = frame(at, -1)
    assert {"run_started", "stopped", "run_exited"} <= set(log["event"])


def test_unknown_breakpoint_is_a_message(dash_gpt2_server):
    at = open_page(dash_gpt2_server, "debugger", prompt=IDS, bpx="blocks.0.atn.out")
    assert not at.exception
    msgs = [w.value for w in at.warning] + [e.value for e in at.error]
    assert any("blocks.0.attn.out" in m for m in msgs), msgs          # the nearest valid name is suggested


def test_a_mistyped_breakpoint_in_a_link_shows_the_servers_refusal(dash_gpt2_server):
    """`?bp=` names sites for the picker; a name the picker lacks is not dropped: the server judges it."""
    at = open_page(dash_gpt2_server, "debugger", prompt=IDS, bp="blocks.0.atn.out,blocks.1.attn.out")
    assert at.multiselect(key="url.bp").value == ["blocks.1.attn.out"]
    assert at.text_input(key="url.bpx").value == "blocks.0.atn.out"
    said = [w.value for w in at.warning]
    assert any("unknown site 'blocks.0.atn.out'" in m and "blocks.0.attn.out" in m for m in said), said
    assert at.query_params["bpx"] == "blocks.0.atn.out"              # the link keeps it, where it is judged


def test_a_unit_in_a_links_bp_is_a_breakpoint_too(dash_gpt2_server):
    at = open_page(dash_gpt2_server, "debugger", prompt=IDS, bp="blocks.1.attn.head.2", bpx="blocks.0.mlp.out")
    assert at.text_input(key="url.bpx").value == "blocks.0.mlp.out, blocks.1.attn.head.2"
    assert not at.warning, [w.value for w in at.warning]
    assert [b.verified for b in at.session_state["dbg.bp_status"]] == [True, True]


def test_the_page_offers_the_session_recording_and_a_replay(dash_gpt2_server):
    at = open_page(dash_gpt2_server, "debugger", prompt=IDS, bp="blocks.0.attn.out")
    labels = [str(b.proto.label) for b in at.get("download_button")]
    assert "Download this session's recording" in labels
    assert at.get("file_uploader"), "no way to open a recording"
