"""Altair charts of the dashboard: pure functions from numpy / lists to `alt.Chart` (no Streamlit here).

Every chart has hover tooltips with the exact values. Token axes use unique labels ("3 ␣Darcy"),
kept in prompt order with an explicit `sort`.
"""

from __future__ import annotations

from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd

CELL = 18          # pixels per heatmap cell, until the chart reaches MAX_SIDE
MAX_SIDE = 720
MIN_SIDE = 160
GRID_SIDE = 150    # pixels per head of the all-heads grid
MAX_LABELS = 64    # more axis labels than this are unreadable: hide them (tooltips still tell)


PAD = alt.AutoSizeParams(type="pad", contains="padding")
# Streamlit's default autosize for plain charts is "fit": axes and legends are then squeezed into the
# given width/height and small heatmaps shrink to nothing. "pad" keeps our cell sizes.


def _side(n: int, most: int = MAX_SIDE) -> int:
    return int(min(most, max(MIN_SIDE, CELL * n)))


def _color(values: np.ndarray, *, signed: bool | None = None, scheme: str | None = None) -> alt.Color:
    signed = bool(values.size and values.min() < 0 < values.max()) if signed is None else signed
    if signed:  # negative red, positive blue, zero white
        m = float(np.abs(values).max()) if values.size else 1.0
        scale = alt.Scale(scheme=scheme or "redblue", domain=[-m, m], domainMid=0)
    else:
        scale = alt.Scale(scheme=scheme or "blues")
    return alt.Color("value:Q", scale=scale, title=None)


def heatmap(z: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str = "", row_title: str = "",
            col_title: str = "", signed: bool | None = None, scheme: str | None = None,
            value_title: str = "value", max_width: int = MAX_SIDE) -> alt.Chart:
    """A [rows, cols] heatmap (e.g. an attention pattern [query, key], or an activation [pos, d_model])."""
    z = np.asarray(z, dtype=np.float64)
    assert z.ndim == 2 and z.shape == (len(rows), len(cols)), (z.shape, len(rows), len(cols))
    r, c = np.meshgrid(np.arange(z.shape[0]), np.arange(z.shape[1]), indexing="ij")
    df = pd.DataFrame({"row": np.asarray(rows, dtype=object)[r.ravel()],
                       "col": np.asarray(cols, dtype=object)[c.ravel()], "value": z.ravel()})
    x_axis = alt.Axis(labels=len(cols) <= MAX_LABELS, ticks=len(cols) <= MAX_LABELS, labelAngle=-60, labelLimit=120)
    y_axis = alt.Axis(labels=len(rows) <= MAX_LABELS, ticks=len(rows) <= MAX_LABELS, labelLimit=160)
    return (alt.Chart(df, title=title or alt.Undefined)
            .mark_rect()
            .encode(x=alt.X("col:O", sort=list(cols), title=col_title, axis=x_axis),
                    y=alt.Y("row:O", sort=list(rows), title=row_title, axis=y_axis),
                    color=_color(z, signed=signed, scheme=scheme),
                    tooltip=[alt.Tooltip("row:O", title=row_title or "row"), alt.Tooltip("col:O", title=col_title or "col"),
                             alt.Tooltip("value:Q", title=value_title, format=".4g")])
            .properties(width=_side(len(cols), max_width), height=_side(len(rows)), autosize=PAD))


def head_grid(patterns: np.ndarray, labels: Sequence[str], *, columns: int = 4, layer: int | None = None) -> alt.FacetChart:
    """Attention patterns of every head of a layer: [head, query, key] as small heatmaps."""
    patterns = np.asarray(patterns, dtype=np.float64)
    h, t, _ = patterns.shape
    hh, qq, kk = np.meshgrid(np.arange(h), np.arange(t), np.arange(t), indexing="ij")
    lab = np.asarray(labels, dtype=object)
    df = pd.DataFrame({"head": hh.ravel(), "query": lab[qq.ravel()], "key": lab[kk.ravel()], "value": patterns.ravel()})
    df = df[kk.ravel() <= qq.ravel()]      # causal: the upper triangle is empty
    side = int(min(GRID_SIDE, max(100, 10 * t)))     # 4 columns fit a 1280 px window beside the sidebar
    show = t <= 24
    base = (alt.Chart(df).mark_rect()
            .encode(x=alt.X("key:O", sort=list(labels), title="key (attended to)",
                            axis=alt.Axis(labels=show, ticks=show, labelAngle=-60)),
                    y=alt.Y("query:O", sort=list(labels), title="query", axis=alt.Axis(labels=show, ticks=show)),
                    color=alt.Color("value:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), title="attention"),
                    tooltip=["head:O", "query:O", "key:O", alt.Tooltip("value:Q", format=".3f")])
            .properties(width=side, height=side))
    prefix = f"L{layer} " if layer is not None else ""
    return base.facet(facet=alt.Facet("head:O", title=None, header=alt.Header(labelExpr=f"'{prefix}head ' + datum.value")),
                      columns=columns)


def histogram(values: np.ndarray, *, title: str = "", bins: int = 60) -> alt.Chart:
    """A histogram of a tensor's values (binned here: a big tensor never goes to the browser)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    counts, edges = np.histogram(v, bins=bins) if v.size else (np.zeros(1), np.array([0.0, 1.0]))
    df = pd.DataFrame({"start": edges[:-1], "end": edges[1:], "count": counts})
    return (alt.Chart(df, title=title or alt.Undefined).mark_bar()
            .encode(x=alt.X("start:Q", bin="binned", title="value"), x2="end:Q", y=alt.Y("count:Q", title="count"),
                    tooltip=[alt.Tooltip("start:Q", format=".4g"), alt.Tooltip("end:Q", format=".4g"), "count:Q"])
            .properties(width=560, height=220, autosize=PAD))


def prob_bars(labels: Sequence[str], probs: Sequence[float], *, title: str = "", highlight: Sequence[str] = ()) -> alt.Chart:
    """Next-token candidates: one horizontal bar per token, longest first."""
    df = pd.DataFrame({"token": list(labels), "prob": list(probs),
                       "kind": ["target" if t in highlight else "other" for t in labels]})
    return (alt.Chart(df, title=title or alt.Undefined).mark_bar()
            .encode(y=alt.Y("token:N", sort="-x", title=None, axis=alt.Axis(labelLimit=200)),
                    x=alt.X("prob:Q", title="probability", scale=alt.Scale(domain=[0, max(1e-9, float(max(probs, default=1)))])),
                    color=alt.Color("kind:N", scale=alt.Scale(domain=["target", "other"], range=["#d62728", "#4c78a8"]),
                                    legend=None),
                    tooltip=["token:N", alt.Tooltip("prob:Q", format=".4f")])
            .properties(width=380, height=max(60, 20 * len(df)), autosize=PAD))


STRIP_PER_ROW = 12     # tokens per row of a token strip: it wraps instead of running off the page
STRIP_CELL = 58


def token_strip(tokens: Sequence[str], values: Sequence[float], *, title: str = "", signed: bool | None = None,
                value_title: str = "value", per_row: int = STRIP_PER_ROW) -> alt.LayerChart:
    """The prompt as rows of coloured token boxes (per-token activation or effect), values on hover; a long
    prompt wraps onto further rows, so the strip is never wider than `per_row` boxes."""
    v = np.asarray(values, dtype=np.float64)
    n = len(tokens)
    pos = np.arange(n)
    df = pd.DataFrame({"token": list(tokens), "pos": pos, "row": pos // per_row, "col": pos % per_row, "value": v})
    x = alt.X("col:O", axis=None, scale=alt.Scale(domain=list(range(min(n, per_row)) or [0])))
    y = alt.Y("row:O", axis=None)
    box = alt.Chart(df).mark_rect(stroke="white").encode(
        x=x, y=y, color=_color(v, signed=signed),
        tooltip=["pos:O", "token:N", alt.Tooltip("value:Q", title=value_title, format=".4g")])
    dark = 0.6 * float(np.abs(v).max()) if v.size else 0.0          # text stays readable on dark boxes
    df["dark"] = np.abs(v) > dark if dark > 0 else False
    text = alt.Chart(df).mark_text(fontSize=12, limit=STRIP_CELL - 4).encode(
        x=x, y=y, text="token:N", color=alt.condition("datum.dark", alt.value("white"), alt.value("black")))
    rows = max(1, -(-n // per_row))
    return alt.layer(box, text, title=title or alt.Undefined).properties(
        width=STRIP_CELL * max(1, min(n, per_row)), height=30 * rows, autosize=PAD)


def lens_grid(df: pd.DataFrame, *, title: str = "") -> alt.LayerChart:
    """Logit lens: rows = residual sites (layers), columns = rank; each cell a token, coloured by probability.

    `df` columns: site, rank, token, prob."""
    sites = list(dict.fromkeys(df["site"]))
    y = alt.Y("site:O", sort=sites, title=None, axis=alt.Axis(labelLimit=220))
    x = alt.X("rank:O", title="rank")
    rect = alt.Chart(df).mark_rect(stroke="white").encode(
        x=x, y=y, color=alt.Color("prob:Q", scale=alt.Scale(scheme="greens", domain=[0, 1]), title="prob"),
        tooltip=["site:O", "rank:O", "token:N", alt.Tooltip("prob:Q", format=".4f")])
    text = alt.Chart(df).mark_text(fontSize=11, limit=78).encode(
        x=x, y=y, text="token:N",
        color=alt.condition(alt.datum.prob > 0.5, alt.value("white"), alt.value("black")))
    ranks = df["rank"].nunique()
    return alt.layer(rect, text, title=title or alt.Undefined).properties(width=86 * ranks, height=26 * len(sites), autosize=PAD)


def line(xs: Sequence[str], ys: Sequence[float], *, title: str = "", y_title: str = "") -> alt.Chart:
    df = pd.DataFrame({"x": list(xs), "y": list(ys)})
    return (alt.Chart(df, title=title or alt.Undefined).mark_line(point=True)
            .encode(x=alt.X("x:O", sort=list(xs), title=None, axis=alt.Axis(labelAngle=-40)),
                    y=alt.Y("y:Q", title=y_title), tooltip=["x:O", alt.Tooltip("y:Q", format=".4f")])
            .properties(width=560, height=220, autosize=PAD))
