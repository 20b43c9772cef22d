"""The per-token strip of the Explore page: how much each input token matters for the target.

Two methods, each labelled for what it is. The estimate is the node table's embedding rows (token and
position embedding, activation x gradient: one backward pass, first order, so it can be far off).
Integrated gradients integrate the gradient from a baseline to the input; the server refines its
steps until the attributions add up to f(input) - f(baseline) within a tolerance and says how close
they came (the completeness gap), which the page shows beside the strip.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from tdb_client import Target, Trace

from .. import charts, state
from ..connection import Context, get_client, shown_errors
from ..runs import CACHE, show_token

METHOD = "tokens"
ESTIMATE, IG = "estimate (embedding · gradient)", "integrated gradients"
IG_TOLERANCE = 0.01


def _trace(trace: tuple | None) -> Trace | None:
    return Trace(*trace) if trace else None


@st.cache_data(**CACHE)
def token_effects(address: str, ids: tuple[int, ...], t: int, d: int, trace: tuple | None,
                  ablated: tuple[str, ...] = ()) -> np.ndarray:
    """Estimated total effect per position: the token (+ position) embedding rows, activation x gradient."""
    client = get_client(address)
    tr = _trace(trace)
    r = client.node_table(list(ids), None if tr else Target(tokens=[t], distractors=[d]), trace=tr, top_k=1,
                          all_rows=True, rank_by="total_effect", node_types=["embed_token", "embed_pos"],
                          ablations=list(ablated))
    out = np.zeros(len(ids))
    table = r.all
    np.add.at(out, table.ids[:, 3], table.column("total_effect"))
    return out


@st.cache_data(**CACHE)
def integrated_gradients(address: str, ids: tuple[int, ...], t: int, d: int):
    """Integrated gradients from a zero baseline, refined until complete within IG_TOLERANCE."""
    return get_client(address).input_attribution(list(ids), Target(tokens=[t], distractors=[d]),
                                                 methods=["integrated_gradients"], tolerance=IG_TOLERANCE)


def completeness_line(r) -> str:
    """What an integrated-gradients result says about itself: steps, sums and the completeness gap."""
    change = r.target.value - r.baseline_value
    verdict = (f"within the {100 * r.tolerance:g}% tolerance" if r.converged else
               f"**not** within the {100 * r.tolerance:g}% tolerance after {r.steps} steps (the most the "
               f"server takes): read the values as approximate")
    return (f"{r.steps} steps from a zero baseline: the attributions sum to {float(r.integrated_gradients.sum()):.4f}"
            f", f(input) − f(baseline) = {change:.4f}, completeness gap {r.completeness_gap:+.4f} "
            f"({100 * r.completeness:.1f}% complete) — {verdict}")


@st.fragment
def render(ctx: Context, ids: tuple[int, ...], tokens: tuple[str, ...], t: int, d: int, trace: tuple | None,
           ablated: tuple[str, ...]) -> None:
    """The per-token effects; a fragment: choosing the method reruns this part of the page only."""
    labels = [show_token(x) for x in tokens]
    what = "the traced node" if trace else "the target"
    method = state.url_selectbox("Per-token effect", METHOD, (ESTIMATE, IG), ESTIMATE, widget=st.radio,
                                 horizontal=True)
    if method == IG and (trace or ablated):
        st.info("Integrated gradients explain the target on the unablated prompt: stop tracing and clear the "
                "ablations to see them (the estimate below follows the table).", icon=":material/info:")
        method = ESTIMATE
    with shown_errors("per-token effects"):
        if method == IG:
            r = integrated_gradients(ctx.address, ids, t, d)
            st.markdown(f"**Integrated gradients of each input token** on {what}")
            st.altair_chart(charts.token_strip(labels, r.integrated_gradients, value_title="integrated gradients"),
                            width="content")
            (st.caption if r.converged else st.warning)(completeness_line(r))
            return
        eff = token_effects(ctx.address, ids, t, d, trace, ablated)
        with_ablated = f", in the forward with {len(ablated)} ablated" if ablated else ""
        st.markdown(f"**Estimated total effect of each input token** on {what}{with_ablated} — an estimate "
                    "(embedding · gradient, first order)")
        st.altair_chart(charts.token_strip(labels, eff, value_title="estimated total effect"), width="content")
