"""What the API had and the dashboard lacked (issue 19): generation in the Debugger, SAE latents,
tracing a head's score through the key it attends to, integrated gradients with their completeness.
Numbers are checked against the same questions asked of the server with TdbClient."""

from __future__ import annotations

import numpy as np
import pytest
from dash_helpers import assert_clean, button, charts, frame, node_frame, run_page

from tdb_client import Breakpoint, Generate, Target, TdbClient


# -- generation in the Debugger -------------------------------------------------------------------------

def test_generation_steps_by_token_and_shows_the_text_so_far(dash):
    at = run_page(dash.address, "debugger", prompt=dash.prompt)
    assert_clean(at)
    at.number_input(key="dbg.new_tokens").set_value(3).run()
    button(at, "Launch").click().run()
    assert_clean(at)
    assert any("paused" in s.value and "generation step 0" in s.value for s in at.success), \
        [s.value for s in at.success]
    assert not button(at, "Token").disabled
    button(at, "Token").click().run()
    assert_clean(at)
    assert any("generation step 1" in s.value for s in at.success)
    with TdbClient(dash.address) as c, c.session() as s:
        ids = c.tokenize(dash.prompt)[0] if c.model_info().has_tokenizer else [int(t) for t in dash.prompt.split()]
        s.launch(token_ids=[ids], generate=Generate(3))
        want = s.result(include_logits=False)
    shown = [cd.value for cd in at.code if "⟦" in cd.value]
    assert shown and shown[0].startswith(dash.prompt + "⟦")
    so_far = shown[0].split("⟦", 1)[1].rstrip("⟧")
    assert so_far and want.generated_text[0].startswith(so_far), (so_far, want.generated_text)
    button(at, "Continue").click().run()
    while any("paused" in s.value for s in at.success):
        button(at, "Continue").click().run()
    assert_clean(at)
    final = [cd.value for cd in at.code if "⟦" in cd.value][0]
    assert final == dash.prompt + "⟦" + want.generated_text[0] + "⟧"


def test_breakpoints_limited_to_generation_steps(dash):
    at = run_page(dash.address, "debugger", prompt=dash.prompt, bp="blocks.0.attn.out", bpsteps="2")
    at.number_input(key="dbg.new_tokens").set_value(3).run()
    at.checkbox(key="dbg.stop_tokens").uncheck().run()
    button(at, "Launch").click().run()
    assert_clean(at)
    [paused] = [s.value for s in at.success if "paused" in s.value]
    assert "blocks.0.attn.out" in paused and "generation step 2" in paused, paused
    with TdbClient(dash.address) as c, c.session() as s:
        s.set_breakpoints([Breakpoint("blocks.0.attn.out", tokens=(2, 2))])
        ids = c.tokenize(dash.prompt)[0] if c.model_info().has_tokenizer else [int(t) for t in dash.prompt.split()]
        st = s.launch(token_ids=[ids], generate=Generate(3))
        assert st.stop.token == 2


def test_a_bad_generation_step_range_is_a_message(dash):
    at = run_page(dash.address, "debugger", prompt=dash.prompt, bp="blocks.0.attn.out", bpsteps="3-1")
    assert not at.exception
    assert [e for e in at.error if "FIRST <= LAST" in e.value]


# -- SAE latents ------------------------------------------------------------------------------------------

def test_explore_offers_sae_latents_when_an_sae_is_attached(austen):
    with TdbClient(austen) as c:
        [sae] = c.list_saes()
        demo = c.model_info().demo
        want = c.node_table(demo.prompt, Target(demo.answer, distractors=demo.distractor), top_k=10,
                            node_types=["head", "neuron", "sae_latent"])
    at = run_page(austen, "explore", prompt=demo.prompt)
    assert_clean(at)
    assert "sae_latent" in at.multiselect(key="url.types").value
    nodes = list(node_frame(at)["node"][:10])
    assert nodes == want.top.nodes
    assert any(n.startswith(sae.unit_prefix) for n in nodes), nodes
    shown = node_frame(at)
    latents = shown[shown["node_type"] == "sae_latent"]
    assert len(latents) and (latents["key_pos"] == "").all(), latents     # no key position for a latent
    sidebar = " ".join(c.value for c in at.sidebar.caption)
    assert sae.site in sidebar and str(sae.d_sae) in sidebar


def test_the_component_page_of_a_latent(austen):
    with TdbClient(austen) as c, c.session() as s:
        [sae] = c.list_saes()
        demo = c.model_info().demo
        latent = sae.latent(124)
        s.launch(demo.prompt, capture=[sae.site])
        acts = s.evaluate(latent).value[0]                        # [pos]
        ex = c.explain(latent, n_top=8)
    at = run_page(austen, "component", component=latent, prompt=demo.prompt)
    assert_clean(at)
    strip = charts(at)[0]["frames"][0]
    np.testing.assert_allclose(strip["value"].to_numpy(), acts, rtol=1e-5, atol=1e-6)
    promoted = frame(at, 0)
    assert list(promoted["token"][:3]) == [t.replace(" ", "␣") for t, _ in ex.promoted[:3]]
    assert any(ex.text in m.value for m in at.markdown)


def test_attaching_an_sae_from_the_sidebar_shows_the_servers_answer(austen, tmp_path):
    at = run_page(austen, "explore")
    at.sidebar.text_input(key="sidebar.sae_path").input(str(tmp_path / "nothing-here"))
    at.sidebar.button(key="sidebar.sae_attach").click().run()
    assert not at.exception
    with TdbClient(austen) as c, pytest.raises(Exception) as refused:
        c.attach_sae(str(tmp_path / "nothing-here"))
    [error] = at.sidebar.error
    assert refused.value.message in error.value


# -- tracing a head's score: the key it attends to most by default ---------------------------------------------

def test_tracing_through_k_defaults_to_the_key_the_head_attends_to_most(dash):
    at = run_page(dash.address, "explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor,
                  types="head")
    assert_clean(at)
    rows = node_frame(at)
    pick = at.selectbox(key="explore.node")
    pick.set_value(pick.options[0]).run()
    at.selectbox(key="explore.act.part").set_value("k").run()
    assert_clean(at)
    node, pos = rows["node"][0], int(rows["query_pos"][0])
    layer, head = int(node.split(".")[1]), int(node.split(".")[-1])
    with TdbClient(dash.address) as c:
        ids = c.tokenize(dash.prompt)[0] if c.model_info().has_tokenizer else [int(t) for t in dash.prompt.split()]
        pattern = c.attention_pattern(ids, layer, [head]).pattern[0, pos, :pos + 1]
    keypos = at.selectbox(key=f"explore.act.keypos.{node}.{pos}")
    assert keypos.value == int(np.argmax(pattern))
    button(at, "Trace upstream").click().run()
    assert_clean(at)
    assert at.query_params["keypos"] == str(int(np.argmax(pattern))) and at.query_params["part"] == "k"


# -- integrated gradients on the page, with their completeness ------------------------------------------------

def test_integrated_gradients_on_explore_show_their_completeness_gap(dash):
    at = run_page(dash.address, "explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor,
                  tokens="integrated gradients")
    assert_clean(at)
    with TdbClient(dash.address) as c:
        ids = c.tokenize(dash.prompt)[0] if c.model_info().has_tokenizer else [int(t) for t in dash.prompt.split()]
        t = c.logit_lens(ids, ["embed"], top_k=1, target=Target(dash.target, distractors=dash.distractor)).target
        want = c.input_attribution(ids, Target([int(t.token_ids[0])], [int(t.distractor_ids[0])]),
                                   methods=["integrated_gradients"], tolerance=0.01)
    strip = [ch["frames"][0] for ch in charts(at) if "integrated gradients" in str(ch)][0]
    np.testing.assert_allclose(strip["value"].to_numpy(), want.integrated_gradients, rtol=1e-4, atol=1e-5)
    said = " ".join(x.value for x in [*at.caption, *at.warning])
    assert f"completeness gap {want.completeness_gap:+.4f}" in said and f"{want.steps} steps" in said


# -- the node table's estimate beside the exact ablation effect ----------------------------------------------

def test_explore_shows_the_estimate_beside_the_exact_ablation_effect(dash):
    at = run_page(dash.address, "explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor,
                  verify="8")
    assert_clean(at)
    with TdbClient(dash.address) as c:
        ids = c.tokenize(dash.prompt)[0] if c.model_info().has_tokenizer else [int(t) for t in dash.prompt.split()]
        t = c.logit_lens(ids, ["embed"], top_k=1, target=Target(dash.target, distractors=dash.distractor)).target
        want = c.node_table(ids, Target([int(t.token_ids[0])], [int(t.distractor_ids[0])]), top_k=1,
                            node_types=["head", "neuron"], verify_top=8).verification
    table = frame(at, -1)
    assert list(table.columns[3:5]) == ["estimate (activation × gradient)", "exact (zero ablation)"]
    np.testing.assert_allclose(table["exact (zero ablation)"], want.exact, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(table["estimate (activation × gradient)"], want.estimate, rtol=1e-4, atol=1e-5)
    assert any(f"Spearman {want.spearman:.3f}" in cap.value for cap in at.caption)
