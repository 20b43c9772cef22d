"""Estimate vs exact on the Explore page: the node table's total effect is a first-order estimate
(activation x gradient) that can be far off or of the wrong sign; here the server measures the exact
zero-ablation effect of the k heads and neurons with the largest estimates (`node_table(...,
verify_top=k)`, batched) and the page shows both columns, labelled for what they are, with their rank
agreement."""

from __future__ import annotations

import streamlit as st

from tdb_client import Target

from .. import state
from ..connection import Context, get_client, shown_errors
from ..runs import CACHE, show_token
from ..widgets import show_notes

VERIFY = "verify"
ESTIMATE_COL, EXACT_COL = "estimate (activation × gradient)", "exact (zero ablation)"


@st.cache_data(**CACHE)
def verification(address: str, ids: tuple[int, ...], t: int, d: int, k: int, ablated: tuple[str, ...]):
    r = get_client(address).node_table(list(ids), Target(tokens=[t], distractors=[d]), top_k=1,
                                       node_types=["head", "neuron"], ablations=list(ablated), verify_top=k)
    return r.verification


@st.fragment
def render(ctx: Context, ids: tuple[int, ...], t: int, d: int, ablated: tuple[str, ...]) -> None:
    """A fragment: a new k reruns this part of the page only."""
    st.markdown("**Estimate vs exact** — the total effect above is an estimate; the exact effect of zeroing "
                "each of the heads and neurons with the largest estimates, measured by the server")
    k = state.url_number_input("Verify the top k exactly (0: off)", VERIFY, 10, min_value=0, max_value=64)
    if k == 0:
        return
    with st.spinner(f"ablating the top {k} exactly…"), shown_errors("estimate vs exact"):
        v = verification(ctx.address, ids, t, d, int(k), ablated)
        if v is None or not len(v):
            st.caption("nothing to verify")
            return
        df = v.to_pandas()[["node", "query_pos", "token", "total_effect_estimate", "exact_zero_ablation", "error"]]
        df["token"] = df["token"].map(show_token)
        df = df.rename(columns={"total_effect_estimate": ESTIMATE_COL, "exact_zero_ablation": EXACT_COL,
                                "error": "estimate − exact"})
        st.dataframe(df, hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.4f")
                                    for c in (ESTIMATE_COL, EXACT_COL, "estimate − exact")})
        flipped = int(((df[ESTIMATE_COL] > 0) != (df[EXACT_COL] > 0)).sum())
        st.caption(f"rank agreement over these {len(df)} rows: Spearman {v.spearman:.3f} (Pearson {v.pearson:.3f}); "
                   f"max |estimate − exact| {v.max_abs_error:.4f}; {flipped} of {len(df)} of opposite sign. Exact = "
                   f"the target ({v.value:.4f}) minus the target with the node zeroed at its position.")
        show_notes(v.notes)
