"""Component: one head (`blocks.L.attn.head.H`) or neuron (`blocks.L.mlp.neuron.N`) up close.

On the current prompt: its activation per token (a neuron's post-activation; a head's write norm) and,
for heads, its attention pattern; the tokens its write promotes and suppresses when projected on the
unembedding (a neuron: its output weights; a head: its write at the chosen position). All through
`Evaluate` expressions on one cached run. Activation records and explanations need the server's
records analyses and say so until it has them.
"""

from __future__ import annotations

import re

import pandas as pd
import streamlit as st

from .. import charts, state
from ..connection import Context
from ..runs import Prompt, run, show_token
from ..widgets import not_available, prompt_input, show_tokens
from .attention import patterns

TITLE, ICON = "Component", ":material/memory:"
UNIT = re.compile(r"^blocks\.(\d+)\.(attn\.head|mlp\.neuron)\.(\d+)$")
RECORDS = ("activation_records", "explanations")


def parse_component(ctx: Context, name: str) -> tuple[str, int, int]:
    """("head" | "neuron", layer, index), or ValueError saying what is expected."""
    m = UNIT.match(name.strip())
    if not m:
        raise ValueError(f"{name!r} is not a component: use blocks.L.attn.head.H or blocks.L.mlp.neuron.N")
    kind = "head" if m.group(2) == "attn.head" else "neuron"
    layer, index = int(m.group(1)), int(m.group(3))
    limit = ctx.model.n_heads if kind == "head" else ctx.model.d_mlp
    if layer >= ctx.model.n_layers or index >= limit:
        raise ValueError(f"{name} does not exist: {ctx.model.n_layers} layers, "
                         f"{limit} {'heads' if kind == 'head' else 'neurons'} per layer")
    return kind, layer, index


def _token_table(values, tokens) -> pd.DataFrame:
    return pd.DataFrame({"token": [show_token(t) for t in tokens], "logit": [float(v) for v in values]})


def _head(ctx: Context, prompt: Prompt, layer: int, head: int, pos: int, k: int) -> None:
    z = f"blocks.{layer}.attn.z"
    write = f"{z}[0, :, {head}] @ blocks.{layer}.attn.W_O[{head}]"          # [pos, d_model]
    at_pos = f"{z}[0, {pos}, {head}] @ blocks.{layer}.attn.W_O[{head}] @ W_U"  # [vocab]
    evals = (f"({write}).norm(-1)", f"({at_pos}).topk({k})", f"(-({at_pos})).topk({k})")
    out = run(ctx.address, prompt.ids, capture=(z,), evals=evals)
    norms, up, down = (out.evals[e] for e in evals)
    st.markdown("**Activation on this prompt** — the norm of the head's write, per position")
    st.altair_chart(charts.token_strip([show_token(t) for t in prompt.tokens], norms.value, signed=False,
                                       value_title="write norm"), width="content")
    _promoted(up, down, f"its write at position {prompt.labels[pos]}")
    st.markdown("**Attention pattern**")
    p = patterns(ctx, prompt.ids, layer)[head]
    st.altair_chart(charts.heatmap(p, prompt.labels, prompt.labels, row_title="query", col_title="key (attended to)",
                                   signed=False, value_title="attention"), width="content")


def _neuron(ctx: Context, prompt: Prompt, layer: int, neuron: int, k: int) -> None:
    post = f"blocks.{layer}.mlp.post"
    direction = f"blocks.{layer}.mlp.W_out[{neuron}] @ W_U"
    evals = (f"{post}[0, :, {neuron}]", f"({direction}).topk({k})", f"(-({direction})).topk({k})")
    out = run(ctx.address, prompt.ids, capture=(post,), evals=evals)
    acts, up, down = (out.evals[e] for e in evals)
    st.markdown("**Activation on this prompt** — post-activation, per token")
    st.altair_chart(charts.token_strip([show_token(t) for t in prompt.tokens], acts.value, value_title="activation"),
                    width="content")
    _promoted(up, down, "its output weights")


def _promoted(up, down, what: str) -> None:
    st.markdown(f"**Logit lens** — tokens that {what} promotes and suppresses (through the unembedding, "
                "without the final norm)")
    a, b = st.columns(2)
    a.caption("promotes")
    a.dataframe(_token_table(up.value[0], up.tokens), hide_index=True, width="stretch")
    b.caption("suppresses")
    b.dataframe(_token_table(-down.value[0], down.tokens), hide_index=True, width="stretch")


def render(ctx: Context) -> None:
    st.header(f"{ICON} Component")
    default = "blocks.0.attn.head.0"
    name = state.url_text_input("Component", state.COMPONENT, default,
                                help="blocks.L.attn.head.H or blocks.L.mlp.neuron.N")
    try:
        kind, layer, index = parse_component(ctx, name)
    except ValueError as e:
        st.error(str(e), icon=":material/warning:")
        return
    prompt = prompt_input(ctx)
    if prompt is None:
        return
    show_tokens(prompt)
    a, b = st.columns(2)
    with a:
        k = state.url_number_input("Top k tokens", state.TOPK, 10, min_value=1, max_value=50)
    if kind == "head":
        with b:
            pos = state.url_selectbox("Position", state.POS, range(len(prompt)), len(prompt) - 1, parse=int,
                                      format_func=lambda i: prompt.labels[i])
    with st.spinner("running the prompt…"):
        if kind == "head":
            _head(ctx, prompt, layer, index, pos, k)
        else:
            _neuron(ctx, prompt, layer, index, k)
    st.markdown("**Activation records and explanation**")
    not_available(ctx, "Top-activating dataset examples and explanations", RECORDS,
                  "the SAE / activation-records issue")
