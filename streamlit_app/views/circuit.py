"""Circuit: the information-flow graph of one prompt, or a circuit between a clean and a corrupted prompt.

Information flow (one forward): residual states per layer (y) and position (x); an edge is a head
moving information between positions, an MLP or the residual connection, kept when its share of the
update is above the threshold and it lies on a route to the chosen position. Circuit (EAP + exact
path patching + extraction): components by layer (y) and head (x), edge width by |effect|, colour by
the input it feeds (q, k, v, MLP, logits). Selecting a head opens it on the Component page.
"""

from __future__ import annotations

import json

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from tdb_client import Target
from tdb_client.graph import Graph
from tdb_client.names import is_head

from .. import state
from ..connection import Context, get_client
from ..runs import CACHE, make_prompt, show_token
from ..widgets import (corrupted_example, default_tokens, example_prompt, markdown_text, not_available,
                       resolved_target, show_tokens)

TITLE, ICON = "Circuit", ":material/account_tree:"
MODES = ("information flow", "circuit")
# what an edge feeds: a head's query / key / value input, an MLP, the logits (circuits); in information-flow
# graphs, a head moving information between positions, an MLP, or the residual connection
INPUT_COLORS = {"q": "#4c78a8", "k": "#e45756", "v": "#54a24b", "mlp": "#b279a2", "logits": "#f58518",
                "head": "#17becf", "resid": "#bab0ac"}
INPUT_LABELS = {"q": "a head's query (q)", "k": "a head's key (k)", "v": "a head's value (v)", "mlp": "an MLP",
                "logits": "the logits", "head": "a head (moves information)", "resid": "the residual connection"}
PAD = alt.AutoSizeParams(type="pad", contains="padding")
EDGES_EXPLAINED = ("Edge width is |effect|; solid edges raise the target (or the routed position's state), dashed "
                   "ones lower it. The colour is what the edge feeds: a head's query, key or value, an MLP or the "
                   "logits (circuits); a head moving information, an MLP or the residual connection (information "
                   "flow). Hover an edge for its effect.")


@st.cache_data(**CACHE)
def _flow(address: str, ids: tuple[int, ...], position: int, threshold: float) -> tuple[str, int, float]:
    r = get_client(address).information_flow(list(ids), position=position, threshold=threshold)
    return r.graph.to_json(), r.candidate_edges, r.elapsed_s


@st.cache_data(**CACHE)
def _circuit(address: str, clean: tuple[int, ...], corrupted: tuple[int, ...], answer: int, distractor: int,
             fraction: float) -> dict:
    r = get_client(address).circuit(list(clean), list(corrupted), Target([answer], [distractor]), fraction=fraction)
    return {"graph": r.circuit.to_json(), "faithfulness": r.faithfulness, "spearman": r.spearman,
            "pearson": r.pearson, "clean": r.clean_value, "ablated": r.ablated_value, "elapsed": r.elapsed_s,
            "verified": r.to_pandas(), "edges": len(r.circuit.edges), "all_edges": int((r.scores != 0).sum())}


def layout(g: Graph, n_heads: int) -> pd.DataFrame:
    """Node positions: flow graphs x = token position, y = depth; circuits x = head, y = layer."""
    rows = []
    for n in g.nodes:
        if g.kind == "information_flow":
            x = n.position
            y = n.layer + {"resid_pre": 0.0, "resid_mid": 0.5, "resid_post": 1.0}.get(n.kind, 0.0)
            short = ""                                    # the axes say where it is: no label to collide
        else:
            x = {"embed": (n_heads - 1) / 2, "logits": (n_heads - 1) / 2, "mlp": n_heads}.get(n.kind, n.index)
            y = n.layer + (0.5 if n.kind == "mlp" else 0.0)
            short = {"head": f"h{n.index}", "mlp": "mlp"}.get(n.kind, n.kind)
        rows.append({"id": n.id, "kind": n.kind, "label": n.label or n.id, "short": short, "x": float(x),
                     "y": float(y)})
    return pd.DataFrame(rows, columns=["id", "kind", "label", "short", "x", "y"])


def _edges(g: Graph, at: dict) -> pd.DataFrame:
    return pd.DataFrame([{"x": at[e.source]["x"], "y": at[e.source]["y"], "x2": at[e.target]["x"],
                          "y2": at[e.target]["y"], "input": e.input, "effect": e.effect, "width": abs(e.effect),
                          "sign": "raises the target" if e.effect >= 0 else "lowers the target",
                          "source": e.source, "target": e.target, "via": e.component, "exact": e.exact}
                         for e in g.edges],
                        columns=["x", "y", "x2", "y2", "input", "effect", "width", "sign", "source", "target", "via",
                                 "exact"])


def _axes(g: Graph, nodes: pd.DataFrame, n_heads: int, tokens: list[str] | None) -> tuple[alt.X, alt.Y]:
    """Integer axes: token positions or heads across, layers down."""
    top = int(np.ceil(nodes["y"].max())) if len(nodes) else 1
    y = alt.Y("y:Q", title="layer", scale=alt.Scale(domain=[-0.25, top + 0.25]),
              axis=alt.Axis(values=list(range(top + 1)), format="d", tickMinStep=1))
    if g.kind == "information_flow":
        n = len(tokens or [])
        axis = alt.Axis(values=list(range(n)), labelExpr=_label_expr(tokens), labelAngle=-50) if tokens \
            else alt.Axis(format="d", tickMinStep=1)
        return alt.X("x:Q", title="token position", axis=axis, scale=alt.Scale(domain=[-0.5, max(n, 1) - 0.5])), y
    heads = list(range(n_heads)) + [n_heads]
    names = ",".join(f"'{h}'" for h in range(n_heads)) + ",'MLP'"
    axis = alt.Axis(values=heads, labelExpr=f"[{names}][datum.value]", title="head (MLP on the right)")
    return alt.X("x:Q", axis=axis, scale=alt.Scale(domain=[-0.5, n_heads + 0.5])), y


def graph_chart(g: Graph, n_heads: int, tokens: list[str] | None = None) -> alt.LayerChart:
    """Edges (width |effect|, colour = the input they feed, dashed when they lower the target), nodes, and
    short labels for circuit nodes (head index, mlp), on integer layer / head (or position) axes."""
    nodes = layout(g, n_heads)
    at = nodes.set_index("id")[["x", "y"]].to_dict("index")
    edges = _edges(g, at)
    top = float(edges["width"].max()) if len(edges) else 1.0
    x, y = _axes(g, nodes, n_heads, tokens)
    lines = alt.Chart(edges).mark_rule(opacity=0.75).encode(
        x=x, y=y, x2="x2:Q", y2="y2:Q",
        strokeWidth=alt.StrokeWidth("width:Q", scale=alt.Scale(domain=[0, top], range=[0.5, 8]), legend=None),
        color=alt.Color("input:N", scale=alt.Scale(domain=list(INPUT_COLORS), range=list(INPUT_COLORS.values())),
                        title="edge feeds", legend=alt.Legend(labelExpr=_legend_expr(), orient="bottom",
                                                              columns=3, labelLimit=220)),
        strokeDash=alt.StrokeDash("sign:N", scale=alt.Scale(domain=["raises the target", "lowers the target"],
                                                            range=[[1, 0], [5, 3]]), title="effect",
                                   legend=alt.Legend(orient="bottom")),
        tooltip=["source", "target", "input", alt.Tooltip("effect:Q", format=".4f"), "via",
                 alt.Tooltip("exact:Q", format=".4f")])
    pick = alt.selection_point(fields=["id"], name="node", on="click")
    points = alt.Chart(nodes).mark_circle(size=160).encode(
        x=x, y="y:Q", color=alt.value("#333"), tooltip=["id", "kind", "label"],
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.5))).add_params(pick)
    labels = alt.Chart(nodes).mark_text(dy=-13, fontSize=10).encode(x=x, y="y:Q", text="short:N")
    height = max(260, 90 * (int(nodes["y"].max() - nodes["y"].min()) + 2)) if len(nodes) else 260
    return alt.layer(lines, points, labels).properties(height=height, width=600, autosize=PAD)


def _label_expr(tokens: list[str]) -> str:
    names = [show_token(t).replace("\\", "\\\\").replace("'", "\\'") for t in tokens]
    return "[" + ",".join(f"'{i} {t}'" for i, t in enumerate(names)) + "][datum.value]"


def _legend_expr() -> str:
    """Vega expression: the legend's entries in words (JSON is a Vega object literal)."""
    return json.dumps(INPUT_LABELS) + "[datum.label] || datum.label"


def _open_component(g: Graph, selected: str | None) -> None:
    heads = [n.id for n in g.nodes if n.kind == "head"] + sorted(
        {e.component for e in g.edges if is_head(e.component)})
    heads = list(dict.fromkeys(heads))
    if not heads:
        return
    default = heads.index(selected) if selected in heads else 0
    c1, c2 = st.columns([3, 1])
    head = c1.selectbox("Head", heads, index=default, key="circuit.head")
    c2.button("Open on Component page", on_click=state.goto, args=("component",),
              kwargs={state.COMPONENT: head}, key="circuit.open")


def _selected(event) -> str | None:
    try:
        picked = event.selection.get("node") or []
        return picked[0]["id"] if picked else None
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def render(ctx: Context) -> None:
    st.header(f"{ICON} Circuit")
    if not_available(ctx, "Circuits", ("information_flow", "circuit"), "the circuits issue"):
        return
    mode = state.url_selectbox("Graph", state.MODE, MODES, widget=st.radio, horizontal=True)
    if mode == "information flow":
        text = state.url_text_input("Prompt", state.PROMPT, example_prompt(ctx), area=True, height=80)
        prompt = _prompt(ctx, text, "prompt")
        if prompt is None:
            return
        show_tokens(prompt)
        c1, c2 = st.columns(2)
        pos = c1.number_input("Route to position", -len(prompt), len(prompt) - 1, -1, key="circuit.pos")
        threshold = c2.slider("Threshold (share of the update)", 0.01, 0.5, 0.04, 0.01, key="circuit.threshold")
        graph_json, candidates, elapsed = _flow(ctx.address, prompt.ids, int(pos), float(threshold))
        g = Graph.from_json(graph_json)
        st.caption(f"{len(g.edges)} edges on routes ({candidates} above threshold anywhere), computed in {elapsed:.2f} s")
        tokens = list(prompt.tokens)
    else:
        a, b = st.columns(2)
        with a:
            clean = _prompt(ctx, state.url_text_input("Clean prompt", state.PROMPT, example_prompt(ctx), area=True,
                                                      height=80), "clean")
        with b:
            corrupted = _prompt(ctx, state.url_text_input("Corrupted prompt (same length)", state.PROMPT2,
                                                          corrupted_example(ctx), area=True, height=80),
                                "corrupted")
        t_default, d_default = default_tokens(ctx)
        c1, c2, c3 = st.columns(3)
        with c1:
            answer = state.url_text_input("Target token", state.TARGET, t_default)
        with c2:
            distractor = state.url_text_input("Distractor token", state.DISTRACTOR, d_default)
        fraction = c3.slider("Faithfulness to reach", 0.5, 1.0, 0.8, 0.05, key="circuit.fraction")
        if clean is None or corrupted is None:
            st.info("Give a clean and a corrupted prompt of the same token length.", icon=":material/info:")
            return
        if len(clean) != len(corrupted):
            st.warning(f"The prompts have {len(clean)} and {len(corrupted)} tokens: they must have the same length.")
            return
        resolved = resolved_target(ctx, clean, answer, distractor)
        if resolved is None:
            return                        # no circuit for a target the server refused
        st.caption(f"target: {markdown_text(resolved.description)}")
        r = _circuit(ctx.address, clean.ids, corrupted.ids, resolved.token, resolved.distractor, float(fraction))
        g = Graph.from_json(r["graph"])
        st.caption(f"{r['edges']} of {r['all_edges']} edges · faithfulness {r['faithfulness']:.3f} · target clean "
                   f"{r['clean']:.3f}, corrupted {r['ablated']:.3f} · EAP vs exact on the top edges: Spearman "
                   f"{r['spearman']:.3f}, Pearson {r['pearson']:.3f} · {r['elapsed']:.2f} s")
        tokens = None
    event = st.altair_chart(graph_chart(g, ctx.model.n_heads, tokens), on_select="rerun", key="circuit.chart")
    st.caption(EDGES_EXPLAINED)
    _open_component(g, _selected(event))
    with st.expander("edges"):
        st.dataframe(g.to_pandas(), hide_index=True)
        st.download_button("GraphML", g.to_graphml(), file_name=f"{g.kind}.graphml", key="circuit.graphml")
        st.download_button("JSON", g.to_json(indent=1), file_name=f"{g.kind}.json", key="circuit.json")
    if mode == "circuit":
        with st.expander("EAP vs exact path patching"):
            st.dataframe(r["verified"], hide_index=True)


def _prompt(ctx: Context, text: str, what: str):
    try:
        return make_prompt(ctx, text)
    except ValueError as e:
        st.error(f"{what}: {e}", icon=":material/warning:")
        return None
