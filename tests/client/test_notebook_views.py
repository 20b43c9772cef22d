"""Results render in Jupyter: each result type's `_repr_html_` (tdb_client/notebook.py) is a plain
HTML table or heatmap, coloured as the dashboard colours it, with the exact values on hover, while the
plain repr stays compact. Real results from the bundled circuit model, through the wire."""

from __future__ import annotations

import json
import re
from html import unescape

import numpy as np

from tdb_client import Ablation, Target
from tdb_client.notebook import BLUES, GREENS, INPUT_COLORS, REDBLUE, ramp_color, signed_color
from tdb_server.paths import circuit_model_path

TRUTH = json.loads((circuit_model_path() / "ground_truth.json").read_text())
DEMO = TRUTH["demo"]
PROMPT, CORRUPTED = DEMO["prompt"], DEMO["variants"][0]["prompt"]
TARGET = Target(tokens=[DEMO["answer"]], distractors=[DEMO["distractor"]])
HEADS = [f"blocks.{layer}.attn.head.{h}" for layer, h in TRUTH["induction_heads"]]


def cells(html: str) -> list[tuple[str, str]]:
    """(background colour, hover title) of every coloured cell."""
    return [(c, unescape(t)) for c, t in re.findall(r'<(?:td|span)[^>]*style="background:(#[0-9a-f]{6});[^"]*"[^>]*?(?: title="([^"]*)")?>', html)]


def check_view(result, *texts: str) -> str:
    html = result._repr_html_()
    assert html.startswith("<style>") and "<script" not in html.lower()
    for t in texts:
        assert t in html, t
    assert len(repr(result)) < 2500            # the plain repr stays compact (a circuit printed 11 kB)
    return html


def test_node_table_colours_effects_red_to_blue(bundled_client):
    r = bundled_client.node_table(PROMPT, TARGET, top_k=5, node_types=["head", "neuron"])
    html = check_view(r, "Node table", *r.top.nodes, "direct effect", "<details>")
    top = float(r.top.column("direct_effect")[0])       # the largest |effect| of the view, positive: darkest blue
    assert (REDBLUE[-1], f"direct effect {top:.6g}") in cells(html)
    assert check_view(r.top, *r.top.nodes)


def test_ablation_shows_the_drop_in_red(bundled_client):
    r = bundled_client.ablate(PROMPT, TARGET, [Ablation(h) for h in HEADS])
    html = check_view(r, "Ablation", "<td class=\"l\">all</td>")
    assert r.results[0].effect < 0 and (REDBLUE[0], f"after - before = {r.results[0].effect:.6g}") in cells(html)
    each = bundled_client.ablate(PROMPT, TARGET, [Ablation(h) for h in HEADS], separately=True)
    html = check_view(each, *HEADS)
    worst = min(each.results, key=lambda e: e.effect)
    assert worst.effect < 0 and (REDBLUE[0], f"after - before = {worst.effect:.6g}") in cells(html)


def test_sweep_is_a_heatmap_of_layers_by_heads(bundled_client):
    r = bundled_client.patch_sweep(PROMPT, CORRUPTED, TARGET, kind="head_out")
    html = check_view(r, "Patching sweep (layer x head)", "rows: layer; columns: head", "complete")
    grid = cells(html)
    assert len(grid) == r.values.size == 8
    layer, head = np.unravel_index(np.nanargmax(r.normalized), r.normalized.shape)
    best = [c for c, t in grid if t.startswith(f"layer {layer}, head {head}:")]
    scale = max(1.0, float(np.nanmax(np.abs(r.normalized))))
    assert best == [signed_color(float(r.normalized[layer, head]), scale)]


def test_attention_patterns_are_causal_blue_heatmaps(bundled_client):
    r = bundled_client.attention_pattern(PROMPT, 1)
    html = check_view(r, "Attention patterns", "head 0", "head 3")
    t = len(r.tokens)
    grid = cells(html)
    assert len(grid) == len(r.heads) * t * t
    future = [c for c, title in grid if not title]          # key after query: blank
    assert len(future) == len(r.heads) * t * (t - 1) // 2 and set(future) == {"#ffffff"}
    h = r.heads.index(3)
    k = int(r.pattern[h, -1].argmax())                       # the induction head looks back at "Darcy"
    title = f"query {t - 1} {r.tokens[-1]} -> key {k} {r.tokens[k]}: {r.pattern[h, -1, k]:.3f}"
    assert (ramp_color(float(r.pattern[h, -1, k]), BLUES), title) in grid


def test_logit_lens_cells_are_top_tokens_in_greens(bundled_client):
    r = bundled_client.logit_lens(PROMPT, top_k=3)
    html = check_view(r, "Logit lens", *r.sites)
    assert len(cells(html)) == len(r.sites) * len(r.positions)
    last = str(r.top_tokens[-1, -1, 0])
    assert last.strip() in html and GREENS[0] not in [c for c, _ in cells(html)][-1:]


def test_circuit_edges_coloured_by_input(bundled_client):
    cue = PROMPT.split().index("Mr")
    earlier = " ".join(w if i != cue else "the" for i, w in enumerate(PROMPT.split()))
    r = bundled_client.circuit(PROMPT, earlier, TARGET, fraction=0.9)
    html = check_view(r, "Circuit", f"{len(r.circuit.edges)} edges")
    used = {c for c, _ in cells(html)}
    assert {INPUT_COLORS[e.input] for e in r.circuit.edges if e.input in INPUT_COLORS} <= used
    assert check_view(r.circuit, "edges")


def test_activation_records_shade_each_token(bundled_client):
    r = bundled_client.activation_records("blocks.1.attn.head.3", n_top=3, n_random=2, window=16, batch=8)
    html = check_view(r, "Activation records", "top windows", "random windows")
    spans = re.findall(r'<span class="tok"', html)
    assert len(spans) == sum(len(w.tokens) for w in r.top + r.random)


def test_node_table_verification_and_comparison(bundled_client):
    r = bundled_client.node_table(PROMPT, TARGET, top_k=5, node_types=["head"], verify_top=3)
    html = check_view(r, "verified: 3 largest estimates", "exact zero-ablation")
    assert all(f"{float(x):+.3g}" in html for x in r.verification.exact)
    c = bundled_client.compare(PROMPT, CORRUPTED, TARGET, top_k=4, node_types=["head"])
    html = check_view(c, "Comparison of two prompts", "left − right")
    first = c.top                                   # the first row's difference, coloured on the view's scale
    diff = float(first.left[0, 2] - first.right[0, 2])
    scale = max(np.abs(np.concatenate([first.left[:, 2], first.right[:, 2], first.left[:, 2] - first.right[:, 2]])))
    assert signed_color(diff, float(scale)) in [col for col, _ in cells(html)]


def test_per_position_and_neuron_sweeps_stay_readable(bundled_client):
    r = bundled_client.patch_sweep(PROMPT, CORRUPTED, TARGET, kind="head_out", per_position=True)
    assert len(r.shape) == 3                                   # layer x head x position
    html = check_view(r, "Patching sweep (layer x head x position)", "<p>layer 0</p>", "<p>layer 1</p>")
    assert len(cells(html)) == r.values.size and "largest effects" not in html
    r = bundled_client.patch_sweep(PROMPT, CORRUPTED, TARGET, kind="neuron", method="attribution", verify_top_k=5)
    n = r.shape[1]
    html = check_view(r, "largest effects", f"… {n - 64} more columns ({n} in all)")
    z = r.normalized if r.computed else r.approx_normalized
    layer, neuron = np.unravel_index(np.nanargmax(np.abs(z)), z.shape)
    top_row = re.search(r"largest effects</p><table><tr>.*?</tr><tr>(.*?)</tr>", html).group(1)
    assert top_row.startswith(f'<td class="l">{layer}</td><td class="l">{neuron}</td>')   # the strongest cell first


def test_text_from_the_model_is_escaped():
    """Tokens are text the model's vocabulary holds: a token that looks like markup is shown, never run."""
    evil = '<script>alert("x")</script>'
    from tdb_client import AttentionResult, LogitLensResult

    lens = LogitLensResult(tokens=("a", evil), sites=("embed",), positions=(0, 1), top_ids=np.zeros((1, 2, 1), int),
                           top_logits=np.ones((1, 2, 1)), top_probs=np.full((1, 2, 1), 0.5),
                           top_tokens=np.array([[[evil], ['" onmouseover="x']]], dtype=object),
                           target_values=None, target=None)
    att = AttentionResult(tokens=(evil, "b"), heads=(0,), pattern=np.array([[[1.0, 0.0], [0.5, 0.5]]]))
    for html in (lens._repr_html_(), att._repr_html_()):
        assert "<script" not in html and "&lt;script&gt;" in html and '" onmouseover' not in html


def test_a_sweep_without_a_grid_lists_its_cells():
    from tdb_client import PatchSweepResult, ResolvedTarget, SweepAxis

    target = ResolvedTarget("logit('a')", "logit", (1,), (), 2, 1.0, True, (), ())
    values = np.array([0.5, np.nan, 2.0], dtype=np.float32)
    r = PatchSweepResult("resid_pre", "denoising", "exact", "blocks.{L}.resid_pre", ("a", "b", "c"), ("a", "b", "d"),
                         target, 2.0, 0.0, (SweepAxis("layer", np.arange(3)),), values, values / 2)
    html = check_view(r, "Patching sweep (layer)", "largest effects", "2 of 3 cells exact")
    assert re.search(r'largest effects</p><table><tr>.*?</tr><tr><td class="l">2</td>', html)   # 2.0 first, NaN left out
    assert html.count('<td class="l">') == 2
