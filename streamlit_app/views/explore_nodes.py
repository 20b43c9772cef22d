"""The analysis half of the Explore page: per-token total effect, the node table and its row actions.

Everything comes from the server's Analysis service through `tdb_client` (node_table, compare,
ablate, trace_upstream), cached per (server, prompt, target, options). A row can be ablated (added to
the page's active ablations, whose effect on the target the Ablate analysis measures, and under which
the node table itself is computed), traced upstream (the table is recomputed against that node instead
of the target), or opened on the Component page.

Which active ablations the node table runs under is the server's answer, not the page's: it takes units
and patterns and refuses whole layers (and names it does not know) with a message the page shows as
written. Names are read here only for display (`tdb_client.names`).
"""

from __future__ import annotations

from typing import Callable

import grpc
import numpy as np
import pandas as pd
import streamlit as st

from tdb_client import Target, TdbError, Trace
from tdb_client.names import is_head, split_unit

from .. import state
from ..connection import Context, describe, get_client, show_error, shown_errors
from ..runs import CACHE, Prompt, show_token
from ..widgets import markdown_text, show_notes
from . import explore_tokens, explore_verify
from .explore_tokens import token_effects

NEEDS = ("node_table",)
METRICS = ("direct_effect", "total_effect", "activation", "write_norm")
NODE_TYPES = ("head", "neuron", "head_pair", "embed_token", "embed_pos", "attn_bias", "mlp_bias")
DEFAULT_TYPES = ("head", "neuron")
PARTS = ("output", "q", "k", "qk", "v")
TRACE, PART, KEYPOS, RANK, TYPES = "trace", "part", "keypos", "rank", "types"
MAX_K = 200
K_WHOLE_PAGE = "explore.whole_page"    # a row action asked for a rerun of the whole page
# the columns as what they are: the total effect is a first-order estimate, not an ablation
COLUMN_LABELS = {"total_effect": "total effect (estimate)", "diff_total_effect": "diff total effect (estimate)"}
COLUMN_HELP = {"total_effect": "estimate (activation × gradient): first order, can be far off or of the wrong sign; "
                               "ablate the row to measure its exact effect",
               "diff_total_effect": "left − right of the estimate (activation × gradient)",
               "direct_effect": "exact: the node's write through the final norm (frozen) and the unembedding",
               "activation": "heads: |z|; token pairs: attention probability; neurons: post-activation",
               "write_norm": "norm of the node's write to the residual stream"}


# -- cached analyses (plain arguments, so Streamlit can hash them) ---------------------------------

def _target(t: int, d: int) -> Target:
    return Target(tokens=[t], distractors=[d])


def _trace(trace: tuple | None) -> Trace | None:
    return Trace(*trace) if trace else None


@st.cache_data(**CACHE)
def node_table(address: str, ids: tuple[int, ...], t: int, d: int, trace: tuple | None, k: int, rank_by: str,
               types: tuple[str, ...], ablated: tuple[str, ...] = ()):
    client = get_client(address)
    tr = _trace(trace)
    return client.node_table(list(ids), None if tr else _target(t, d), trace=tr, top_k=k, rank_by=rank_by,
                             node_types=list(types), ablations=list(ablated))


@st.cache_data(**CACHE)
def compare(address: str, left: tuple[int, ...], right: tuple[int, ...], t: int, d: int, trace: tuple | None,
            k: int, rank_by: str, types: tuple[str, ...], ablated: tuple[str, ...] = ()):
    client = get_client(address)
    tr = _trace(trace)
    return client.compare(list(left), list(right), None if tr else _target(t, d), trace=tr, top_k=k,
                          rank_by=rank_by, node_types=list(types), ablations=list(ablated))


@st.cache_data(**CACHE)
def ablation_effects(address: str, ids: tuple[int, ...], t: int, d: int, nodes: tuple[str, ...]):
    client = get_client(address)
    joint = client.ablate(list(ids), _target(t, d), list(nodes))
    each = client.ablate(list(ids), _target(t, d), list(nodes), separately=True) if len(nodes) > 1 else None
    return joint, each


# -- the table ---------------------------------------------------------------------------------------

def _frame(result, mode: str) -> tuple[pd.DataFrame, str]:
    """The rows to show (top then bottom), and a description of the objective."""
    if mode == "diff":
        top, bottom = result.top.to_pandas(), result.bottom.to_pandas()
        desc = f"left: {result.left_target.description} · right: {result.right_target.description}"
        keep = {f"diff_{m}": m for m in METRICS}
        extra = [f"left_{result.rank_by}", f"right_{result.rank_by}"]
        tok = "left_token"
    else:
        top, bottom = result.top.to_pandas(), result.bottom.to_pandas()
        desc = result.target.description
        keep, extra, tok = {m: m for m in METRICS}, [], "token"
    top.insert(0, "rank", [f"top {i + 1}" for i in range(len(top))])
    bottom.insert(0, "rank", [f"bottom {i + 1}" for i in range(len(bottom))])
    df = pd.concat([top, bottom], ignore_index=True).drop_duplicates(
        subset=["node", "query_pos", "key_pos"], keep="first")
    df = df.rename(columns={**keep, tok: "token"})
    df["token"] = df["token"].map(show_token)
    df["key_token"] = df["key_token"].map(lambda s: show_token(s) if s else "")
    # a key position means something for a token pair only; a latent's carries its site's code: blank both
    meaningless = (df["node_type"] == "sae_latent") | (df["key_pos"] < 0)
    df["key_pos"] = ["" if m else str(int(k)) for k, m in zip(df["key_pos"], meaningless)]
    df.loc[meaningless, "key_token"] = ""
    cols = ["rank", "node", "node_type", "query_pos", "token", "key_pos", "key_token", *METRICS, *extra]
    return df[[c for c in cols if c in df.columns]], desc


def _label(row: pd.Series) -> str:
    at = f" @ {row['query_pos']} {row['token']}" if row["query_pos"] >= 0 else ""
    key = f" ← {row['key_pos']} {row['key_token']}" if row["key_pos"] != "" else ""
    return f"{row['node']}{at}{key}"


def _on_row_select(df_key: str, labels: list[str]) -> None:
    rows = st.session_state[df_key].selection.rows
    if rows:
        st.session_state["explore.node"] = labels[rows[0]]


def _trace_banner(trace: tuple | None) -> None:
    if not trace:
        return
    node, part, pos, keypos = trace
    where = f" at position {pos}" + (f", key position {keypos}" if part in ("q", "k", "qk") else "")
    a, b = st.columns([4, 1])
    a.info(f"Tracing upstream from **{node}** ({part}){where}: the table explains this node, not the target.",
           icon=":material/account_tree:")
    b.button("back to the target", icon=":material/undo:", on_click=state.url_set,
             kwargs={TRACE: None, PART: None, KEYPOS: None, state.POS: None}, key="explore.untrace")


@st.cache_data(**CACHE)
def _attention_row(address: str, ids: tuple[int, ...], layer: int, head: int, pos: int) -> np.ndarray:
    """[key_pos]: where head `layer`.`head` looks from query position `pos` (the server's pattern)."""
    return get_client(address).attention_pattern(list(ids), layer, [head]).pattern[0, pos, :pos + 1]


def _key_position(ctx: Context, prompt: Prompt, node: str, pos: int, keypos: int) -> int:
    """The key position to trace a head's score through: the row's own (a token pair), else the one the
    head attends to most from `pos` — as TDB does — which the person can change."""
    unit = split_unit(node)
    if keypos >= 0 or unit is None or pos < 0:
        return max(keypos, pos)
    row = _attention_row(ctx.address, prompt.ids, unit[1], unit[2], pos)
    best = int(np.argmax(row))
    labels = {i: f"{prompt.labels[i]} (attention {row[i]:.2f})" for i in range(len(row))}
    return st.selectbox("key position", range(len(row)), index=best, format_func=labels.__getitem__,
                        key=f"explore.act.keypos.{node}.{pos}",
                        help="the key position of the attention score; by default the one the head attends to most")


def _then_whole_page(fn: Callable[..., None], *args, **kwargs) -> None:
    """A row action's callback: `fn`, then a rerun of the whole page (the action changes more than the node
    table's fragment: the ablations, the trace, the page)."""
    fn(*args, **kwargs)
    st.session_state[K_WHOLE_PAGE] = True


def _actions(ctx: Context, prompt: Prompt, row: pd.Series, add_ablation: Callable[[str], None]) -> None:
    node, kind = row["node"], row["node_type"]
    is_unit = kind in ("head", "head_pair", "neuron", "sae_latent")
    traceable = kind in ("head", "head_pair", "neuron")
    a, b, c = st.columns(3)
    with a:
        st.button("Ablate", icon=":material/block:", disabled=not is_unit, key="explore.act.ablate",
                  on_click=_then_whole_page, args=(add_ablation, node), help="Zero this node in every run of the page")
    with b:
        part = "output"
        if kind in ("head", "head_pair"):
            part = st.selectbox("through", PARTS, key="explore.act.part",
                                help="output: the head's write; q / k / qk: its attention score; v: its values")
        pos = int(row["query_pos"]) if row["query_pos"] >= 0 else -1
        keypos = int(row["key_pos"]) if kind == "head_pair" and row["key_pos"] != "" else -1
        if part in ("q", "k", "qk"):
            keypos = _key_position(ctx, prompt, node, pos, keypos)
        st.button("Trace upstream", icon=":material/account_tree:", disabled=not traceable, key="explore.act.trace",
                  on_click=_then_whole_page, args=(state.url_set,),
                  kwargs={TRACE: node, PART: part if kind != "neuron" else None,
                          state.POS: pos, KEYPOS: keypos if part in ("q", "k", "qk") else None})
    with c:
        st.button("Open component page", icon=":material/open_in_new:", disabled=not is_unit,
                  key="explore.act.open", on_click=_then_whole_page, args=(state.goto, "component"),
                  kwargs={state.COMPONENT: node})


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _current_trace() -> tuple | None:
    node = state.url_get(TRACE)
    if not node:
        return None
    part = state.url_get(PART) or "output"
    words = [f"?{k}={state.url_get(k)}" for k in (state.POS, KEYPOS) if not _is_int(state.url_get(k) or "0")]
    if words:              # the server judges a position's range; a word is no position at all
        st.warning(f"The link's trace of {node} names no position (`{'`, `'.join(words)}`: whole numbers "
                   "expected): the node table is not traced.", icon=":material/warning:")
        return None
    pos = int(state.url_get(state.POS) or -1)
    keypos = int(state.url_get(KEYPOS) or pos)
    return (node, part if is_head(node) else "output", pos, keypos if part in ("q", "k", "qk") else None)


# -- the page's active ablations: their effect, and which of them the node table runs under --------------

def _ablation_effects(ctx: Context, ids: tuple[int, ...], t: int, d: int, ablations: list[str]) -> None:
    """The Ablate analysis: the target before and after every active ablation (and each one's own effect)."""
    with shown_errors("ablations"):
        joint, each = ablation_effects(ctx.address, ids, t, d, tuple(ablations))
        st.markdown(f"**Ablations** — {joint.target.description}: {joint.before:.4f} → "
                    f"{joint.after:.4f} (**{joint.after - joint.before:+.4f}**)")
        if each is not None:
            st.dataframe(each.to_pandas(), hide_index=True, width="content")


def _refusal(address: str, ids: tuple[int, ...], t: int, d: int, nodes: tuple[str, ...]) -> TdbError | None:
    """None when the server computes the node table under `nodes`; its refusal (INVALID_ARGUMENT) otherwise.
    The probe is the per-token effects call (the cheapest node table), cached, so it is paid once."""
    try:
        token_effects(address, ids, t, d, None, nodes)
        return None
    except TdbError as e:
        if e.code != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return e


def _accepted(address: str, ids: tuple[int, ...], t: int, d: int,
              nodes: tuple[str, ...]) -> tuple[tuple[str, ...], list[TdbError]]:
    """The ablations the node table runs under, as the server decides: all of them when it accepts them;
    else each one it accepts on its own (it refuses whole layers, whose rows would no longer add up to
    what the layer wrote, and names it does not know), with its refusals of the others."""
    refusal = _refusal(address, ids, t, d, nodes)
    if refusal is None:
        return nodes, []
    if len(nodes) == 1:
        return (), [refusal]
    answers = [(node, _refusal(address, ids, t, d, (node,))) for node in nodes]
    return tuple(n for n, e in answers if e is None), [e for _, e in answers if e is not None]


def _node_table_ablations(ctx: Context, ids: tuple[int, ...], t: int, d: int, ablations: list[str]) -> tuple[str, ...]:
    """The active ablations the server computes the node table under; its refusals of the others, verbatim."""
    if not ablations:
        return ()
    try:
        kept, refused = _accepted(ctx.address, ids, t, d, tuple(ablations))
    except TdbError as e:
        show_error(e, "node table ablations")
        return ()
    if refused:
        said = "\n".join(f"- {markdown_text(describe(e, ctx.address))}" for e in refused)
        st.warning(f"Not applied to the node table (the candidates and the target above still have them); "
                   f"the server says:\n\n{said}", icon=":material/info:")
    return kept


# -- the table's inputs and heading ---------------------------------------------------------------------

def _node_types(ctx: Context) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The node types to offer and those shown by default: SAE latents too when an SAE is attached."""
    try:
        saes = ctx.client.list_saes()
    except TdbError:
        saes = []
    if saes:
        return NODE_TYPES + ("sae_latent",), DEFAULT_TYPES + ("sae_latent",)
    return NODE_TYPES, DEFAULT_TYPES


def _table_options(ctx: Context, trace: tuple | None) -> tuple[str, list[str], int]:
    """Rank by, node types and rows, from the URL."""
    a, b, c = st.columns([2, 3, 1])
    with a:
        rank_by = state.url_selectbox("Rank by", RANK, METRICS, METRICS[0] if not trace else "total_effect")
    with b:
        offered, default = _node_types(ctx)
        types = state.url_multiselect("Node types", TYPES, offered, default)
    with c:
        k = state.url_number_input("Rows (top and bottom)", state.TOPK, 10, min_value=1, max_value=MAX_K)
    return rank_by, types, k


def _objective(result, desc: str, mode: str, trace: tuple | None) -> str:
    """The objective's description with its value (and, when exact, the direct effects' sum); its notes shown."""
    if mode == "diff":
        return desc
    show_notes(result.target.notes)
    if not trace and result.target.exact:
        return desc + f" = {result.target.value:.4f} (direct effects sum to {result.direct_effect_sum:.4f})"
    return desc + f" = {result.target.value:.4f}"


def _heading(desc: str, two_prompts: bool, mode: str, ablated: tuple[str, ...], trace: tuple | None) -> None:
    """What the table explains (the target, or the traced node), on which prompt, under which ablations —
    each named, so a traced node is never read as an ablated one."""
    side = {"left": " — left prompt", "right": " — right prompt", "diff": " — left − right"}.get(mode, "") \
        if two_prompts else ""
    what = f"tracing upstream from {trace[0]}, explains" if trace else "explains"
    with_ablations = (f" — computed with {len(ablated)} ablated ({', '.join(ablated)})" if ablated
                      else " — no ablations")
    st.markdown(f"**Node table**{side} — {what} {markdown_text(desc)}{markdown_text(with_ablations)}")


def _table(ctx: Context, prompt: Prompt, df: pd.DataFrame, add_ablation: Callable[[str], None]) -> None:
    """The rows (a click selects one) and the selected row's actions."""
    labels = [_label(r) for _, r in df.iterrows()]
    df_key = "explore.table"
    st.dataframe(df, hide_index=True, width="stretch", key=df_key, height=min(640, 35 * (len(df) + 1) + 3),
                 on_select=lambda: _on_row_select(df_key, labels), selection_mode="single-row",
                 column_config={m: st.column_config.NumberColumn(COLUMN_LABELS.get(m), format="%.4f",
                                                                 help=COLUMN_HELP.get(m))
                                for m in df.columns if df[m].dtype.kind == "f"})
    if not labels:
        return
    if st.session_state.get("explore.node") not in labels:
        st.session_state["explore.node"] = labels[0]
    label = st.selectbox("Selected node (or click a row)", labels, key="explore.node")
    _actions(ctx, prompt, df.iloc[labels.index(label)], add_ablation)


# -- the page's lower half ----------------------------------------------------------------------------

@st.fragment
def _node_table(ctx: Context, prompt: Prompt, prompt2: Prompt | None, shown: Prompt, t: int, d: int, mode: str,
                diff: bool, trace: tuple | None, ablated: tuple[str, ...], add_ablation: Callable[[str], None]) -> None:
    """The node table with its options and row actions: a fragment, so choosing rows, types, a row or a
    part reruns this part of the page only (a row action that changes more reruns the whole page)."""
    if st.session_state.pop(K_WHOLE_PAGE, False):
        st.rerun(scope="app")
    rank_by, types, k = _table_options(ctx, trace)
    with st.spinner("computing the node table…"), shown_errors("node table"):
        if diff:
            result = compare(ctx.address, prompt.ids, prompt2.ids, t, d, trace, k, rank_by, tuple(types), ablated)
        else:
            result = node_table(ctx.address, shown.ids, t, d, trace, k, rank_by, tuple(types), ablated)
        df, desc = _frame(result, "diff" if diff else "single")
        _heading(_objective(result, desc, mode, trace), prompt2 is not None, mode, ablated, trace)
        _table(ctx, shown, df, add_ablation)


def render(ctx: Context, prompt: Prompt, t: int | None, d: int | None, prompt2: Prompt | None, mode: str,
           ablations: list[str], add_ablation: Callable[[str], None]) -> None:
    if t is None or d is None:
        return
    trace = _current_trace()
    shown = prompt if (prompt2 is None or mode != "right") else prompt2
    diff = prompt2 is not None and mode == "diff"
    if ablations:
        _ablation_effects(ctx, prompt.ids, t, d, ablations)
    ablated = _node_table_ablations(ctx, shown.ids, t, d, ablations)
    _trace_banner(trace)
    explore_tokens.render(ctx, shown.ids, shown.tokens, t, d, trace, ablated)
    _node_table(ctx, prompt, prompt2, shown, t, d, mode, diff, trace, ablated, add_ablation)
    if not trace and not diff:
        explore_verify.render(ctx, shown.ids, t, d, ablated)
