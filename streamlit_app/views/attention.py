"""Attention: every head's pattern of one layer as heatmaps with token labels, and one head up close.

One run of the prompt with `blocks.{L}.attn.pattern` captured (the server computes patterns only for
the layers asked for), then one read of [batch, head, query_pos, key_pos].
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from .. import charts, state
from ..connection import Context
from ..runs import run
from ..widgets import prompt_input, show_tokens

TITLE, ICON = "Attention", ":material/visibility:"


def patterns(ctx: Context, ids: tuple[int, ...], layer: int) -> np.ndarray:
    """[head, query_pos, key_pos] for one layer."""
    site = f"blocks.{layer}.attn.pattern"
    return run(ctx.address, ids, capture=(site,), reads=(site,)).reads[site][0]


def render(ctx: Context) -> None:
    st.header(f"{ICON} Attention")
    m = ctx.model
    prompt = prompt_input(ctx)
    if prompt is None:
        return
    show_tokens(prompt)
    a, b = st.columns(2)
    held = {key: state.held_value(key, int) for key in (state.LAYER, state.HEAD)}    # a link's, before the boxes
    layer = state.url_selectbox("Layer", state.LAYER, range(m.n_layers), 0, parse=int, widget=a.selectbox)
    head = state.url_selectbox("Head (up close)", state.HEAD, range(m.n_heads), 0, parse=int, widget=b.selectbox)
    for what, key, n, shown in (("layer", state.LAYER, m.n_layers, layer), ("head", state.HEAD, m.n_heads, head)):
        if held[key] is not None and not 0 <= held[key] < n:    # a link made on another model, a typo
            st.caption(f"{what.capitalize()} {held[key]} is not in this model ({what}s 0–{n - 1}): "
                       f"showing {what} {shown}.")
    with st.spinner("running the prompt…"):
        p = patterns(ctx, prompt.ids, layer)                  # [head, query, key]
    labels = prompt.labels
    st.subheader(f"Layer {layer}: all heads")
    st.altair_chart(charts.head_grid(p, labels, layer=layer), width="content")
    st.subheader(f"Head {layer}.{head}")
    st.altair_chart(charts.heatmap(p[head], labels, labels, row_title="query", col_title="key (attended to)",
                                   signed=False, value_title="attention"), width="content")
    # prev-token and induction-style summaries: the attention each query gives the token just before it,
    # and the largest off-diagonal weight per head
    prev = np.array([np.mean([p[h, q, q - 1] for q in range(1, len(prompt))]) if len(prompt) > 1 else 0.0
                     for h in range(m.n_heads)])
    st.caption("mean attention to the previous token, per head: "
               + " · ".join(f"h{h}: {v:.2f}" for h, v in enumerate(prev)))
    st.button(f"Open the component page of head {layer}.{head}", on_click=state.goto, args=("component",),
              kwargs={state.COMPONENT: f"blocks.{layer}.attn.head.{head}"})
