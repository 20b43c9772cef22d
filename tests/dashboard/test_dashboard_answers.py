"""The dashboard never shows a silently wrong answer (issue 19, "Wrong answers without a word").

Each page reads targets, prompts and ablations through the server and shows its words as written; what
the server refuses is not computed. Expected messages and numbers come from the server itself (asked
directly with TdbClient), never from strings written into the test."""

from __future__ import annotations

import pytest
from dash_helpers import charts, node_frame, run_page

from tdb_client import Target, TdbClient, TdbError

TARGET_PAGES = ("explore", "patching", "circuit", "logit_lens")


def _plain(text: str) -> str:
    return text.replace("\\", "")


def _page_text(at) -> str:
    return _plain(" ".join(e.value for e in [*at.markdown, *at.caption, *at.warning, *at.error, *at.info]))


def _target_params(page: str, prompt: str, target: str, distractor: str) -> dict:
    params = dict(prompt=prompt, target=target, distractor=distractor)
    if page in ("patching", "circuit"):
        params.update(prompt2=prompt, mode="circuit" if page == "circuit" else "")
    return {k: v for k, v in params.items() if v}


# -- 1. a target not in the vocabulary: refused on every page, in the server's words ---------------------

@pytest.mark.parametrize("page", TARGET_PAGES)
def test_a_target_the_vocabulary_lacks_is_refused_on_every_page_with_the_servers_message(dash, page):
    if not dash.bundled:
        pytest.skip("needs the bundled model's tokenizer")
    word = "Pemberley"
    with TdbClient(dash.address) as c, pytest.raises(TdbError) as refused:
        c.node_table(dash.prompt, Target(word, distractors=dash.distractor), top_k=1)
    assert refused.value.reason == "BAD_TARGET"
    at = run_page(dash.address, page, **_target_params(page, dash.prompt, word, dash.distractor))
    assert not at.exception
    assert [e for e in at.error if refused.value.message in _plain(e.value)], [e.value for e in at.error]
    assert not at.metric and not at.dataframe                     # nothing computed on a refused target
    assert not [ch for ch in charts(at) if ch.get("mark", {}).get("type") in ("rect", "bar", "line")
                and page != "explore"]


@pytest.mark.parametrize("page", TARGET_PAGES)
def test_the_servers_notes_on_a_target_are_shown_as_written(austen, page):
    with TdbClient(austen) as c:
        demo = c.model_info().demo
        r = c.logit_lens(demo.prompt, ["embed"], top_k=1, target=Target("Darcy", distractors=demo.distractor))
    assert any("did you mean ' Darcy'?" in n for n in r.target.notes), r.target.notes
    at = run_page(austen, page, **_target_params(page, demo.prompt, "Darcy", demo.distractor))
    assert not at.exception
    text = _page_text(at)
    for note in r.target.notes:
        assert note in text, (note, text[:2000])


def test_explore_computes_with_the_token_the_server_resolved(austen):
    with TdbClient(austen) as c:
        demo = c.model_info().demo
        want = c.node_table(demo.prompt, Target("Darcy", distractors=demo.distractor), top_k=10,
                            node_types=["head", "neuron", "sae_latent"])
    at = run_page(austen, "explore", prompt=demo.prompt, target="Darcy", distractor=demo.distractor)
    assert want.target.description in _page_text(at)
    assert list(node_frame(at)["node"][:10]) == want.top.nodes


# -- 2. prompt words the tokenizer cannot represent; each model's own demo ---------------------------------

def test_the_token_strip_marks_unknown_tokens_and_a_warning_counts_them(dash):
    if not dash.bundled:
        pytest.skip("needs the bundled model's tokenizer")
    from streamlit_app.widgets import EXAMPLE_PROMPT

    with TdbClient(dash.address) as c:
        unk = c.model_info().unk_token_id
        ids, tokens = c.tokenize(EXAMPLE_PROMPT)
    n = sum(1 for i in ids if i == unk)
    assert n > 0, "the generic English example has words the bundled word-level vocabulary lacks"
    for page in ("explore", "logit_lens", "attention", "debugger"):
        at = run_page(dash.address, page, prompt=EXAMPLE_PROMPT)
        assert not at.exception
        [warning] = [w for w in at.warning if "not in the model's vocabulary" in w.value]
        assert f"{n} of {len(ids)} tokens" in warning.value
        strip = [cap.value for cap in at.caption if cap.value.startswith(f"{len(ids)} tokens:")][0]
        assert strip.count(":red-background[") == n


@pytest.mark.parametrize("which", ["dash", "austen"])
def test_every_page_opens_on_the_served_models_own_demo(which, dash, request):
    address = dash.address if which == "dash" else request.getfixturevalue("austen")
    with TdbClient(address) as c:
        info = c.model_info()
        if info.demo is None:
            pytest.skip("no demo in this model's ground truth")
        ids, _ = c.tokenize(info.demo.prompt)
    assert info.unk_token_id not in ids
    for page in ("explore", "component", "debugger", "attention", "logit_lens", "patching", "circuit"):
        at = run_page(address, page)
        assert not at.exception, page
        assert at.text_area[0].value == info.demo.prompt, page
        assert not [w for w in at.warning if "not in the model's vocabulary" in w.value], page
    at = run_page(address, "explore")
    assert at.text_input(key="url.target").value == info.demo.answer
    assert at.text_input(key="url.distractor").value == info.demo.distractor
    assert not at.error


# -- 4. a mistyped ablation ---------------------------------------------------------------------------------

def _bad_head(address: str) -> tuple[str, TdbError]:
    with TdbClient(address) as c, c.session() as s:
        name = f"blocks.1.attn.head.{c.model_info().n_heads + 5}"
        with pytest.raises(TdbError) as refused:
            s.patch(name, "zero")
    return name, refused.value


def test_a_mistyped_ablation_is_refused_at_input_with_the_servers_suggestion(dash):
    name, refused = _bad_head(dash.address)
    at = run_page(dash.address, "explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor)
    before = [m.value for m in at.metric]
    at.text_input(key="explore.add_ablation").input(name)
    at.button(key="explore.add").click().run()
    assert not at.exception
    assert "ablate" not in at.query_params                             # not accepted, not in the URL
    [error] = at.error                                                 # one box, not one per run
    assert refused.message in _plain(error.value)
    assert at.text_input(key="explore.add_ablation").value == name     # kept to correct
    assert [m.value for m in at.metric] == before and len(at.dataframe) >= 1   # the page keeps working


def test_a_mistyped_ablation_in_a_link_is_left_out_with_one_warning(dash):
    name, refused = _bad_head(dash.address)
    at = run_page(dash.address, "explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor,
                  ablate=name)
    assert not at.exception and not at.error
    [warning] = [w for w in at.warning if name in _plain(w.value)]
    assert refused.message in _plain(warning.value)
    assert at.metric and at.dataframe                                  # the page works without it
    with TdbClient(dash.address) as c:
        want = c.node_table(dash.prompt if dash.bundled else [int(t) for t in dash.prompt.split()],
                            Target(dash.target, distractors=dash.distractor) if dash.bundled
                            else Target([int(dash.target)], [int(dash.distractor)]),
                            top_k=10, node_types=["head", "neuron"])
    assert list(node_frame(at)["node"][:10]) == want.top.nodes           # computed with no ablation


# -- 5. headers say what they show ---------------------------------------------------------------------------

def test_the_node_table_heading_names_the_traced_node_and_the_ablated_one_apart(dash):
    ablated, traced = "blocks.1.attn.head.2", "blocks.1.attn.head.3"
    at = run_page(dash.address, "explore", prompt=dash.prompt, target=dash.target, distractor=dash.distractor,
                  ablate=ablated, trace=traced, part="output", pos="-1")
    assert not at.exception and not at.error
    [heading] = [_plain(m.value) for m in at.markdown if m.value.startswith("**Node table**")]
    assert f"tracing upstream from {traced}" in heading and f"with 1 ablated ({ablated})" in heading, heading
    assert f"ablated: {traced}" not in heading and f"ablated ({traced})" not in heading
    [effects] = [_plain(m.value) for m in at.markdown if "of each input token" in m.value]
    assert "on the traced node" in effects and "with 1 ablated" in effects and "estimate" in effects
