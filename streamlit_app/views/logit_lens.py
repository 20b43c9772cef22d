"""Logit lens: what the residual stream would predict at each layer, for one position of the prompt.

One run with the residual sites captured, then one `Evaluate` per site of the expression
`softmax(logit_lens(<site>)[0, <pos>]).topk(k)` (final norm + unembedding, on the server).
With a target token, its probability across layers too.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from .. import charts, state
from ..connection import Context
from ..runs import run, show_token
from ..widgets import default_tokens, markdown_text, position_select, prompt_input, resolved_target, show_tokens

TITLE, ICON = "Logit lens", ":material/layers:"


def lens_sites(n_layers: int, with_mid: bool) -> list[str]:
    sites = ["embed"]
    for layer in range(n_layers):
        if with_mid:
            sites.append(f"blocks.{layer}.resid_mid")
        sites.append(f"blocks.{layer}.resid_post")
    return sites


def lens_table(ctx: Context, ids: tuple[int, ...], pos: int, k: int, with_mid: bool,
               target: int | None) -> tuple[pd.DataFrame, list[float]]:
    """(site, rank, token, prob) rows, and the target's probability per site."""
    sites = lens_sites(ctx.model.n_layers, with_mid)
    evals = tuple(f"softmax(logit_lens({s})[0, {pos}]).topk({k})" for s in sites)
    if target is not None:
        evals += tuple(f"softmax(logit_lens({s})[0, {pos}])[{target}]" for s in sites)
    out = run(ctx.address, ids, capture=tuple(sites), evals=evals)
    rows = []
    for site, e in zip(sites, evals):
        r = out.evals[e]
        for rank, (prob, tok) in enumerate(zip(r.value[0], r.tokens)):
            rows.append({"site": site, "rank": rank + 1, "token": show_token(tok), "prob": float(prob)})
    probs = [float(out.evals[e].value) for e in evals[len(sites):]]
    return pd.DataFrame(rows), probs


def render(ctx: Context) -> None:
    st.header(f"{ICON} Logit lens")
    prompt = prompt_input(ctx)
    if prompt is None:
        return
    show_tokens(prompt)
    a, b, c, d = st.columns([2, 1, 2, 2])
    with a:
        pos = position_select(prompt)
    with b:
        k = state.url_number_input("Top k", state.TOPK, 5, min_value=1, max_value=20)
    with c:
        target_text = state.url_text_input("Track a token (optional)", state.TARGET, "",
                                           placeholder=default_tokens(ctx)[0].replace(" ", "␣"),
                                           help="Its probability across layers. Mind the leading space.")
    with d:
        st.write("")
        with_mid = st.checkbox("also after attention (resid_mid)", key="lens.mid")
    target = None
    if target_text:
        resolved = resolved_target(ctx, prompt, target_text, what="tracked token")
        if resolved is None:
            return                        # nothing computed for a token the server refused
        target = resolved.token
        st.caption(f"tracking {markdown_text(resolved.description)}")
    with st.spinner("running the prompt…"):
        df, probs = lens_table(ctx, prompt.ids, pos, k, with_mid, target)
    st.altair_chart(charts.lens_grid(df, title=f"top {k} next tokens at position {prompt.labels[pos]}"),
                    width="content")
    if target is not None and probs:
        sites = list(dict.fromkeys(df["site"]))
        st.altair_chart(charts.line(sites, probs, title="probability of the tracked token across layers", y_title="probability"),
                        width="content")
