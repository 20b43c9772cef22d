"""Explore: the Transformer Debugger workflow — why does the model predict A and not B here?

Prompt, target and distractor tokens (with a swap), an optional second prompt (left / diff / right),
the next-token candidates with probabilities, the target before and after the active ablations, and
— from the server's analyses — the per-token heatmap of estimated total effect and the node table
(heads, neurons, embeddings) whose rows can be ablated, traced upstream, or opened as a component.
"""

from __future__ import annotations

import streamlit as st

from tdb_client import TdbError

from .. import charts, state
from ..connection import Context, describe, shown_errors
from ..runs import Prompt, check_patch_name, make_prompt, run, show_token
from ..widgets import default_tokens, markdown_text, not_available, prompt_input, resolved_target, show_tokens
from . import explore_nodes

TITLE, ICON = "Explore", ":material/explore:"
MODES = ("left", "diff", "right")
K_ABLATION_ERROR = "explore.ablation_error"


def _swap() -> None:
    t = st.session_state.get("url.target", "")
    d = st.session_state.get("url.distractor", "")
    state.set_value(state.TARGET, d)
    state.set_value(state.DISTRACTOR, t)


# -- active ablations: a list in the URL (`?ablate=blocks.1.attn.head.2,blocks.0.mlp.neuron.7`) --------

def ablations() -> list[str]:
    return state.url_list(state.ABLATIONS)


def known_ablations(ctx: Context) -> list[str]:
    """The URL's ablations the server can apply; one warning (the server's words) for those it cannot,
    which are left out, so a mistyped link still opens a working page."""
    kept, refused = [], []
    for node in ablations():
        try:
            check_patch_name(ctx.address, node)
            kept.append(node)
        except TdbError as e:
            refused.append(f"- `{node}`: {markdown_text(describe(e, ctx.address))}")
    if refused:
        st.warning("Left out of every run (the server cannot ablate them):\n\n" + "\n".join(refused),
                   icon=":material/warning:")
    return kept


def add_ablation(node: str) -> None:
    current = ablations()
    if node and node not in current:
        state.url_set(**{state.ABLATIONS: current + [node]})


def remove_ablation(node: str) -> None:
    state.url_set(**{state.ABLATIONS: [a for a in ablations() if a != node]})


def _add_typed(address: str) -> None:
    """Ask the server whether it can ablate the typed name: added when it can, else its message (with its
    suggestions) shown under the box and the name kept there to correct."""
    node = st.session_state.get("explore.add_ablation", "").strip()
    st.session_state.pop(K_ABLATION_ERROR, None)
    if not node:
        return
    try:
        check_patch_name(address, node)
    except TdbError as e:
        st.session_state[K_ABLATION_ERROR] = f"{node}: {describe(e, address)}"
        return
    add_ablation(node)
    st.session_state["explore.add_ablation"] = ""


def _ablation_panel(ctx: Context, active: list[str]) -> None:
    """The active ablations (those the server refused are listed as left out, to remove) and the box to
    add one."""
    st.markdown(f"**Active ablations** ({len(active)}) — zeroed in every run of this page")
    for node in ablations():
        a, b = st.columns([5, 1])
        a.code(node if node in active else f"{node}   (left out: the server cannot ablate it)", language=None)
        b.button("remove", key=f"explore.rm.{node}", on_click=remove_ablation, args=(node,))
    a, b = st.columns([2, 1])
    a.text_input("add", key="explore.add_ablation", placeholder="blocks.1.attn.head.2  or  blocks.0.mlp.neuron.7",
                 label_visibility="collapsed")
    b.button("ablate", icon=":material/add:", key="explore.add", on_click=_add_typed, args=(ctx.address,))
    error = st.session_state.get(K_ABLATION_ERROR)
    if error:
        st.error("not added — " + markdown_text(error), icon=":material/warning:")


# -- the target and the candidates --------------------------------------------------------------------

def _metric(logits, t: int, d: int) -> float:
    return float(logits[t] - logits[d])


def _side(ctx: Context, prompt: Prompt, t: int | None, d: int | None, label: str,
          active: tuple[str, ...]) -> float | None:
    """Candidates for one prompt, and its target value (with the ablations, and the change they make)."""
    out = run(ctx.address, prompt.ids, ablations=active, top_k=10)
    st.markdown(f"**Next-token candidates** — {label}" + (" (with ablations)" if active else ""))
    names = [show_token(text) for _, text, _, _ in out.top]
    hi = [show_token(text) for i, text, _, _ in out.top if i in (t, d)]
    st.altair_chart(charts.prob_bars(names, [p for _, _, p, _ in out.top], highlight=hi), width="content")
    if t is None or d is None:
        return None
    value = _metric(out.last_logits, t, d)
    delta = None
    if active:
        clean = run(ctx.address, prompt.ids, top_k=10)
        delta = f"{value - _metric(clean.last_logits, t, d):+.3f} from ablations"
    st.metric("logit(target) − logit(distractor)", f"{value:.3f}", delta=delta,
              help="logit(target) − logit(distractor) at the last position, as the server read them (above)")
    return value


def render(ctx: Context) -> None:
    st.header(f"{ICON} Explore")
    st.caption("Why does the model predict the target and not the distractor?")
    prompt = prompt_input(ctx)
    if prompt is None:
        return
    show_tokens(prompt)
    t_default, d_default = default_tokens(ctx)
    a, b, c, d = st.columns([3, 1, 3, 3])
    with a:
        target_text = state.url_text_input("Target token", state.TARGET, t_default, help="Mind the leading space.")
    with b:
        st.write("")
        st.button("swap", icon=":material/swap_horiz:", on_click=_swap, key="explore.swap", help="Swap target and distractor")
    with c:
        distractor_text = state.url_text_input("Distractor token", state.DISTRACTOR, d_default)
    with d:
        compare = st.toggle("Compare with a second prompt", value=bool(state.url_get(state.PROMPT2)),
                            key="explore.compare")
    resolved = resolved_target(ctx, prompt, target_text, distractor_text)
    t, dt = (resolved.token, resolved.distractor) if resolved else (None, None)
    if resolved:
        st.caption(f"target: {markdown_text(resolved.description)}")
    active = known_ablations(ctx)
    prompt2, mode = None, "left"
    if compare:
        x, y = st.columns([3, 1])
        with x:
            text2 = state.url_text_input("Second prompt", state.PROMPT2, "", area=True, height=80)
        with y:
            mode = state.url_selectbox("Show", state.MODE, MODES, "diff", widget=st.radio)
        with shown_errors("second prompt"):
            prompt2 = make_prompt(ctx, text2)
            if prompt2 is not None and len(prompt2) != len(prompt):
                st.warning(f"the prompts have {len(prompt)} and {len(prompt2)} tokens: the node tables can only be "
                           "compared for prompts of the same token length", icon=":material/warning:")
    left, right = st.columns([3, 2], gap="large")
    with right:
        _ablation_panel(ctx, active)
    if resolved is None:
        return                            # nothing is computed for a target the server refused
    with left, st.spinner("running…"), shown_errors("run"):
        if prompt2 is None:
            _side(ctx, prompt, t, dt, "this prompt", tuple(active))
        else:
            p, q = st.columns(2)
            with p:
                v1 = _side(ctx, prompt, t, dt, "left", tuple(active))
            with q:
                v2 = _side(ctx, prompt2, t, dt, "right", tuple(active))
            if v1 is not None and v2 is not None:
                st.metric("left − right", f"{v1 - v2:.3f}")
    st.divider()
    if not not_available(ctx, "The node table and per-token effects", explore_nodes.NEEDS, "the analyses issue"):
        explore_nodes.render(ctx, prompt, t, dt, prompt2, mode, active, add_ablation)
