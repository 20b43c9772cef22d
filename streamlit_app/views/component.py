"""Component: one head (`blocks.L.attn.head.H`), neuron (`blocks.L.mlp.neuron.N`) or SAE latent
(`blocks.L.<site>.sae.latent.K`) up close.

On the current prompt: its activation per token (a neuron's post-activation; a head's write norm; a
latent's SAE activation) and, for heads, its attention pattern; the tokens its write promotes and
suppresses when projected on the unembedding (a neuron: its output weights; a head: its write at the
chosen position; a latent: its decoder direction, from the server's explanation). All through
`Evaluate` expressions on one cached run. Activation records and explanations need the server's
records analyses and say so until it has them. Whether the unit exists is the server's answer (its
message is shown as written); the name is split only to choose the view.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from tdb_client import TdbError
from tdb_client.names import split_unit

from .. import charts, state
from ..connection import Context, attempt, get_client, show_error
from ..runs import Prompt, check_patch_name, run, show_token
from ..widgets import not_available, position_select, prompt_input, show_tokens
from .attention import patterns

TITLE, ICON = "Component", ":material/memory:"
RECORDS = ("activation_records", "explanations")


LATENT = ".sae.latent."


def component(ctx: Context, name: str) -> tuple[str, int, int] | None:
    """("head" | "neuron" | "latent", layer, index) of a unit the server knows; None after showing why not
    (the server's message when it refuses the name; the page's when it is a site, layer or pattern)."""
    try:
        check_patch_name(ctx.address, name.strip())
    except TdbError as e:
        show_error(e)
        return None
    name = name.strip()
    site, _, index = name.rpartition(LATENT)
    if site and index.isdigit() and "*" not in site:
        return "latent", -1, int(index)
    unit = split_unit(name)
    if unit is None:
        st.error(f"{name} is not a head, a neuron or an SAE latent: the Component page shows "
                 "blocks.L.attn.head.H, blocks.L.mlp.neuron.N or blocks.L.<site>.sae.latent.K",
                 icon=":material/warning:")
    return unit


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


def _latent(ctx: Context, prompt: Prompt, name: str, k: int) -> None:
    """A latent's SAE activation per token on this prompt, and its decoder direction through the
    unembedding (the server's explanation computes it: W_dec[k] mapped to the residual, then W_U)."""
    site = name.rpartition(LATENT)[0]
    out = run(ctx.address, prompt.ids, capture=(site,), evals=(name,))
    acts = out.evals[name].value                                          # [batch, pos]
    st.markdown("**Activation on this prompt** — the latent's SAE activation, per token")
    st.altair_chart(charts.token_strip([show_token(t) for t in prompt.tokens], acts[0], signed=False,
                                       value_title="activation"), width="content")
    ex = attempt(lambda: _explain(ctx.address, name), "explaining the latent")
    if ex is None:
        return
    st.markdown("**Decoder direction through the unembedding** — tokens the latent's decoder row promotes and "
                "suppresses (final norm weight, then W_U)")
    a, b = st.columns(2)
    a.caption("promotes")
    a.dataframe(pd.DataFrame([{"token": show_token(t), "logit": v} for t, v in ex.promoted[:k]]),
                hide_index=True, width="stretch")
    b.caption("suppresses")
    b.dataframe(pd.DataFrame([{"token": show_token(t), "logit": v} for t, v in ex.suppressed[:k]]),
                hide_index=True, width="stretch")


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
                                help="blocks.L.attn.head.H, blocks.L.mlp.neuron.N or blocks.L.<site>.sae.latent.K")
    unit = component(ctx, name)
    if unit is None:
        return
    kind, layer, index = unit
    prompt = prompt_input(ctx)
    if prompt is None:
        return
    show_tokens(prompt)
    _on_prompt(ctx, prompt, kind, layer, index, name.strip())
    st.markdown("**Activation records and explanation**")
    if not not_available(ctx, "Top-activating dataset examples and explanations", RECORDS,
                         "the SAE / activation-records issue"):
        _records(ctx, name.strip())


@st.fragment
def _on_prompt(ctx: Context, prompt: Prompt, kind: str, layer: int, index: int, name: str) -> None:
    """The unit on this prompt: a fragment, so a new top k or position reruns this part of the page only."""
    a, b = st.columns(2)
    with a:
        k = state.url_number_input("Top k tokens", state.TOPK, 10, min_value=1, max_value=50)
    if kind == "head":
        with b:
            pos = position_select(prompt)
    with st.spinner("running the prompt…"):
        if kind == "head":
            _head(ctx, prompt, layer, index, pos, k)
        elif kind == "latent":
            _latent(ctx, prompt, name, k)
        else:
            _neuron(ctx, prompt, layer, index, k)


@st.cache_data(show_spinner=False, max_entries=64)
def _explain(address: str, unit: str):
    return get_client(address).explain(unit, n_top=8)


@st.cache_data(show_spinner=False, max_entries=64)
def _records_of(address: str, unit: str):
    return get_client(address).activation_records(unit, n_top=5, n_random=0)


def _records(ctx: Context, unit: str) -> None:
    """The server's local explanation and the top-activating windows of the held-out corpus, per token."""
    with st.spinner("reading the corpus for activation records (cached after the first time)…"):
        ex = attempt(lambda: _explain(ctx.address, unit), "explaining the component")
    if ex is None:
        return
    st.markdown(f"> {ex.text}")
    facts = [f"label **{ex.label}**"] + ([f"score {ex.score:.2f}"] if ex.score is not None else [])
    facts += [f"{k} {v:.2f}" for k, v in sorted(ex.attention.items())]
    st.caption(" · ".join(facts))
    recs = ex.records or attempt(lambda: _records_of(ctx.address, unit), "reading activation records")
    if recs is None or not recs.top:
        st.info("No activation records for this component.")
        return
    st.caption(f"top windows of {recs.n_windows} from {recs.corpus} (window {recs.window} tokens; max activation "
               f"{recs.max_act:.3g}; active in {100 * recs.frac_windows_active:.0f}% of windows)")
    for rank, w in enumerate(recs.top[:5]):
        lo = max(0, w.max_pos - 12)
        hi = min(len(w.tokens), w.max_pos + 4)
        st.altair_chart(charts.token_strip(list(w.tokens[lo:hi]), w.acts[lo:hi].tolist(),
                                           title=f"#{rank + 1}: max {w.max_act:.3g} at “{w.tokens[w.max_pos]}”"),
                        width="stretch")
