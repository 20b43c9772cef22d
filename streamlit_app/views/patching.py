"""Patching: activation-patching sweeps (clean vs corrupted prompts) as layer × head / layer × position
heatmaps, attribution vs exact, CSV download.

Needs the server's sweep analyses; a server that does not advertise them gets a notice, never a
made-up result. Results stream in with a live progress bar.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from tdb_client import Target

from .. import charts, state
from ..connection import Context, shown_errors
from ..runs import make_prompt
from ..widgets import corrupted_example, default_tokens, example_prompt, not_available, resolved_target, show_tokens

TITLE, ICON = "Patching", ":material/healing:"
SWEEPS = ("patch_sweep", "activation_patching", "attribution_patching")


KINDS = ("head_out", "resid_pre", "attn_out", "mlp_out", "head_q", "head_k", "head_v", "head_pattern", "neuron")
METHODS = ("exact", "attribution")
DIRECTIONS = ("denoising", "noising")


def _labels(axis) -> list[str]:
    return [f"{axis.name} {int(v)}" for v in axis.values]


def _grid(result) -> tuple[np.ndarray, list[str], list[str], str, str]:
    """The sweep as a 2-D grid: layer x head / position / neuron, or (layer.head) x position."""
    z = result.normalized
    axes = result.axes
    if z.ndim == 2:
        return z, _labels(axes[0]), _labels(axes[1]), axes[0].name, axes[1].name
    rows = [f"L{int(a)}.{axes[1].name[0].upper()}{int(b)}" for a in axes[0].values for b in axes[1].values]
    return z.reshape(len(rows), -1), rows, _labels(axes[2]), f"{axes[0].name}.{axes[1].name}", axes[2].name


def _run(ctx: Context, clean, corrupted, t: int, dt: int, kind: str, method: str, direction: str,
         per_position: bool, top_k: int):
    bar = st.progress(0.0, text="starting the sweep…")

    def progress(partial) -> bool:
        p = partial.progress
        if p is not None:
            eta = f", about {p.eta_s:.0f} s left" if p.eta_s > 0 else ""
            bar.progress(min(1.0, p.percent / 100.0), text=f"{p.stage}: {p.done}/{p.total} cells{eta}")
        return True

    result = ctx.client.patch_sweep(list(clean.ids), list(corrupted.ids), Target(tokens=[t], distractors=[dt]),
                                    kind=kind, method=method, direction=direction, per_position=per_position,
                                    verify_top_k=top_k if method == "attribution" else 0, on_progress=progress)
    bar.progress(1.0, text=f"done: {result.computed} exact cells")
    return result


def _show(result) -> None:
    s = result.summary
    a, b, c = st.columns(3)
    a.metric("clean", f"{result.clean_value:.3f}")
    b.metric("corrupted", f"{result.corrupted_value:.3f}")
    if s is not None:
        c.metric("time", f"{s.elapsed_s:.2f} s", help=f"{s.exact_patches} exact patches in {s.chunks} chunks")
    z, rows, cols, row_title, col_title = _grid(result)
    st.altair_chart(charts.heatmap(z, rows, cols, title=f"{result.kind} sweep ({result.direction}, {result.method}): "
                                   "0 = corrupted, 1 = clean", row_title=row_title, col_title=col_title,
                                   signed=True, value_title="normalized"), width="content")
    if result.approx_values is not None:
        done = ~np.isnan(result.values)
        st.markdown("**Attribution vs exact** (the verified cells)")
        df = pd.DataFrame({"estimate": result.approx_values[done], "exact": result.values[done]})
        st.altair_chart(alt.Chart(df).mark_circle(size=60).encode(x="estimate:Q", y="exact:Q",
                                                                  tooltip=["estimate:Q", "exact:Q"]),
                        width="stretch")
        if s is not None:
            st.caption(f"Pearson {s.pearson:.3f}, Spearman {s.spearman:.3f}, max |error| {s.max_abs_error:.3g} "
                       f"over {s.verified} verified cells")
    for note in result.notes:
        st.caption(note)
    st.download_button("Download CSV", result.to_csv() or "", file_name=f"tdb-sweep-{result.kind}.csv",
                       mime="text/csv", icon=":material/download:")


def render(ctx: Context) -> None:
    st.header(f"{ICON} Patching")
    a, b = st.columns(2)
    with a:
        clean = state.url_text_input("Clean prompt", state.PROMPT, example_prompt(ctx), area=True, height=80)
    with b:
        corrupted = state.url_text_input("Corrupted prompt", state.PROMPT2, corrupted_example(ctx), area=True,
                                         height=80, help="By default the demo with its answer swapped for the "
                                                         "distractor")
    prompts = {}
    for label, text in (("clean", clean), ("corrupted", corrupted)):
        try:
            p = make_prompt(ctx, text)
            if p is not None:
                show_tokens(p, label)
                prompts[label] = p
        except ValueError as e:
            st.error(f"{label} prompt: {e}", icon=":material/warning:")
    if not_available(ctx, "Activation-patching sweeps", SWEEPS, "the patching-at-scale issue"):
        return
    t_default, d_default = default_tokens(ctx)
    c1, c2, c3, c4, c5 = st.columns(5)
    with c1:
        target_text = state.url_text_input("Target token", state.TARGET, t_default)
    with c2:
        distractor_text = state.url_text_input("Distractor token", state.DISTRACTOR, d_default)
    with c3:
        kind = state.url_selectbox("Sweep", "kind", KINDS, "head_out")
    with c4:
        method = state.url_selectbox("Method", "method", METHODS, "exact")
    with c5:
        direction = state.url_selectbox("Direction", "direction", DIRECTIONS, "denoising")
    per_position = st.checkbox("per position (heads)", key="patching.per_position",
                               disabled=not kind.startswith("head"))
    top_k = st.number_input("verify the top k exactly", 1, 200, 20, key="patching.top_k",
                            disabled=method != "attribution")
    if len(prompts) < 2:
        st.info("Give a clean and a corrupted prompt of the same token length.", icon=":material/info:")
        return
    if len(prompts["clean"]) != len(prompts["corrupted"]):
        st.warning(f"The prompts have {len(prompts['clean'])} and {len(prompts['corrupted'])} tokens: a patching "
                   "sweep needs the same token length.", icon=":material/warning:")
        return
    resolved = resolved_target(ctx, prompts["clean"], target_text, distractor_text)
    if resolved is None:
        return                            # no sweep for a target the server refused
    t, dt = resolved.token, resolved.distractor
    st.caption(f"target: {resolved.description}")
    key = ("patching.result", clean, corrupted, target_text, distractor_text, kind, method, direction,
           per_position, int(top_k))
    if st.button("Run sweep", icon=":material/play_arrow:", key="patching.run", type="primary"):
        with shown_errors("sweep"):
            st.session_state["patching.last"] = (key, _run(ctx, prompts["clean"], prompts["corrupted"], t, dt, kind,
                                                           method, direction, per_position, int(top_k)))
    last = st.session_state.get("patching.last")
    if last is not None and last[0] == key:
        _show(last[1])
