#!/usr/bin/env python3
"""S: how tdb's cost grows with the prompt, side by side with TransformerLens and nnsight (issue 24).

    python -m benchmarks.bench_scaling --threads 1 --clock cpu          # or: python -m benchmarks S
    python -m benchmarks.bench_scaling --tiny --peers none --tokens 8,16 --llama-tokens 8 --json ''   # a check

Every cell is the median seconds of a task and its ratio to a plain HF forward of the same prompt timed
alongside it in this process (the project's convention: read ratios, not absolutes). Peers' numbers
are checked against tdb's before anything is timed; the largest difference goes in the row's note. A
peer that is not installed or not asked for (`--peers`) gets a row saying so.

On a random-weight GPT-2-small (benchmarks/bench_sweeps.save_random_gpt2, the weights P4 and P7 use),
at each of `--tokens` (default 20, 128, 512, 1,024):

* node table, one target (logit(t1000) - logit(t2000) at the last position): tdb's direct effects of
  every head and neuron at the target position (what the peers compute), the same with total effects
  (one backward), and the full table (every position, direct + total: the dashboard's) up to
  `--full-table-max` tokens; TransformerLens's run_with_cache + logit_attrs and the nnsight idiom
  written by hand (bench_peers.tl_direct_attribution / nnsight_direct_attribution);
* cache everything: bench_peers.cache_entries (a tdb session run capturing every site, the same over
  gRPC with nothing read back, TransformerLens run_with_cache, an nnsight trace saving 9 values a block);
* information flow (tdb's information-flow routes, one forward; neither peer has it) up to
  `--flow-max` tokens: each head's [T, T, d_model] proximity terms grow with the square of the prompt;
* exact head-output sweep: tdb over all 144 heads, and over layer 0's 12 heads; TransformerLens's
  get_act_patch_attn_head_out_all_pos (all 144 heads, one forward each) up to `--peer-sweep-max`
  tokens, and generic_activation_patch over layer 0's 12 heads at every length (a patch at layer 0
  recomputes every layer in either tool, so layer 0 is the subset where tdb's resuming saves least).
  Each sweep's cost in forwards is stated against the lower bound of recomputing the layers after each
  patch (bench_sweeps.recompute_bound). From `--long` tokens on, sweeps are timed once (the first run,
  which is also the one whose values are checked) and the other tasks with `--long-repeat` repeats.

On a TinyLlama-1.1B-shaped Llama with random weights (22 layers, d_model 2048, 32 heads, 4 KV heads,
d_mlp 5632; benchmarks/gpu_sweeps.CONFIGS["llama-1b"], saved with a word-level tokenizer to a temporary
directory) at each of `--llama-tokens` (default 20, 128): the node table at the target position and
cache everything, tdb and TransformerLens (the nnsight idioms of bench_peers name GPT-2's modules).

The table goes to stdout, the rows (with model, tokens, task and tool) to `--json`, the plot (Altair:
ratio to a forward against tokens, log scales, one line per tool per task and model) to `--plot`
(`--combine A.json,B.json` joins the rows of runs made apart, e.g. each model in its own process, and
redraws both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_peers import (Bench, Entry, _load, cache_entries, dense_direct, load_nnsight, load_tl,  # noqa: E402
                                    max_diff, nnsight_direct_attribution, timed_rows, tl_direct_attribution,
                                    versions)
from benchmarks.bench_sweeps import A, B, recompute_bound, save_random_gpt2, sweep_prompts  # noqa: E402
from benchmarks.common import now, report, use_clock  # noqa: E402
from benchmarks.gpu_sweeps import CONFIGS  # noqa: E402
from benchmarks.measures import RESULTS, plain_forward  # noqa: E402
from tdb_server.analyses import TargetSpec, resolve_target  # noqa: E402
from tdb_server.analyses.circuits import information_flow  # noqa: E402
from tdb_server.analyses.node_table import HEAD, NEURON, TargetObjective, compute_node_table  # noqa: E402
from tdb_server.analyses.sweeps import SweepSpec, patch_sweep  # noqa: E402
from tdb_server.engine.manager import SessionManager  # noqa: E402
from tdb_server.model import build_random_model, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "benchmarks_scaling.svg"
PEERS = ("TransformerLens", "nnsight")
# tiny shapes of both families for a quick check (vocabulary above the target ids A and B)
TINY = {"gpt2": ("gpt2", {**CONFIGS["gpt2-tiny"][1], "vocab_size": 2048}),
        "llama": ("llama", {**CONFIGS["llama-tiny"][1], "vocab_size": 2048})}
# the plot's panels, in order (the table has every row)
PANELS = ("node table, direct effects at the target", "cache everything", "information flow",
          "exact head sweep, every head", "exact head sweep, layer 0's heads")


COLORS = {"tdb": "#d62728", "tdb + total effects": "#ff9896", "tdb full table": "#8c2d04",
          "TransformerLens": "#1f77b4", "nnsight": "#2ca02c"}


# --- models on disk (the peers load from a directory) --------------------------------------------

def save_random(path: Path, family: str, config: dict, seed: int = 0) -> None:
    """A random-weight model of `family` with `config`, saved with a word-level tokenizer over its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    adapter = build_random_model(family, seed=seed, self_check=False, **config)
    adapter.model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(adapter.info.vocab_size)}
    del adapter
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t0", unk_token="t0").save_pretrained(path)


# --- timing ----------------------------------------------------------------------------------------

def alongside(fn: Callable[[], object], plain: Callable[[], object], repeat: int) -> tuple[float, float, object]:
    """(median seconds of fn, median of a plain forward timed just before each run of fn, fn's first output).
    repeat <= 1: fn runs once, timed (its output is also what gets checked); otherwise the first run is
    the warm-up and `repeat` more are timed."""
    tf, tp = [], []
    t0 = now()
    out = fn()
    first = now() - t0
    if repeat <= 1:
        for _ in range(3):
            t0 = now()
            plain()
            tp.append(now() - t0)
        return first, statistics.median(tp), out
    for _ in range(repeat):
        t0 = now()
        plain()
        tp.append(now() - t0)
        t0 = now()
        fn()
        tf.append(now() - t0)
    return statistics.median(tf), statistics.median(tp), out


def tag(rows: list[dict], model: str, tokens: int, task: str, tools: list[str]) -> list[dict]:
    """Give timed_rows' rows (one per entry, in order) the id S and their model, tokens, task and tool."""
    return [{**r, "id": "S", "what": f"{model}, {tokens} tokens: {r['what']}", "model": model, "tokens": tokens,
             "task": task, "tool": tool} for r, tool in zip(rows, tools)]


def row(model: str, tokens: int, task: str, tool: str, what: str, secs: float | None, plain: float | None,
        note: str) -> dict:
    r = {"id": "S", "what": f"{model}, {tokens} tokens: {task}: {what}", "model": model, "tokens": tokens,
         "task": task, "tool": tool, "value": None if secs is None else secs * 1e3, "unit": "ms" if secs else "",
         "note": note}
    if secs is not None and plain:
        r["ratio"] = secs / plain
    return r


# --- the tasks -------------------------------------------------------------------------------------

def node_table_entries(b: Bench, full: bool) -> list[tuple[str, str, Entry]]:
    """(tool, label, entry): tdb's node tables for heads + neurons, and the peers' direct attribution,
    checked against tdb's direct effects at the target position."""
    info, p, types = b.adapter.info, b.target.position, {HEAD, NEURON}
    objective = TargetObjective(b.target)

    def direct():
        return compute_node_table(b.adapter, b.ids, objective, node_types=types, target_position_only=True,
                                  direct_only=True)
    ref = direct().table
    heads = dense_direct(ref.ids.numpy(), ref.metrics.numpy(), HEAD, p, (info.n_layers, info.n_heads))
    neurons = dense_direct(ref.ids.numpy(), ref.metrics.numpy(), NEURON, p, (info.n_layers, info.d_mlp))
    out = [("tdb", "tdb: compute_node_table, heads + neurons, direct effects at the target position",
            Entry(direct, f"{len(ref.ids)} rows; largest |head effect| {float(np.nanmax(np.abs(heads))):.2e}")),
           ("tdb + total effects", "tdb: the same + total effects (one backward)",
            Entry(lambda: compute_node_table(b.adapter, b.ids, objective, node_types=types, target_position_only=True),
                  "activation x gradient at the target position"))]
    if full:
        out.append(("tdb full table", "tdb: the full table, every position, direct + total (the dashboard's)",
                    Entry(lambda: compute_node_table(b.adapter, b.ids, objective, node_types=types),
                          f"every position: {len(b.ids)} x {info.n_layers} x ({info.n_heads} heads + {info.d_mlp} "
                          f"neurons) rows")))
    for name, model, fn, label in (
            ("TransformerLens", b.tl, tl_direct_attribution,
             "TransformerLens: run_with_cache + stack_head/neuron_results + logit_attrs (direct, one position)"),
            ("nnsight", b.nns, nnsight_direct_attribution,
             "nnsight: trace saving head outputs, activations, final residual + DLA by hand (direct, one position)")):
        if model is None:
            out.append((name, label, Entry(None, b.missing[name])))
            continue
        try:
            got_heads, got_neurons = fn(model, b.x)
        except Exception as e:  # noqa: BLE001 - a peer that fails on this model is a finding, not a crash
            out.append((name, label, Entry(None, f"failed: {type(e).__name__}: {e}"[:300])))
            continue
        note = (f"max |{name} - tdb| direct effect: heads {max_diff(got_heads.reshape(heads.shape), heads):.1e}, "
                f"neurons {max_diff(got_neurons.reshape(neurons.shape), neurons):.1e}")
        out.append((name, label, Entry(lambda fn=fn, model=model: fn(model, b.x), note)))
    return out


def timed_task(model: str, tokens: int, task: str, entries: list[tuple[str, str, Entry]], plain, repeat: int):
    rows = timed_rows(task, {label: e for _, label, e in entries}, plain, repeat)
    return tag(rows, model, tokens, task, [tool for tool, _, _ in entries])


def tool_of(label: str) -> str:
    """The tool a bench_peers entry's label names ("tdb in-process: ...", "tdb over gRPC: ...", "nnsight: ...")."""
    head = label.split(":")[0]
    return {"tdb in-process": "tdb"}.get(head, head)


def flow_rows(model: str, b: Bench, plain, repeat: int) -> list[dict]:
    secs, base, flow = alongside(lambda: information_flow(b.adapter, b.ids), plain, repeat)
    note = (f"{len(flow.graph.edges)} edges reach the last position ({flow.n_edges_total} above the threshold); "
            f"plain forward alongside {base * 1e3:.0f} ms; no peer has information-flow routes")
    return [row(model, len(b.ids), "information flow", "tdb", "tdb: information_flow (one forward + every head's "
                "proximity terms)", secs, base, note)]


def tl_head_sweep(tl, clean: list[int], corrupted: list[int], layers: list[int] | None) -> torch.Tensor:
    """TransformerLens: the clean run_with_cache, then one forward per head patching its clean z into the
    corrupted run (every head: get_act_patch_attn_head_out_all_pos; `layers`: generic_activation_patch
    over those layers' heads). Returns [len(layers) or n_layers, n_heads]."""
    import pandas as pd
    from transformer_lens import patching

    def metric(logits):
        return logits[0, -1, A] - logits[0, -1, B]
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.tensor([clean]))
        x = torch.tensor([corrupted])
        H = tl.cfg.n_heads
        if layers is None:
            got = patching.get_act_patch_attn_head_out_all_pos(tl, x, cache, metric)
            n = tl.cfg.n_layers
        else:
            index = pd.DataFrame({"layer": [L for L in layers for _ in range(H)], "head": list(range(H)) * len(layers)})
            got = patching.generic_activation_patch(tl, x, cache, metric, patching.layer_head_vector_patch_setter,
                                                    "z", index_df=index)
            n = len(layers)
    return (got if isinstance(got, torch.Tensor) else got.values).float().reshape(n, H)


def sweep_rows(model: str, b: Bench, tokens: int, repeat: int, peer_full: bool) -> list[dict]:
    """Exact head-output sweeps: tdb (every head; layer 0's heads) and TransformerLens, checked first."""
    info = b.adapter.info
    L, H = info.n_layers, info.n_heads
    clean, corrupted = sweep_prompts(tokens, vocab=min(50000, info.vocab_size))
    target, _ = resolve_target(b.adapter, TargetSpec(token_ids=(A,), distractor_ids=(B,)), clean)
    plain = plain_forward(b.adapter, clean)
    rows: list[dict] = []
    cases = ((f"exact head sweep, {L * H} heads", None, recompute_bound(L, H)),
             (f"exact head sweep, layer 0 ({H} heads)", [0], H + 2.0))    # each patch at layer 0 recomputes all L
    for task, layers, bound in cases:
        spec = SweepSpec("head_out", layers=tuple(layers or ()))
        secs, base, ours = alongside(lambda spec=spec: patch_sweep(b.adapter, clean, corrupted, target, spec),
                                     plain, repeat)
        values = ours.values.reshape(-1, H)
        how = f"median of {repeat} after a warm-up" if repeat > 1 else "one run"
        rows.append(row(model, tokens, task, "tdb", "tdb: patch_sweep (batched, resumed at the patched layer)", secs,
                        base, f"{secs / base:.1f} forwards vs a lower bound of {bound:.0f} for recomputing the layers "
                              f"after each patch at batch 1; {how}; plain forward alongside {base * 1e3:.0f} ms"))
        label = "TransformerLens: " + ("get_act_patch_attn_head_out_all_pos" if layers is None else
                                       "generic_activation_patch over layer 0's heads") + " + the clean run_with_cache"
        if b.tl is None:
            rows.append(row(model, tokens, task, "TransformerLens", label, None, None, b.missing["TransformerLens"]))
            continue
        if layers is None and not peer_full:
            rows.append(row(model, tokens, task, "TransformerLens", label, None, None,
                            f"not run at {tokens} tokens (one forward per head, {L * H} heads: past --peer-sweep-max); "
                            f"the layer-0 row measures the same loop on {H} heads"))
            continue
        t_secs, t_base, theirs = alongside(lambda layers=layers: tl_head_sweep(b.tl, clean, corrupted, layers),
                                           plain, 1)
        spread = float(values.max() - values.min())
        rows.append(row(model, tokens, task, "TransformerLens", label, t_secs, t_base,
                        f"one run; {t_secs / secs:.1f}× tdb; max |TL - tdb| {float((theirs - values).abs().max()):.1e} "
                        f"(values span {spread:.1e}); one forward per head"))
    return rows


# --- one model at one length -----------------------------------------------------------------------

def load_peers(path: Path, adapter, peers: set[str], family: str) -> tuple[object, object, dict[str, str]]:
    missing = {p: f"not asked for (--peers {','.join(sorted(peers)) or 'none'})" for p in PEERS}
    tl = nns = None
    if "TransformerLens" in peers:
        tl, missing["TransformerLens"] = _load("TransformerLens", lambda: load_tl(path, adapter.tokenizer))
    if "nnsight" in peers:
        if family == "gpt2":
            nns, missing["nnsight"] = _load("nnsight", lambda: load_nnsight(path))
        else:
            missing["nnsight"] = "not run: bench_peers' nnsight idioms are written with GPT-2's module names"
    return tl, nns, missing


def length_rows(model: str, b: Bench, mgr: SessionManager, args, tasks: set[str]) -> list[dict]:
    tokens = len(b.ids)
    long = tokens >= args.long
    repeat = args.long_repeat if long else args.repeat
    plain = plain_forward(b.adapter, b.ids)
    t0 = time.perf_counter()
    rows: list[dict] = []
    if "node" in tasks:
        rows += timed_task(model, tokens, "node table, direct effects at the target",
                           node_table_entries(b, tokens <= args.full_table_max), plain, repeat)
        if tokens > args.full_table_max:
            info = b.adapter.info
            rows.append(row(model, tokens, "node table, direct effects at the target", "tdb full table",
                            "tdb: the full table (every position)", None, None,
                            f"not run past --full-table-max {args.full_table_max} tokens (its rows grow with tokens "
                            f"x (heads + neurons): {tokens * info.n_layers * (info.n_heads + info.d_mlp):,})"))
    if "cache" in tasks:
        with b.client.session() as wire_session:      # a session of its own: an idle one times out
            cache = cache_entries(b, mgr.create(), wire_session)
            rows += timed_task(model, tokens, "cache everything", [(tool_of(k), k, e) for k, e in cache.items()],
                               plain, repeat)
        del cache
    if "flow" in tasks:
        if tokens <= args.flow_max:
            rows += flow_rows(model, b, plain, repeat)
        else:
            rows.append(row(model, tokens, "information flow", "tdb", "tdb: information_flow", None, None,
                            f"not run past --flow-max {args.flow_max} tokens: each head's proximity terms are "
                            f"[T, T, d_model] float32, {tokens ** 2 * b.adapter.info.d_model * 4 / 2**30:.1f} GiB "
                            f"a tensor at {tokens} tokens"))
    if "sweep" in tasks:
        rows += sweep_rows(model, b, tokens, 1 if long else args.repeat, tokens <= args.peer_sweep_max)
    print(f"{model}, {tokens} tokens: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def model_rows(model: str, path: Path, family: str, lengths: list[int], tasks: set[str], args,
               done: list[dict]) -> list[dict]:
    """The rows of one model at each length; after each length, the rows so far (`done` + these) go to
    `--json`.partial, so that a long run stopped midway keeps what it measured."""
    from tdb_client import TdbClient
    from tdb_server.server import create_server

    adapter = load_model(str(path), device="cpu", dtype="float32")
    tl, nns, missing = load_peers(path, adapter, args.peers, family)
    handle, port = create_server("127.0.0.1:0", adapter)
    mgr = SessionManager(adapter)
    rows: list[dict] = []
    try:
        with TdbClient(f"127.0.0.1:{port}", timeout=1800) as client:
            for tokens in lengths:
                gen = torch.Generator().manual_seed(1)
                ids = torch.randint(100, adapter.info.vocab_size, (tokens,), generator=gen).tolist()
                target, ids = resolve_target(adapter, TargetSpec(token_ids=(A,), distractor_ids=(B,)), ids)
                b = Bench(adapter, ids, target, client, tl, nns, missing)
                rows += length_rows(model, b, mgr, args, tasks)
                if args.json:
                    Path(args.json + ".partial").write_text(json.dumps({"header": "partial: the run did not finish",
                                                                        "rows": done + rows}, indent=1))
    finally:
        mgr.shutdown()
        handle.stop(grace=None)
    return rows


# --- the table by length, and the plot -------------------------------------------------------------

def _duration(secs: float) -> str:
    return f"{secs * 1e3:.3g} ms" if secs < 1 else f"{secs:.3g} s" if secs < 100 else f"{secs:,.0f} s"


def pivot_lines(rows: list[dict]) -> list[str]:
    """Markdown: per model, one line per (task, tool), one column per length; a cell is the ratio to a
    forward and the median time, or — where the row has no value (its note says why)."""
    lines: list[str] = []
    for model in dict.fromkeys(r["model"] for r in rows if "model" in r):
        mine = [r for r in rows if r.get("model") == model]
        lengths = sorted({r["tokens"] for r in mine})
        lines += [f"{model}:", "", "| task | tool | " + " | ".join(f"{t:,} tokens" for t in lengths) + " |",
                  "|---|---|" + "---|" * len(lengths)]
        for task, tool in dict.fromkeys((r["task"], r["tool"]) for r in mine):
            cells = []
            for t in lengths:
                r = next((r for r in mine if (r["task"], r["tool"], r["tokens"]) == (task, tool, t)), None)
                cells.append("" if r is None else "—" if r.get("ratio") is None
                             else f"{r['ratio']:.2f}× ({_duration(r['value'] / 1e3)})")
            lines.append(f"| {task} | {tool} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Ratio to a forward against tokens, log-log, one panel per task (PANELS), one line per tool and model."""
    import altair as alt

    def panel(task: str) -> str:
        if task.startswith("exact head sweep"):
            return PANELS[4] if "layer 0" in task else PANELS[3]
        return task
    data = [{"tokens": r["tokens"], "ratio": r["ratio"], "task": panel(r["task"]), "tool": r["tool"],
             "model": r["model"]}
            for r in rows if r.get("ratio") and panel(r.get("task", "")) in PANELS and r["tool"] != "tdb over gRPC"]
    if not data:
        return
    lengths = sorted({d["tokens"] for d in data})
    base = alt.Chart(alt.Data(values=data)).encode(
        x=alt.X("tokens:Q", scale=alt.Scale(type="log", domain=[min(lengths) / 1.3, max(lengths) * 1.3]),
                axis=alt.Axis(values=lengths, labelOverlap=False)),
        y=alt.Y("ratio:Q", scale=alt.Scale(type="log"), title="cost ÷ one plain forward"),
        color=alt.Color("tool:N", title="tool", scale=alt.Scale(domain=list(COLORS), range=list(COLORS.values()))),
        shape=alt.Shape("model:N", title="model"),
        detail="model:N")
    chart = (base.mark_line() + base.mark_point(filled=True, size=50)).properties(width=190, height=170).facet(
        facet=alt.Facet("task:N", title=None, sort=list(PANELS)), columns=3).resolve_scale(y="independent")
    chart = chart.properties(title="tdb and the peers as prompts grow (CPU, ratio to a plain HF forward)")
    path.parent.mkdir(parents=True, exist_ok=True)
    chart.save(str(path))


# --- entry point -----------------------------------------------------------------------------------

def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=ints, default=[20, 128, 512, 1024], help="GPT-2-small prompt lengths")
    ap.add_argument("--llama-tokens", type=ints, default=[20, 128], help="1.1B Llama prompt lengths ('' for none)")
    ap.add_argument("--tasks", default="node,cache,flow,sweep", help="GPT-2-small's tasks (the Llama: node,cache)")
    ap.add_argument("--peers", type=lambda s: {p for p in PEERS if p.lower() in s.lower()}, default=set(PEERS),
                    help="TransformerLens,nnsight (default), one of them, or none")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--long", type=int, default=512, help="from this length on: --long-repeat, sweeps timed once")
    ap.add_argument("--long-repeat", type=int, default=2)
    ap.add_argument("--full-table-max", type=int, default=512)
    ap.add_argument("--flow-max", type=int, default=512)
    ap.add_argument("--peer-sweep-max", type=int, default=128,
                    help="TransformerLens's all-heads sweep up to this length (its layer-0 subset always runs)")
    ap.add_argument("--tiny", action="store_true", help="tiny GPT-2 and Llama shapes (a quick end-to-end check)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--json", default=str(RESULTS / "scaling_cpu.json"))
    ap.add_argument("--plot", default=str(PLOT), help="the Altair plot (.svg, .png or .html; '' for none)")
    ap.add_argument("--combine", default="", help="measure nothing: the rows of these JSONs of earlier runs "
                                                  "(comma-separated) go to --json together, with the table by "
                                                  "length and the plot")
    return ap


def run(args) -> tuple[str, list[dict]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # everything is local: never download
    if args.threads:
        torch.set_num_threads(args.threads)
    use_clock(args.clock)
    tasks = {t.strip() for t in args.tasks.split(",") if t.strip()}
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        gpt2, llama = Path(tmp) / "gpt2", Path(tmp) / "llama"
        g_name = "GPT-2 tiny" if args.tiny else "GPT-2-small"
        if args.tiny:
            save_random(gpt2, *TINY["gpt2"])
        else:
            save_random_gpt2(gpt2, seed=0)
        if args.tokens:
            rows += model_rows(g_name, gpt2, "gpt2", args.tokens, tasks, args, rows)
        if args.llama_tokens:
            save_random(llama, *(TINY["llama"] if args.tiny else CONFIGS["llama-1b"]))
            rows += model_rows("Llama tiny" if args.tiny else "Llama 1.1B shape", llama, "llama", args.llama_tokens,
                               tasks & {"node", "cache"}, args, rows)
    header = (f"S: scaling with prompt length; CPU fp32, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads, {args.clock} clock; {versions()}; {time.perf_counter() - t0:.0f} s in all; "
              f"load average at the end {os.getloadavg()[0]:.1f}")
    return header, rows


def main() -> int:
    args = parser().parse_args()
    if args.combine:
        runs = [json.loads(Path(f).read_text()) for f in args.combine.split(",") if f]
        header, rows = " | ".join(r["header"] for r in runs), [row for r in runs for row in r["rows"]]
    else:
        header, rows = run(args)
    report(header, rows, args.json)
    print("\n" + "\n".join(pivot_lines(rows)))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
