"""Results as HTML for Jupyter (`_repr_html_`): node tables (with their verification), comparisons of
two prompts, ablations, sweeps as heatmaps, attention patterns, the logit lens, circuits and activation
records, readable at a glance like the dashboard's views and coloured the same way
(streamlit_app/charts.py): signed values red (negative) through white to blue (positive) on a scale
symmetric around zero, unsigned values and attention in blues, probabilities in greens, circuit edges
by the input they feed. Plain HTML and CSS, no JavaScript, so a saved notebook keeps its views. Exact
values are in each cell's hover title. Plain `repr` stays compact (tdb_client/_repr.py).

`install()` (called by tdb_client/__init__.py) gives each result class its view as `_repr_html_`.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, Callable, Sequence

import numpy as np

from .graph import CircuitResult, Graph
from ._enums import METRICS
from .names import node_name
from .results import (AblationResult, AttentionResult, Comparison, LogitLensResult, NodeTable, NodeTableResult,
                      PairedNodeTable, PatchSweepResult, Verification)
from .sae import ActivationRecords, ActivationWindow

# Colour ramps sampled from the Vega schemes the dashboard's Altair charts use.
REDBLUE = ("#67001f", "#b2182b", "#d6604d", "#f4a582", "#fddbc7", "#f7f7f7",
           "#d1e5f0", "#92c5de", "#4393c3", "#2166ac", "#053061")
BLUES = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
GREENS = ("#f7fcf5", "#e5f5e0", "#c7e9c0", "#a1d99b", "#74c476", "#41ab5d", "#238b45", "#006d2c", "#00441b")
INPUT_COLORS = {"q": "#4c78a8", "k": "#e45756", "v": "#54a24b", "mlp": "#b279a2", "logits": "#f58518",
                "head": "#4c78a8", "resid": "#bab0ac"}       # as the dashboard's Circuit page
MISSING = "#e0e0e0"      # a cell without a value (NaN: not computed yet, or not verified)
MAX_ROWS = 20            # table rows shown (the rest are counted)
MAX_GRID = 64            # heatmap rows or columns shown (the rest are counted)
MAX_TOKENS = 48          # attention patterns over longer prompts are summarised instead
MAX_HEADS = 8

STYLE = ("<style>.tdb-view{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:12px;color:#222}"
         ".tdb-view h4{margin:4px 0;font-size:13px}.tdb-view .tdb-note{color:#666;margin:2px 0}"
         ".tdb-view table{border-collapse:collapse;margin:4px 0}"
         ".tdb-view td,.tdb-view th{padding:2px 6px;border:1px solid #eee;text-align:right;white-space:nowrap}"
         ".tdb-view th{background:#fafafa;font-weight:600}.tdb-view td.l,.tdb-view th.l{text-align:left}"
         ".tdb-view table.tdb-grid td{min-width:22px;height:20px;padding:0 3px;border:1px solid #fff;font-size:11px}"
         ".tdb-view table.tdb-small td{min-width:13px;height:13px;padding:0}.tdb-view table.tdb-small th{font-size:10px;padding:0 2px}"
         ".tdb-view .tdb-legend{display:inline-block;width:160px;height:10px;vertical-align:middle;margin:0 4px}"
         ".tdb-view .tok{display:inline-block;padding:1px 2px;margin:0 1px;border-radius:2px;white-space:pre}"
         ".tdb-view details summary{cursor:pointer;color:#444}.tdb-view .tdb-scroll{overflow-x:auto;max-width:100%}"
         ".tdb-view td.wrap{white-space:normal;max-width:900px}</style>")


# -- colours ----------------------------------------------------------------------------------------

def _mix(ramp: Sequence[str], t: float) -> str:
    """The colour at t in [0, 1] along a ramp (linear in RGB between its stops)."""
    t = min(1.0, max(0.0, t)) * (len(ramp) - 1)
    i = min(int(t), len(ramp) - 2)
    a, b = (tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in (ramp[i], ramp[i + 1]))
    f = t - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))


def _ink(background: str) -> str:
    """Black or white text, whichever reads on the background."""
    r, g, b = (int(background[k:k + 2], 16) for k in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def signed_color(value: float, scale: float) -> str:
    """Red for negative, white for zero, blue for positive; `scale` is the largest |value| shown."""
    if not math.isfinite(value):
        return MISSING
    return _mix(REDBLUE, 0.5 + 0.5 * value / scale) if scale > 0 else REDBLUE[5]


def ramp_color(value: float, ramp: Sequence[str], top: float = 1.0) -> str:
    return MISSING if not math.isfinite(value) else _mix(ramp, value / top if top > 0 else 0.0)


def _scale(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


# -- pieces -----------------------------------------------------------------------------------------

def _fmt(v: Any, sign: str = "+") -> str:
    """A number in 3 significant digits (signed quantities with their sign), "–" for NaN."""
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return f"{v:{sign}.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:{sign}.2e}"
    return escape(str(v))


def _cell(text: str, color: str | None = None, title: str = "", cls: str = "") -> str:
    style = f' style="background:{color};color:{_ink(color)}"' if color else ""
    klass = f' class="{cls}"' if cls else ""
    hover = f' title="{escape(title, quote=True)}"' if title else ""
    return f"<td{klass}{style}{hover}>{text}</td>"


def _token(t: str) -> str:
    """A token as shown: leading spaces as ␣, newlines as ⏎."""
    return escape(t.replace(" ", "␣").replace("\n", "⏎"))


def _view(title: str, notes: Sequence[str], body: str) -> str:
    lines = "".join(f'<p class="tdb-note">{escape(n)}</p>' for n in notes if n)
    return f'{STYLE}<div class="tdb-view"><h4>{escape(title)}</h4>{lines}<div class="tdb-scroll">{body}</div></div>'


def _more(n: int, shown: int, what: str) -> str:
    return f'<p class="tdb-note">… {n - shown} more {what} ({n} in all)</p>' if n > shown else ""


def legend(ramp: Sequence[str], low: float, high: float, what: str) -> str:
    """A colour bar from `low` to `high` (CSS gradient) with its ends labelled."""
    return (f'<p class="tdb-note">{escape(what)}: {low:.3g}<span class="tdb-legend" style="background:'
            f'linear-gradient(to right,{",".join(ramp)})"></span>{high:.3g}</p>')


def grid(z: np.ndarray, rows: Sequence[str], cols: Sequence[str], color: Callable[[float], str],
         title: Callable[[int, int], str], values: bool = False, col_heads: Sequence[str] | None = None,
         small: bool = False) -> str:
    """A heatmap as an HTML table: one coloured cell per value, labels on the left and on top, and the
    value written in each cell when `values` (small grids). `col_heads`: shorter column headings (the
    full label stays in the heading's hover title); `small` cells for many small grids side by side."""
    r, c = min(len(rows), MAX_GRID), min(len(cols), MAX_GRID)
    shown = cols if col_heads is None else col_heads
    head = "<tr><th></th>" + "".join(f'<th title="{escape(str(x), quote=True)}">{escape(str(h))}</th>'
                                      for x, h in zip(cols[:c], shown[:c])) + "</tr>"
    body = "".join(f'<tr><th class="l">{escape(str(rows[i]))}</th>'
                   + "".join(_cell(f"{z[i, j]:.2f}" if values and math.isfinite(z[i, j]) else "",
                                   color(float(z[i, j])), title(i, j)) for j in range(c)) + "</tr>"
                   for i in range(r))
    return (f'<table class="tdb-grid{" tdb-small" if small else ""}">{head}{body}</table>' + _more(len(rows), r, "rows")
            + _more(len(cols), c, "columns"))


# -- node tables and ablations ----------------------------------------------------------------------

def node_rows(table: NodeTable, scale: float | None = None) -> str:
    """Rows of a node table: node, where (query and key tokens), and the four metrics, effects coloured."""
    n = min(len(table), MAX_ROWS)
    metrics = table.metrics[:n]
    scale = _scale(metrics[:, 2:4]) if scale is None else scale
    tokens = table.tokens

    def tok(p: int) -> str:
        return _token(tokens[p]) if 0 <= p < len(tokens) else ""

    keys = bool((table.ids[:n, 4] >= 0).any())       # a "from token" column only for rows that have one
    head = ('<tr><th class="l">node</th><th class="l">at token</th>' + ('<th class="l">from token</th>' if keys else "")
            + "<th>activation</th><th>write norm</th><th>direct effect</th><th>total effect</th></tr>")
    rows = []
    for i, (name, ids) in enumerate(zip(table.nodes[:n], table.ids[:n].tolist())):
        act, norm, direct, total = (float(x) for x in metrics[i])
        rows.append("<tr>" + _cell(escape(name), cls="l") + _cell(tok(ids[3]), cls="l")
                    + (_cell(tok(ids[4]), cls="l") if keys else "") + _cell(_fmt(act, "")) + _cell(_fmt(norm, ""))
                    + _cell(_fmt(direct), signed_color(direct, scale), f"direct effect {direct:.6g}")
                    + _cell(_fmt(total), signed_color(total, scale), f"total effect {total:.6g}") + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>" + _more(len(table), n, "rows")


def node_table_result_html(r: NodeTableResult) -> str:
    t = r.target
    notes = [f"{len(r.tokens)} tokens; target at position {t.position} = {t.value:.4g}"
             f"{'' if t.exact else ' (approximate)'}; direct effects sum to {r.direct_effect_sum:.4g}; "
             f"ranked by {r.rank_by}", *t.notes]
    scale = max(_scale(r.top.metrics[:MAX_ROWS, 2:4]), _scale(r.bottom.metrics[:MAX_ROWS, 2:4]))
    body = node_rows(r.top, scale)
    if len(r.bottom):
        body += f"<details><summary>bottom {len(r.bottom)} (pushing the other way)</summary>" \
                f"{node_rows(r.bottom, scale)}</details>"
    if r.verification is not None:
        body += verification_rows(r.verification)
    return _view(f"Node table: {t.description}", notes, body)


def _names(ids: np.ndarray) -> list[str]:
    return [node_name(t, layer, i, k) for t, layer, i, _, k in ids[:, :5].tolist()]


def verification_rows(v: Verification) -> str:
    """The total-effect estimates of the largest nodes beside their exact zero-ablation effects."""
    scale = _scale(np.concatenate([v.estimate, v.exact]).astype(np.float64))
    rows = "".join("<tr>" + _cell(escape(n), cls="l") + _cell(_fmt(float(e)), signed_color(float(e), scale))
                   + _cell(_fmt(float(x)), signed_color(float(x), scale)) + "</tr>"
                   for n, e, x in zip(_names(v.ids)[:MAX_ROWS], v.estimate.tolist(), v.exact.tolist()))
    return (f"<details><summary>verified: {len(v.ids)} largest estimates against exact zero-ablation "
            f"(Spearman {v.spearman:.3f}, largest error {v.max_abs_error:.3g})</summary><table>"
            '<tr><th class="l">node</th><th>total effect (estimate)</th><th>exact zero-ablation</th></tr>'
            f"{rows}</table></details>")


def paired_rows(table: PairedNodeTable, metric: int = 2) -> str:
    """Aligned rows of two prompts: a metric on the left, on the right, and their difference coloured."""
    n = min(len(table), MAX_ROWS)
    left, right = table.left[:n, metric].astype(np.float64), table.right[:n, metric].astype(np.float64)
    scale = _scale(np.concatenate([left, right, left - right]))
    rows = "".join("<tr>" + _cell(escape(name), cls="l") + _cell(_fmt(a), signed_color(a, scale))
                   + _cell(_fmt(b), signed_color(b, scale)) + _cell(_fmt(a - b), signed_color(a - b, scale)) + "</tr>"
                   for name, a, b in zip(_names(table.ids[:n]), left.tolist(), right.tolist()))
    return ('<table><tr><th class="l">node</th><th>left</th><th>right</th><th>left − right</th></tr>'
            f"{rows}</table>" + _more(len(table), n, "rows"))


def comparison_html(r: Comparison) -> str:
    from_metric = METRICS.index(r.rank_by) if r.rank_by in METRICS else METRICS.index("direct_effect")
    notes = [f"left: {r.left_target.description} = {r.left_target.value:.4g}; right: {r.right_target.description} "
             f"= {r.right_target.value:.4g}; {r.rank_by}, largest left − right first"]
    body = paired_rows(r.top, from_metric)
    if len(r.bottom):
        body += f"<details><summary>bottom {len(r.bottom)}</summary>{paired_rows(r.bottom, from_metric)}</details>"
    return _view(f"Comparison of two prompts ({r.rank_by})", notes, body)


def node_table_html(table: NodeTable) -> str:
    return _view(f"Node table ({len(table)} rows)", [], node_rows(table))


def ablation_html(r: AblationResult) -> str:
    effects = np.array([x.effect for x in r.results], dtype=np.float64)
    scale = _scale(effects)
    rows = "".join("<tr>" + _cell(escape(x.node), cls="l") + _cell(_fmt(x.before, "")) + _cell(_fmt(x.after, ""))
                   + _cell(_fmt(x.effect), signed_color(x.effect, scale), f"after - before = {x.effect:.6g}") + "</tr>"
                   for x in r.results[:MAX_ROWS])
    table = f'<table><tr><th class="l">ablated</th><th>before</th><th>after</th><th>effect</th></tr>{rows}</table>'
    notes = [f"{r.target.description} = {r.before:.4g} before; each row: the target after ablating that node "
             "('all': every node together) and the effect, after - before"]
    return _view(f"Ablation: {r.target.description}", notes, table + _more(len(r.results), MAX_ROWS, "rows"))


# -- sweeps -----------------------------------------------------------------------------------------

def _axis_labels(axis: Any, tokens: Sequence[str]) -> list[str]:
    if axis.name == "position":
        return [f"{p} {tokens[p]}" if 0 <= p < len(tokens) else str(p) for p in axis.values.tolist()]
    return [str(v) for v in axis.values.tolist()]


def sweep_html(r: PatchSweepResult) -> str:
    """normalized as a heatmap: 1 = the clean run's target value restored, 0 = the corrupted run's."""
    z = r.normalized if r.computed or r.approx_normalized is None else r.approx_normalized
    state = "complete" if r.complete else (f"{r.progress.stage} {r.progress.done}/{r.progress.total}"
                                           if r.progress is not None else "in progress")
    notes = [f"{r.direction} {r.method} sweep of {r.site or r.kind}: {r.target.description}, clean {r.clean_value:.4g}, "
             f"corrupted {r.corrupted_value:.4g}; colour = normalized effect (1: clean restored, 0: as corrupted); "
             f"{r.computed} of {r.values.size} cells exact, {state}", *r.notes]
    if r.error is not None:
        notes.append(f"ended early: {r.error}")
    axes = r.axes
    scale = max(1.0, _scale(z))
    if len(axes) == 2:
        rows, cols = _axis_labels(axes[0], r.tokens), _axis_labels(axes[1], r.tokens)

        def title(i: int, j: int) -> str:
            return (f"{axes[0].name} {rows[i]}, {axes[1].name} {cols[j]}: normalized {z[i, j]:.4g}, "
                    f"value {r.values[i, j]:.4g}")
        body = f'<p class="tdb-note">rows: {axes[0].name}; columns: {axes[1].name}</p>' + grid(
            z, rows, cols, lambda v: signed_color(v, scale), title, values=len(cols) <= 16)
    elif len(axes) == 3:   # layer x head x position: one heatmap (head x position) per layer
        parts = []
        for li, layer in enumerate(_axis_labels(axes[0], r.tokens)[:MAX_GRID]):
            rows, cols = _axis_labels(axes[1], r.tokens), _axis_labels(axes[2], r.tokens)
            zl = z[li]
            parts.append(f"<p>{axes[0].name} {escape(layer)}</p>" + grid(
                zl, rows, cols, lambda v: signed_color(v, scale),
                lambda i, j: f"{axes[1].name} {rows[i]}, {axes[2].name} {cols[j]}: normalized {zl[i, j]:.4g}"))
        body = "".join(parts) + _more(len(axes[0].values), MAX_GRID, axes[0].name + "s")
    else:                  # no grid to draw: the strongest cells alone
        body = ""
    if not body or z.size > MAX_GRID * MAX_GRID or any(len(a.values) > MAX_GRID for a in axes):
        body = _largest_cells(r, z) + body          # a grid too big to see whole: its strongest cells first
    return _view(f"Patching sweep ({' x '.join(a.name for a in axes)})", notes,
                 legend(REDBLUE, -scale, scale, "normalized effect") + body)


def _largest_cells(r: PatchSweepResult, z: np.ndarray) -> str:
    """The MAX_ROWS cells of largest |normalized| effect, with their coordinates on every axis."""
    flat = np.where(np.isfinite(z), np.abs(z), -1.0).reshape(-1)
    order = [int(i) for i in np.argsort(-flat, kind="stable")[:MAX_ROWS] if flat[i] >= 0]
    scale = max(1.0, _scale(z))
    labels = [_axis_labels(a, r.tokens) for a in r.axes]
    head = "<tr>" + "".join(f'<th class="l">{escape(a.name)}</th>' for a in r.axes) + "<th>normalized</th></tr>"
    rows = []
    for i in order:
        at = np.unravel_index(i, z.shape)
        v = float(z[at])
        rows.append("<tr>" + "".join(_cell(escape(labels[k][j]), cls="l") for k, j in enumerate(at))
                    + _cell(_fmt(v), signed_color(v, scale), f"value {float(r.values[at]):.4g}") + "</tr>")
    return f"<p>largest effects</p><table>{head}{''.join(rows)}</table>"


# -- attention and the logit lens -------------------------------------------------------------------

def attention_html(r: AttentionResult) -> str:
    """One [query, key] heatmap per head (blues, 0..1); the upper triangle (the future) is left blank."""
    t = len(r.tokens)
    labels = [f"{i} {tok}" for i, tok in enumerate(r.tokens)]
    if t > MAX_TOKENS:
        tops = [f"head {h}: the last token attends most to {labels[int(r.pattern[i, -1].argmax())]} "
                f"({float(r.pattern[i, -1].max()):.2f})" for i, h in enumerate(r.heads)]
        return _view(f"Attention patterns ({t} tokens: too many to draw)", tops, "")
    parts = []
    for i, h in enumerate(r.heads[:MAX_HEADS]):
        p = r.pattern[i]
        parts.append(f'<div style="display:inline-block;vertical-align:top;margin-right:12px"><p>head {h}</p>'
                     + grid(np.where(np.tril(np.ones((t, t), dtype=bool)), p, np.nan), labels, labels,
                            lambda v: "#ffffff" if not math.isfinite(v) else ramp_color(v, BLUES),
                            lambda q, k, p=p: f"query {labels[q]} -> key {labels[k]}: {p[q, k]:.3f}" if k <= q else "",
                            col_heads=[str(k) for k in range(t)], small=True)
                     + "</div>")
    return _view("Attention patterns", ["rows: query (attending); columns: key (attended to)"],
                 "".join(parts) + _more(len(r.heads), MAX_HEADS, "heads"))


def logit_lens_html(r: LogitLensResult) -> str:
    """Rows = residual sites, columns = positions; each cell the top token, coloured by its probability."""
    cols = [f"{p} {r.tokens[p]}" for p in r.positions][:MAX_GRID]
    head = "<tr><th></th>" + "".join(f"<th>{_token(c)}</th>" for c in cols) + "</tr>"
    body = []
    for s, site in enumerate(r.sites[:MAX_GRID]):
        cells = []
        for p in range(len(cols)):
            prob = float(r.top_probs[s, p, 0])
            alts = ", ".join(f"{r.top_tokens[s, p, k]!r} {float(r.top_probs[s, p, k]):.3f}"
                             for k in range(r.top_ids.shape[2]))
            extra = "" if r.target_values is None else f"; target {float(r.target_values[s, p]):.4g}"
            cells.append(_cell(_token(str(r.top_tokens[s, p, 0])), ramp_color(prob, GREENS), alts + extra))
        body.append(f'<tr><th class="l">{escape(site)}</th>{"".join(cells)}</tr>')
    notes = ["each cell: the top token read from that site at that position, coloured by its probability "
             "(hover for the top k)"]
    if r.target is not None:
        notes.append(f"target: {r.target.description}")
    return _view("Logit lens", notes, f"<table>{head}{''.join(body)}</table>"
                 + _more(len(r.sites), MAX_GRID, "sites") + _more(len(r.positions), MAX_GRID, "positions"))


# -- circuits and activation records ----------------------------------------------------------------

def _edge_rows(edges: Sequence[Any]) -> str:
    edges = sorted(edges, key=lambda e: -abs(e.effect))
    scale = _scale(np.array([e.effect for e in edges], dtype=np.float64))
    rows = "".join("<tr>" + _cell(escape(e.source), cls="l") + _cell(escape(e.target), cls="l")
                   + _cell(escape(e.input), INPUT_COLORS.get(e.input, "#bab0ac"), cls="l")
                   + _cell(_fmt(e.effect), signed_color(e.effect, scale), f"effect {e.effect:.6g}")
                   + _cell("" if e.exact is None else _fmt(e.exact)) + "</tr>" for e in edges[:MAX_ROWS])
    return ('<table><tr><th class="l">from</th><th class="l">to</th><th class="l">into</th><th>effect</th>'
            f"<th>exact</th></tr>{rows}</table>" + _more(len(edges), MAX_ROWS, "edges"))


def circuit_html(r: CircuitResult) -> str:
    notes = [f"{len(r.circuit.edges)} edges keep {r.faithfulness:.2f} of the effect (asked: {r.fraction:.2f}); "
             f"clean {r.clean_value:.4g}, every edge ablated ({r.ablation}) {r.ablated_value:.4g}, circuit alone "
             f"{r.circuit_value:.4g}; EAP vs exact on {len(r.verified)} edges: Spearman {r.spearman:.3f}", *r.notes]
    return _view(f"Circuit: {r.target.description}", notes, _edge_rows(r.circuit.edges))


def graph_html(g: Graph) -> str:
    return _view(f"Graph ({g.kind}): {len(g.nodes)} nodes, {len(g.edges)} edges", [], _edge_rows(g.edges))


def _window(w: ActivationWindow, top: float) -> str:
    toks = "".join(f'<span class="tok" style="background:{c};color:{_ink(c)}" title="{escape(f"{t!r}: {a:.4g}", quote=True)}">'
                   f"{_token(t)}</span>" for t, a in zip(w.tokens, w.acts.tolist())
                   for c in [ramp_color(max(a, 0.0), BLUES, top)])
    return f'<tr><td>{w.max_act:.3g}</td><td class="l wrap">{toks}</td></tr>'


def records_html(r: ActivationRecords) -> str:
    """The top-activating windows (and, folded, random ones), each token shaded by the unit's activation."""
    top = r.max_act if r.max_act > 0 else 1.0
    rows = "".join(_window(w, top) for w in r.top[:MAX_ROWS])
    body = f'<table><tr><th>max</th><th class="l">top windows</th></tr>{rows}</table>'
    if r.random:
        rand = "".join(_window(w, top) for w in r.random[:MAX_ROWS])
        body += (f"<details><summary>{len(r.random)} random windows</summary><table>"
                 f'<tr><th>max</th><th class="l">window</th></tr>{rand}</table></details>')
    notes = [f"{r.kind} at {r.site}; {r.n_windows} windows of {r.window} tokens from {r.corpus}; max {r.max_act:.4g}, "
             f"mean of window maxima {r.mean_max:.4g}, active in {r.frac_windows_active:.1%} of windows"]
    return _view(f"Activation records: {r.unit}", notes, body)


VIEWS: dict[type, Callable[[Any], str]] = {
    NodeTableResult: node_table_result_html, NodeTable: node_table_html, Comparison: comparison_html,
    AblationResult: ablation_html,
    PatchSweepResult: sweep_html, AttentionResult: attention_html, LogitLensResult: logit_lens_html,
    CircuitResult: circuit_html, Graph: graph_html, ActivationRecords: records_html,
}


def install() -> None:
    """Give each result class its HTML view as `_repr_html_` (what Jupyter calls to show it)."""
    for cls, view in VIEWS.items():
        cls._repr_html_ = view
