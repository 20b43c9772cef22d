"""Every dashboard page, headless (Streamlit AppTest) against a real in-process server.

Numbers on the pages are checked against the same numbers asked of the server directly with
TdbClient — never against values written into the test."""

from __future__ import annotations

import numpy as np
import pytest
from dash_helpers import RANDOM_IDS, button, charts, frame, node_frame, open_page, run_page

from tdb_client import Target, TdbClient, TdbError


def _ids(client: TdbClient, text: str) -> list[int]:
    if text.replace(" ", "").isdigit():
        return [int(t) for t in text.split()]
    return client.tokenize(text)[0]


def _tid(client: TdbClient, text: str) -> int:
    return int(text) if text.isdigit() else client.tokenize(text)[0][0]


# -- the shell ---------------------------------------------------------------------------------------

def test_every_page_renders_with_model_info_in_the_sidebar(dash, page):
    for name in ("explore", "component", "debugger", "patching", "attention", "logit_lens"):
        at = page(name, prompt=dash.prompt)
        sidebar = " ".join(m.value for m in at.sidebar.markdown)
        with TdbClient(dash.address) as c:
            info = c.model_info()
        assert info.name in sidebar and f"{info.n_layers} layers" in sidebar, sidebar
        assert any(dash.address in s.value for s in at.sidebar.success)
        assert at.query_params.get("page", "explore") == name      # the default page is not spelled out


def test_no_server_is_a_message_not_a_traceback():
    at = run_page("127.0.0.1:1", "explore")
    assert not at.exception
    assert any("No tdb server is answering at 127.0.0.1:1" in e.value for e in at.error)


def test_a_server_that_goes_away_is_a_message(gpt2_adapter, make_server):
    handle, address = make_server(gpt2_adapter)
    at = open_page(address, "logit_lens", prompt=RANDOM_IDS)
    handle.stop(grace=None)
    at.text_area[0].input("5 17 42 8 99").run()          # a new prompt: the page must ask the server again
    assert not at.exception
    assert any("No tdb server is answering" in e.value or "Lost the connection" in e.value for e in at.error)


# -- Explore ----------------------------------------------------------------------------------------

def test_explore_candidates_target_and_node_table_match_the_server(dash, page):
    at = page("explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor)
    with TdbClient(dash.address) as c, c.session() as s:
        ids = _ids(c, dash.prompt)
        t, d = _tid(c, dash.target), _tid(c, dash.distractor)
        s.launch(token_ids=[ids])
        r = s.result(top_k=10)
        want = float(r.last_logits[0, t] - r.last_logits[0, d])
        table = c.node_table(ids, Target([t], distractors=[d]), top_k=10, node_types=["head", "neuron"])
    [metric] = [m for m in at.metric if m.label.startswith("logit(target)")]
    assert float(metric.value) == pytest.approx(want, abs=1e-3)
    bars = [ch for ch in charts(at) if ch.get("encoding", {}).get("x", {}).get("field") == "prob"]
    probs = bars[0]["frames"][0]["prob"].to_numpy()
    np.testing.assert_allclose(np.sort(probs)[::-1], [tp.prob for tp in r.top[0]], rtol=1e-5)
    nodes = frame(at)
    assert list(nodes["node"][:10]) == table.top.nodes
    np.testing.assert_allclose(nodes["direct_effect"][:10], table.top.column("direct_effect"), rtol=1e-4, atol=1e-6)


def test_explore_induction_head_near_the_top(dash, page):
    if not dash.ground_truth:
        pytest.skip("the bundled model (with ground_truth.json) is not in the package yet")
    heads = {f"blocks.{layer}.attn.head.{h}" for layer, h in dash.ground_truth["induction_heads"]}
    at = page("explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor, types="head")
    top = list(frame(at)["node"][:3])
    assert heads & set(top), (heads, top)


def test_explore_swap_ablate_trace_and_open_component(dash, page):
    at = page("explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor)
    before = float([m for m in at.metric if m.label.startswith("logit(target)")][0].value)
    button(at, "swap").click().run()
    assert at.query_params["target"] == dash.distractor                  # the view is in the URL
    after = float([m for m in at.metric if m.label.startswith("logit(target)")][0].value)
    assert after == pytest.approx(-before, abs=1e-3)
    button(at, "swap").click().run()

    # ablate the first row: it joins the active ablations, in the URL, and the Ablate analysis re-runs
    node = frame(at)["node"][0]
    button(at, "Ablate").click().run()
    assert not at.exception
    assert at.query_params["ablate"] == node
    with TdbClient(dash.address) as c:
        ids = _ids(c, dash.prompt)
        t, d = _tid(c, dash.target), _tid(c, dash.distractor)
        want = c.ablate(ids, Target([t], distractors=[d]), [node])
        table = c.node_table(ids, Target([t], distractors=[d]), top_k=10, node_types=["head", "neuron"],
                             ablations=[node])
    text = " ".join(m.value for m in at.markdown)
    assert f"{want.after:.4f}" in text, text
    # and the node table is now the one of the ablated forward (its value is the ablated target)
    assert f"with 1 ablated" in text and f"{table.target.value:.4f}" in text, text
    np.testing.assert_allclose(frame(at)["direct_effect"][:10], table.top.column("direct_effect"), rtol=1e-4,
                               atol=1e-6)
    button(at, "remove").click().run()
    assert "ablate" not in at.query_params

    # trace upstream from the first row (the selection stays on a row while it is in the table: pick row 0)
    node = frame(at)["node"][0]
    pick = at.selectbox(key="explore.node")
    pick.set_value(pick.options[0]).run()
    button(at, "Trace upstream").click().run()
    assert not at.exception and at.query_params["trace"] == node
    assert any("Tracing upstream" in i.value for i in at.info)
    button(at, "back to the target").click().run()
    assert "trace" not in at.query_params

    # open the component page of the first row
    button(at, "Open component page").click().run()
    assert not at.exception
    assert at.query_params["page"] == "component" and at.query_params["component"] == node


def test_explore_whole_layer_ablations_are_left_out_of_the_node_table_with_the_servers_reason(dash, page):
    """A layer ablation changes the candidates and the target, not the node table (whose rows would no
    longer add up): the server refuses it there, the page shows the server's message as written, and
    the table is the one of the forward with the units the server accepts ablated."""
    at = page("explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor,
              ablate="blocks.0.attn,blocks.1.attn.head.1,blocks.*.attn.head.2")
    with TdbClient(dash.address) as c:
        ids = _ids(c, dash.prompt)
        t, d = _tid(c, dash.target), _tid(c, dash.distractor)
        with pytest.raises(TdbError) as refused:
            c.node_table(ids, Target([t], distractors=[d]), top_k=10, ablations=["blocks.0.attn"])
        table = c.node_table(ids, Target([t], distractors=[d]), top_k=10, node_types=["head", "neuron"],
                             ablations=["blocks.1.attn.head.1", "blocks.*.attn.head.2"])
        joint = c.ablate(ids, Target([t], distractors=[d]), ["blocks.0.attn", "blocks.1.attn.head.1",
                                                             "blocks.*.attn.head.2"])
    assert refused.value.reason == "BAD_ABLATION"
    [warning] = at.warning
    assert refused.value.message in warning.value.replace("\\", ""), warning.value   # shown as written
    assert "with 2 ablated" in " ".join(m.value for m in at.markdown)
    [metric] = [m for m in at.metric if m.label.startswith("logit(target)")]
    assert float(metric.value) == pytest.approx(joint.results[0].after, abs=1e-3)   # the page's run: both ablated
    nodes = node_frame(at)                         # the node table (the per-ablation effects come first)
    assert list(nodes["node"][:10]) == table.top.nodes


def test_explore_second_prompt_left_diff_right(dash, page):
    with TdbClient(dash.address) as c:
        ids = _ids(c, dash.prompt)
    second = " ".join(map(str, [ids[1], *ids[1:]]))          # the same length, one token changed (as ids)
    at = page("explore", prompt=dash.prompt, prompt2=second, mode="diff", target=dash.target,
              distractor=dash.distractor)
    assert at.toggle[0].value
    diff = frame(at)
    assert {"left_direct_effect", "right_direct_effect"} <= set(diff.columns)
    np.testing.assert_allclose(diff["direct_effect"], diff["left_direct_effect"] - diff["right_direct_effect"],
                               rtol=1e-4, atol=1e-6)
    at.radio(key="url.mode").set_value("right").run()
    assert not at.exception and "left_direct_effect" not in frame(at).columns


# -- Component ----------------------------------------------------------------------------------------

def test_component_page_for_a_head_and_a_neuron(dash, page):
    at = page("component", prompt=dash.prompt, component="blocks.1.attn.head.1")
    with TdbClient(dash.address) as c, c.session() as s:
        ids = _ids(c, dash.prompt)
        s.launch(token_ids=[ids], capture=["blocks.1.attn.pattern", "blocks.0.mlp.post"])
        pattern = s.read("blocks.1.attn.pattern")[0, 1]
        acts = s.read("blocks.0.mlp.post")[0, :, 3]
    heat = [ch["frames"][0] for ch in charts(at) if ch.get("mark", {}).get("type") == "rect"
            and {"row", "col"} <= set(ch["frames"][0].columns)][-1]
    got = heat.pivot(index="row", columns="col", values="value")
    assert got.shape == pattern.shape
    assert np.isclose(got.to_numpy().sum(), pattern.sum(), rtol=1e-5)
    assert len(at.dataframe) == 2            # promoted and suppressed tokens
    if "activation_records" in TdbClient(dash.address).initialize().analyses:   # records and the explanation
        with TdbClient(dash.address) as c:
            ex = c.explain("blocks.1.attn.head.1", n_top=8)
            recs = ex.records or c.activation_records("blocks.1.attn.head.1", n_top=5, n_random=0)
        assert any(ex.text in m.value for m in at.markdown)
        titles = [str(ch.get("title", "")) for ch in charts(at)]
        assert any(f"max {recs.top[0].max_act:.3g}" in t for t in titles), titles
    else:
        assert any("not available on this server yet" in i.value for i in at.info)

    at = page("component", prompt=dash.prompt, component="blocks.0.mlp.neuron.3")
    strip = charts(at)[0]["frames"][0]
    np.testing.assert_allclose(strip["value"].to_numpy(), acts, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["blocks.99.attn.head.0", "blocks.1.attn.hed.1", "blocks.0.mlp.neuron.100000"])
def test_component_page_shows_the_servers_message_for_a_unit_it_does_not_know(dash, name):
    at = run_page(dash.address, "component", component=name)
    with TdbClient(dash.address) as c, c.session() as s, pytest.raises(TdbError) as refused:
        s.patch(name, "zero")
    assert not at.exception
    [error] = at.error
    assert refused.value.message in error.value, error.value
    assert not at.dataframe and not charts(at)          # the page stops there, with one message


def test_component_page_names_what_it_shows_for_a_site_or_a_layer(dash):
    at = run_page(dash.address, "component", component="blocks.1.attn")
    assert not at.exception
    [error] = at.error
    assert "not a head, a neuron or an SAE latent" in error.value


# -- Attention and logit lens -------------------------------------------------------------------------

def test_attention_page_shows_every_head_of_the_layer(dash, page):
    at = page("attention", prompt=dash.prompt, layer="1")
    with TdbClient(dash.address) as c, c.session() as s:
        info = c.model_info()
        s.launch(token_ids=[_ids(c, dash.prompt)], capture=["blocks.1.attn.pattern"])
        pattern = s.read("blocks.1.attn.pattern")[0]              # [head, query, key]
    grid = charts(at)[0]["frames"][0]
    assert sorted(grid["head"].unique()) == list(range(info.n_heads))
    for h in range(info.n_heads):
        assert np.isclose(grid[grid["head"] == h]["value"].sum(), pattern[h].sum(), rtol=1e-5)
    assert at.query_params["layer"] == "1"


def test_logit_lens_page_matches_the_final_logits(dash, page):
    at = page("logit_lens", prompt=dash.prompt)
    with TdbClient(dash.address) as c, c.session() as s:
        info = c.model_info()
        s.launch(token_ids=[_ids(c, dash.prompt)])
        top = s.result(top_k=5).top[0]
    lens = charts(at)[0]["frames"][0]
    last = lens[lens["site"] == f"blocks.{info.n_layers - 1}.resid_post"].sort_values("rank")
    np.testing.assert_allclose(last["prob"].to_numpy(), [t.prob for t in top], rtol=1e-4)
    assert set(lens["site"]) == {"embed", *(f"blocks.{i}.resid_post" for i in range(info.n_layers))}


def test_patching_page_runs_a_sweep_and_fills_the_heatmap(dash, page):
    if dash.bundled:
        corrupted = dash.ground_truth["demo"]["variants"][0]["prompt"]       # the same prompt, another name
    else:
        corrupted = "5 17 42 8 99 23 61 7 17 42 8 99 23"
    at = page("patching", prompt=dash.prompt, prompt2=corrupted, target=dash.target, distractor=dash.distractor)
    at.button(key="patching.run").click().run()
    assert not at.exception and not at.error
    heat = [ch["frames"][0] for ch in charts(at) if ch.get("mark", {}).get("type") == "rect"][0]
    with TdbClient(dash.address) as c:
        ids = _ids(c, dash.prompt)
        bad = _ids(c, corrupted)
        t = c.tokenize(" " + dash.target if not dash.target.startswith(" ") and dash.bundled else dash.target)[0] \
            if c.model_info().has_tokenizer else [int(dash.target)]
        d = c.tokenize(" " + dash.distractor if not dash.distractor.startswith(" ") and dash.bundled
                       else dash.distractor)[0] if c.model_info().has_tokenizer else [int(dash.distractor)]
        want = c.patch_sweep(ids, bad, Target(tokens=t[:1], distractors=d[:1]), kind="head_out")
    got = heat.pivot(index="row", columns="col", values="value")
    assert got.shape == want.normalized.shape
    np.testing.assert_allclose(np.sort(got.to_numpy().ravel()), np.sort(want.normalized.ravel()), rtol=1e-4, atol=1e-5)
    assert any(b.label == "Download CSV" for b in at.get("download_button"))
