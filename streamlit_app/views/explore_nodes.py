"""The analysis half of the Explore page: per-token total effect, the node table and its row actions.

Everything comes from the server's Analysis service through `tdb_client` (node_table, compare,
ablate, trace_upstream), cached per (server, prompt, target, options). A row can be ablated (added to
the page's active ablations, whose effect on the target the Ablate analysis measures, and under which
the node table itself is computed), traced upstream
(the table is recomputed against that node instead of the target), or opened on the Component page.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import streamlit as st

from tdb_client import Target, Trace

from .. import charts, state
from ..connection import Context, get_client, shown_errors
from ..runs import CACHE, Prompt, show_token

NEEDS = ("node_table",)
METRICS = ("direct_effect", "total_effect", "activation", "write_norm")
NODE_TYPES = ("head", "neuron", "head_pair", "embed_token", "embed_pos", "attn_bias", "mlp_bias")
DEFAULT_TYPES = ("head", "neuron")
PARTS = ("output", "q", "k", "qk", "v")
TRACE, PART, KEYPOS, RANK, TYPES = "trace", "part", "keypos", "rank", "types"
MAX_K = 200


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
def token_effects(address: str, ids: tuple[int, ...], t: int, d: int, trace: tuple | None,
                  ablated: tuple[str, ...] = ()) -> np.ndarray:
    """Estimated total effect per position: the token (+ position) embedding rows, activation x gradient."""
    client = get_client(address)
    tr = _trace(trace)
    r = client.node_table(list(ids), None if tr else _target(t, d), trace=tr, top_k=1, all_rows=True,
                          rank_by="total_effect", node_types=["embed_token", "embed_pos"], ablations=list(ablated))
    out = np.zeros(len(ids))
    table = r.all
    np.add.at(out, table.ids[:, 3], table.column("total_effect"))
    return out


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
    cols = ["rank", "node", "node_type", "query_pos", "token", "key_pos", "key_token", *METRICS, *extra]
    return df[[c for c in cols if c in df.columns]], desc


def _label(row: pd.Series) -> str:
    at = f" @ {row['query_pos']} {row['token']}" if row["query_pos"] >= 0 else ""
    key = f" ← {row['key_pos']} {row['key_token']}" if row["key_pos"] >= 0 else ""
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


def _actions(ctx: Context, row: pd.Series, add_ablation: Callable[[str], None]) -> None:
    node, kind = row["node"], row["node_type"]
    is_unit = kind in ("head", "head_pair", "neuron")
    a, b, c = st.columns(3)
    with a:
        st.button("Ablate", icon=":material/block:", disabled=not is_unit, key="explore.act.ablate",
                  on_click=add_ablation, args=(node,), help="Zero this node in every run of the page")
    with b:
        part = "output"
        if kind in ("head", "head_pair"):
            part = st.selectbox("through", PARTS, key="explore.act.part",
                                help="output: the head's write; q / k / qk: its attention score; v: its values")
        pos = int(row["query_pos"]) if row["query_pos"] >= 0 else -1
        keypos = int(row["key_pos"]) if row["key_pos"] >= 0 else pos
        st.button("Trace upstream", icon=":material/account_tree:", disabled=not is_unit, key="explore.act.trace",
                  on_click=state.url_set, kwargs={TRACE: node, PART: part if kind != "neuron" else None,
                                                  state.POS: pos, KEYPOS: keypos})
    with c:
        st.button("Open component page", icon=":material/open_in_new:", disabled=not is_unit,
                  key="explore.act.open", on_click=state.goto, args=("component",),
                  kwargs={state.COMPONENT: node})


def _is_unit(node: str) -> bool:
    # TODO(issue 18): ask the server whether a name is a unit or a layer node (it decides what the node
    # table can ablate); this substring test re-derives the grammar.
    return any(part in node for part in (".head.", ".neuron.", ".latent."))


def _current_trace() -> tuple | None:
    node = state.url_get(TRACE)
    if not node:
        return None
    part = state.url_get(PART) or "output"
    pos = int(state.url_get(state.POS) or -1)
    keypos = int(state.url_get(KEYPOS) or pos)
    return (node, part if ".attn.head." in node else "output", pos, keypos if part in ("q", "k", "qk") else None)


def render(ctx: Context, prompt: Prompt, t: int | None, d: int | None, prompt2: Prompt | None, mode: str,
           ablations: list[str], add_ablation: Callable[[str], None]) -> None:
    if t is None or d is None:
        return
    trace = _current_trace()
    ids = prompt.ids if (prompt2 is None or mode != "right") else prompt2.ids
    tokens = prompt.tokens if ids == prompt.ids else prompt2.tokens

    if ablations:
        with shown_errors("ablations"):
            joint, each = ablation_effects(ctx.address, prompt.ids, t, d, tuple(ablations))
            st.markdown(f"**Ablations** — {joint.target.description}: {joint.before:.4f} → "
                        f"{joint.after:.4f} (**{joint.after - joint.before:+.4f}**)")
            if each is not None:
                st.dataframe(each.to_pandas(), hide_index=True, width="content")

    # the node table explains the forward with the ablated units (heads, neurons, latents); a whole layer
    # would leave its rows no longer adding up to what it wrote, so those ablate only the candidates above
    ablated = tuple(a for a in ablations if _is_unit(a))
    if len(ablated) < len(ablations):
        st.caption("Whole-layer ablations are applied to the candidates and the target above, not to the node table "
                   "(it explains the forward through its units: ablate blocks.L.attn.head.* instead).")
    _trace_banner(trace)
    with shown_errors("per-token effects"):
        eff = token_effects(ctx.address, ids, t, d, trace, ablated)
        st.markdown("**Estimated total effect of each input token** (embedding · gradient)")
        st.altair_chart(charts.token_strip([show_token(x) for x in tokens], eff, value_title="total effect"),
                        width="content")

    a, b, c = st.columns([2, 3, 1])
    with a:
        rank_by = state.url_selectbox("Rank by", RANK, METRICS, METRICS[0] if not trace else "total_effect")
    with b:
        types = state.url_multiselect("Node types", TYPES, NODE_TYPES, DEFAULT_TYPES)
    with c:
        k = state.url_number_input("Rows (top and bottom)", state.TOPK, 10, min_value=1, max_value=MAX_K)
    with st.spinner("computing the node table…"), shown_errors("node table"):
        if prompt2 is not None and mode == "diff":
            result = compare(ctx.address, prompt.ids, prompt2.ids, t, d, trace, k, rank_by, tuple(types), ablated)
        else:
            result = node_table(ctx.address, ids, t, d, trace, k, rank_by, tuple(types), ablated)
        df, desc = _frame(result, "diff" if prompt2 is not None and mode == "diff" else "single")
        if mode != "diff" and not trace and result.target.exact:
            desc += f" = {result.target.value:.4f} (direct effects sum to {result.direct_effect_sum:.4f})"
        elif mode != "diff":
            desc += f" = {result.target.value:.4f}"
        for note in (result.target.notes if mode != "diff" else ()):
            st.caption(note)
        side = {"left": " — left prompt", "right": " — right prompt", "diff": " — left − right"}.get(mode, "") \
            if prompt2 is not None else ""
        with_ablations = f" — with {len(ablated)} ablated" if ablated else ""
        st.markdown(f"**Node table**{side}{with_ablations}: {desc}")
        labels = [_label(r) for _, r in df.iterrows()]
        df_key = "explore.table"
        st.dataframe(df, hide_index=True, width="stretch", key=df_key, height=min(640, 35 * (len(df) + 1) + 3), on_select=lambda: _on_row_select(df_key, labels),
                     selection_mode="single-row",
                     column_config={m: st.column_config.NumberColumn(format="%.4f") for m in df.columns
                                    if df[m].dtype.kind == "f"})
        if not labels:
            return
        if st.session_state.get("explore.node") not in labels:
            st.session_state["explore.node"] = labels[0]
        label = st.selectbox("Selected node (or click a row)", labels, key="explore.node")
        _actions(ctx, df.iloc[labels.index(label)], add_ablation)
