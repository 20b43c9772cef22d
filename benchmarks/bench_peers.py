#!/usr/bin/env python3
"""P7: the node table, the logit lens and "cache every activation" side by side with TransformerLens
and nnsight, on the same weights (a random GPT-2-small saved to a local directory), in one process.

    pip install -c constraints.txt -e ".[bench]"     # the peers; never runtime dependencies
    python benchmarks/bench_peers.py [--tokens 32] [--repeat 5]    # or: python -m benchmarks P7

Before anything is timed, each peer's numbers are checked against tdb's and the largest difference
goes in the row's note. A peer that is not installed, or fails to load, gets a row saying why.
Each task is timed interleaved with a plain HF forward of the same prompt (the ratio column):

* node table, one target: tdb compute_node_table for heads + neurons: direct effects at the target
  position (what the peers compute: one forward, no backward), the same with total effects (one
  backward), and the full table (every position, direct and total: what the dashboard shows);
  over gRPC the first (NodeTable, top/bottom 20 sent back); TransformerLens 4.x
  (TransformerBridge) run_with_cache + stack_head_results / stack_neuron_results + logit_attrs (direct
  effect at the target position only); nnsight has no direct-attribution helper, so no row.
* logit lens of embed + every block's output, every position, top 5: tdb logit_lens (and LogitLens
  over gRPC); TransformerLens tools.analysis.logit_lens(positions=None, top_k=5); nnsight's idiom, a
  trace computing lm_head(ln_f(output)) of the embedding dropout and every block, then top 5.
* cache everything: a tdb session run capturing every site (and Launch over gRPC, nothing read
  back; and Launch + the whole cache read back, one ReadTensor per site or one ReadTensors, through
  shared memory or streamed); TransformerLens run_with_cache (every hook); an nnsight trace saving 9
  values per block (+ embedding, ln_f, logits).

Conventions (`conventions_rows`, agreement only, nothing timed): on freshly initialised weights every
LayerNorm has weight 1 and bias 0, which hides how each tool treats the norms. So the direct effects
are compared again on a copy whose LayerNorm weights and biases are perturbed (weight 1 + 0.5 N(0, 1),
bias 0.2 N(0, 1)): tdb (and the nnsight idiom) freeze the final LayerNorm at the target position and
keep its weight; TransformerLens's default bridge projects on the raw W_U columns (the final
LayerNorm's weight is dropped); `enable_compatibility_mode(fold_ln=True)` folds it into W_U and agrees;
its full default processing also folds value biases (including the ln_1 bias folded into them) into
b_O, so per-head effects leave them out. BOS: TransformerLens prepends BOS to a text prompt by default
(`to_tokens`), tdb only when asked (`prepend_bos=True`); with it, ids and logits agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_sweeps import A, B, save_random_gpt2  # noqa: E402
from benchmarks.common import interleaved, report  # noqa: E402
from benchmarks.measures import plain_forward, session_run  # noqa: E402
from tdb_server.analyses import TargetSpec, resolve_target  # noqa: E402
from tdb_server.analyses.lens import logit_lens  # noqa: E402
from tdb_server.analyses.node_table import HEAD, NEURON, TargetObjective, compute_node_table  # noqa: E402
from tdb_server.engine.manager import SessionManager  # noqa: E402
from tdb_server.model import load_model  # noqa: E402

INSTALL = "pip install -c constraints.txt -e '.[bench]'"
TOP_K = 5


@dataclass
class Entry:
    fn: Callable[[], object] | None      # None: the peer is missing (note says why)
    note: str = ""


@dataclass
class Bench:
    adapter: object
    ids: list[int]
    target: object
    client: object                       # TdbClient on a loopback server over `adapter`
    tl: object | None                    # TransformerBridge
    nns: object | None                   # nnsight TransformersModel
    missing: dict[str, str]           # peer -> why it has no rows

    @property
    def x(self) -> torch.Tensor:
        return torch.tensor([self.ids])


# --- loading the peers --------------------------------------------------------------------------

def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"
    return f"transformers {v('transformers')}, transformer-lens {v('transformer-lens')}, nnsight {v('nnsight')}"


def _load(what: str, load: Callable[[], object]) -> tuple[object | None, str]:
    try:
        return load(), ""
    except ImportError as e:
        return None, f"{what} not installed ({e}): {INSTALL}"
    except Exception as e:  # noqa: BLE001 - a peer that cannot load is a finding, not a crash
        return None, f"{what} failed to load: {type(e).__name__}: {e}"


def load_tl(path: Path, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(path), device="cpu", tokenizer=tokenizer)


def load_nnsight(path: Path):
    from nnsight import TransformersModel

    return TransformersModel(str(path), task="text-generation", dispatch=True)


# --- agreement helpers --------------------------------------------------------------------------

def dense_direct(ids: np.ndarray, metrics: np.ndarray, node_type: int, pos: int, shape: tuple[int, int]) -> np.ndarray:
    """The direct effects of one node type at query position `pos` as [layer, index] (NaN where absent)."""
    out = np.full(shape, np.nan, dtype=np.float64)
    sel = (ids[:, 0] == node_type) & (ids[:, 3] == pos)
    out[ids[sel, 1], ids[sel, 2]] = metrics[sel, 2]
    return out


def max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = ~(np.isnan(a) | np.isnan(b))
    return float(np.abs(a[ok] - b[ok]).max()) if ok.any() else float("nan")


def _mib(tensors) -> str:
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    return f"{len(ts)} tensors, {sum(t.numel() * t.element_size() for t in ts) / 2**20:.1f} MiB"


# --- node table ---------------------------------------------------------------------------------

def tl_direct_attribution(tl, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TransformerLens's idiom: direct logit attribution of every head and neuron at the last position."""
    with torch.no_grad():
        _, cache = tl.run_with_cache(x)
        tok, bad = torch.tensor([A]), torch.tensor([B])
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)
        neurons = cache.stack_neuron_results(layer=-1, pos_slice=-1)
        return (cache.logit_attrs(heads, tokens=tok, incorrect_tokens=bad, pos_slice=-1).flatten(),
                cache.logit_attrs(neurons, tokens=tok, incorrect_tokens=bad, pos_slice=-1).flatten())


def nnsight_direct_attribution(m, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same direct logit attribution written by hand with nnsight (it has no helper for it): save
    each block's merged head outputs (c_proj's input), MLP activations and the final residual; outside
    the trace, write each head / neuron through its output weights, apply the final LayerNorm as frozen
    at the last position (centre, divide by its scale, times its weight) and project on W_U[A] - W_U[B]."""
    import nnsight

    with torch.no_grad():
        with m.trace(x):                                  # modules in the order they run, as nnsight needs
            t = m.transformer
            z, act = nnsight.save([]), nnsight.save([])
            for block in t.h:
                z.append(block.attn.c_proj.input[0, -1])                                 # [D]
                act.append(block.mlp.act.output[0, -1])                                 # [d_mlp]
            resid = nnsight.save(t.ln_f.input[0, -1])                                   # [D]
        ln_f, unembed = m.transformer.ln_f, m.lm_head.weight                          # the real modules
        scale = (resid - resid.mean()).pow(2).mean().add(ln_f.eps).sqrt()
        direction = unembed[A] - unembed[B]

        def direct(writes: torch.Tensor) -> torch.Tensor:                           # [n, D] -> [n]
            return ((writes - writes.mean(-1, keepdim=True)) / scale * ln_f.weight) @ direction

        heads, neurons = [], []
        for block, zl, al in zip(m.transformer.h, z, act):
            W_O = block.attn.c_proj.weight                                          # [H * Dh, D] (Conv1D)
            H = block.attn.num_heads
            heads.append(direct(torch.einsum("hd,hdm->hm", zl.view(H, -1), W_O.view(H, -1, W_O.shape[-1]))))
            neurons.append(direct(al[:, None] * block.mlp.c_proj.weight))           # [d_mlp, D]
    return torch.cat(heads), torch.cat(neurons)


def node_table_entries(b: Bench) -> dict[str, Entry]:
    from tdb_client import Target

    info, p = b.adapter.info, b.target.position
    types = {HEAD, NEURON}
    ours = compute_node_table(b.adapter, b.ids, TargetObjective(b.target), node_types=types)
    ids, mets = ours.table.ids.numpy(), ours.table.metrics.numpy()
    heads = dense_direct(ids, mets, HEAD, p, (info.n_layers, info.n_heads))
    neurons = dense_direct(ids, mets, NEURON, p, (info.n_layers, info.d_mlp))
    at_p = compute_node_table(b.adapter, b.ids, TargetObjective(b.target), node_types=types,
                              target_position_only=True, direct_only=True)
    cheap = max(max_diff(dense_direct(at_p.table.ids.numpy(), at_p.table.metrics.numpy(), HEAD, p, heads.shape), heads),
                max_diff(dense_direct(at_p.table.ids.numpy(), at_p.table.metrics.numpy(), NEURON, p, neurons.shape),
                         neurons))
    entries = {
        "tdb in-process: compute_node_table, heads + neurons, direct effect at the target position": Entry(
            lambda: compute_node_table(b.adapter, b.ids, TargetObjective(b.target), node_types=types,
                                       target_position_only=True, direct_only=True),
            f"{len(at_p.table.ids)} rows (what the peers compute); max |this - full table| {cheap:.1e}"),
        "tdb in-process: the same + total effects (one backward)": Entry(
            lambda: compute_node_table(b.adapter, b.ids, TargetObjective(b.target), node_types=types,
                                       target_position_only=True), "activation x gradient at the target position"),
        "tdb in-process: the full table, every position, direct + total effect (the dashboard's)": Entry(
            lambda: compute_node_table(b.adapter, b.ids, TargetObjective(b.target), node_types=types),
            f"{len(ids)} rows, all positions; direct effects sum to the target: "
            f"|sum - value| {abs(ours.direct_effect_sum - ours.value):.1e}")}

    def wire():
        return b.client.node_table(b.ids, Target([A], [B]), node_types=["head", "neuron"], top_k=20,
                                   target_position_only=True, direct_only=True)
    got = wire()
    sent = np.concatenate([got.top.ids, got.bottom.ids]), np.concatenate([got.top.metrics, got.bottom.metrics])
    wire_diff = max(max_diff(dense_direct(*sent, HEAD, p, heads.shape), heads),
                    max_diff(dense_direct(*sent, NEURON, p, neurons.shape), neurons))
    entries["tdb over gRPC: NodeTable, heads + neurons, direct at the target (top/bottom 20 sent back)"] = Entry(
        wire, f"max |wire - in-process| {wire_diff:.1e}")

    label = "TransformerLens: run_with_cache + stack_head/neuron_results + logit_attrs (direct effect only)"
    if b.tl is None:
        entries[label] = Entry(None, b.missing["TransformerLens"])
    else:
        tl_heads, tl_neurons = tl_direct_attribution(b.tl, b.x)
        d_heads = max_diff(tl_heads.reshape(heads.shape), heads)
        d_neurons = max_diff(tl_neurons.reshape(neurons.shape), neurons)
        entries[label] = Entry(lambda: tl_direct_attribution(b.tl, b.x),
                               f"max |TL - tdb| direct effect: heads {d_heads:.1e}, neurons {d_neurons:.1e} "
                               f"(largest head {float(np.nanmax(np.abs(heads))):.2e})")
    label = "nnsight: trace saving head outputs, activations, final residual + DLA by hand (direct effect only)"
    if b.nns is None:
        entries[label] = Entry(None, b.missing["nnsight"])
    else:
        nn_heads, nn_neurons = nnsight_direct_attribution(b.nns, b.x)
        entries[label] = Entry(lambda: nnsight_direct_attribution(b.nns, b.x),
                               f"max |nnsight - tdb| direct effect: heads "
                               f"{max_diff(nn_heads.reshape(heads.shape), heads):.1e}, neurons "
                               f"{max_diff(nn_neurons.reshape(neurons.shape), neurons):.1e}")
    return entries


# --- logit lens ---------------------------------------------------------------------------------

def tl_lens(tl, x: torch.Tensor) -> torch.Tensor:
    """[sites, T, k] top logits via TransformerLens's one-call logit lens (every position)."""
    from transformer_lens.tools.analysis.logit_lens import logit_lens as lens

    with torch.no_grad():
        values = lens(tl, x, positions=None, top_k=TOP_K).values      # [sites, batch, T, k]
    return values[:, 0]


def nnsight_lens(m, x: torch.Tensor) -> torch.Tensor:
    """[sites, T, k] top logits, nnsight's logit-lens idiom: lm_head(ln_f(output)) of every block."""
    import nnsight

    with torch.no_grad(), m.trace(x):
        t = m.transformer
        logits = nnsight.save([m.lm_head(t.ln_f(t.drop.output))])
        for block in t.h:
            logits.append(m.lm_head(t.ln_f(block.output)))
    return torch.stack(logits)[:, 0].topk(TOP_K, dim=-1).values


def lens_entries(b: Bench) -> dict[str, Entry]:
    def ours():
        return logit_lens(b.adapter, b.ids, [], [], TOP_K)
    ref = ours().top_logits
    n_sites = ref.shape[0]
    entries = {f"tdb in-process: logit_lens, {n_sites} sites x {len(b.ids)} positions, top {TOP_K}": Entry(
        ours, "embed + every resid_post")}

    def wire():
        return b.client.logit_lens(b.ids, top_k=TOP_K)
    entries["tdb over gRPC: LogitLens"] = Entry(
        wire, f"max |wire - in-process| {max_diff(wire().top_logits, ref):.1e}")
    for name, model, lens, label in (
            ("TransformerLens", b.tl, tl_lens, "TransformerLens: tools.analysis.logit_lens(positions=None, top_k=5)"),
            ("nnsight", b.nns, nnsight_lens, "nnsight: trace, lm_head(ln_f(block.output)) per block, top 5")):
        if model is None:
            entries[label] = Entry(None, b.missing[name])
            continue
        got = lens(model, b.x)
        entries[label] = Entry(lambda lens=lens, model=model: lens(model, b.x),
                               f"max |{name} - tdb| top-{TOP_K} logits {max_diff(got, ref):.1e} (logits span "
                               f"{float(ref.abs().max()):.1f})")
    return entries


# --- cache every activation ---------------------------------------------------------------------

def nnsight_cache(m, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Save what nnsight reaches of every block (module inputs/outputs, in execution order)."""
    import nnsight

    with torch.no_grad(), m.trace(x):
        t = m.transformer
        saved = nnsight.save({"embed": t.drop.output})
        for i, block in enumerate(t.h):
            saved[f"{i}.ln_1"] = block.ln_1.output
            saved[f"{i}.qkv"] = block.attn.c_attn.output
            saved[f"{i}.z"] = block.attn.c_proj.input
            saved[f"{i}.attn_out"] = block.attn.output[0]
            saved[f"{i}.ln_2"] = block.ln_2.output
            saved[f"{i}.mlp_pre"] = block.mlp.c_fc.output
            saved[f"{i}.mlp_post"] = block.mlp.act.output
            saved[f"{i}.mlp_out"] = block.mlp.output
            saved[f"{i}.resid_post"] = block.output
        saved["ln_f"] = t.ln_f.output
        saved["logits"] = m.lm_head.output
    return saved


def read_back_entries(wire_session, ids: list[int], captured: dict[str, torch.Tensor]) -> dict[str, Entry]:
    """Launch capturing every site, then the whole cache read back: one ReadTensor per site (before
    protocol 1.2) or one ReadTensors (`read_cache`), through shared memory or streamed over gRPC. Each is
    checked against the in-process capture first (the same sites, bit for bit)."""
    entries = {}
    for shared in (True, False):
        how = "shared memory" if shared else "streamed"

        def per_site(shared=shared):
            wire_session.launch(token_ids=[ids])
            return {name: wire_session.read(name, shared_memory=shared) for name in captured}

        def one_request(shared=shared):
            wire_session.launch(token_ids=[ids])
            return wire_session.read_cache(shared_memory=shared)

        for label, fn in ((f"tdb over gRPC: Launch + read back one site at a time (ReadTensor, {how})", per_site),
                          (f"tdb over gRPC: Launch + read back in one request (ReadTensors, {how})", one_request)):
            got = fn()
            assert set(got) == set(captured), "the read-back cache names other sites than the capture"
            worst = max(max_diff(got[k], v) for k, v in captured.items())
            entries[label] = Entry(fn, f"{len(got)} tensors; max |read back - in-process| {worst:.1e}")
    return entries


def cache_entries(b: Bench, session, wire_session, read_back: bool = False) -> dict[str, Entry]:
    """The cache-everything rows; `read_back`: with the whole cache read back over gRPC (read_back_entries)."""
    L = b.adapter.info.n_layers
    run = session_run(session, b.ids, [])
    r = run()
    ref = torch.stack([r.captured[f"blocks.{i}.resid_post"][0] for i in range(L)])   # [L, T, D]
    entries = {"tdb in-process: a session run capturing every site": Entry(run, _mib(r.captured.values()))}

    def wire():
        return wire_session.launch(token_ids=[b.ids])
    wire()
    last = wire_session.read(f"blocks.{L - 1}.resid_post")[0]
    entries["tdb over gRPC: Launch capturing every site (not read back)"] = Entry(
        wire, f"max |wire - in-process| resid_post {max_diff(last, ref[-1]):.1e}")
    if read_back:
        entries.update(read_back_entries(wire_session, b.ids, r.captured))
    if b.tl is None:
        entries["TransformerLens: run_with_cache"] = Entry(None, b.missing["TransformerLens"])
    else:
        def tl_cache():
            with torch.no_grad():
                return b.tl.run_with_cache(b.x)[1]
        cache = tl_cache()
        got = torch.stack([cache[f"blocks.{i}.hook_resid_post"][0] for i in range(L)])
        entries["TransformerLens: run_with_cache"] = Entry(
            tl_cache, f"{_mib(cache.values())}; max |TL - tdb| resid_post {max_diff(got, ref):.1e}")
    label = "nnsight: trace saving 9 module values per block"
    if b.nns is None:
        entries[label] = Entry(None, b.missing["nnsight"])
    else:
        saved = nnsight_cache(b.nns, b.x)
        got = torch.stack([saved[f"{i}.resid_post"][0] for i in range(L)])
        entries[label] = Entry(lambda: nnsight_cache(b.nns, b.x),
                               f"{_mib(saved.values())}; max |nnsight - tdb| resid_post {max_diff(got, ref):.1e}")
    return entries


# --- conventions on perturbed norms --------------------------------------------------------------

def perturb_norms(src: Path, dst: Path, seed: int = 3) -> None:
    """Save a copy of the GPT-2 at `src` to `dst` with every LayerNorm weight 1 + 0.5 N(0, 1) and bias
    0.2 N(0, 1) (trained norms are far from the identity; fresh ones are exactly it)."""
    import shutil

    from transformers import GPT2LMHeadModel

    shutil.copytree(src, dst)
    model = GPT2LMHeadModel.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=gen))
    model.save_pretrained(dst)


def conventions_rows(model_dir: str, tokens: int) -> list[dict]:
    """Direct effects of every head and neuron at the target position on perturbed norms, by each tool
    and convention, against tdb's; and BOS handling. One row per comparison (agreement, no timing)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "perturbed"
        perturb_norms(Path(model_dir), path)
        adapter = load_model(str(path), device="cpu", dtype="float32")
        ids = torch.randint(100, 50000, (tokens,), generator=torch.Generator().manual_seed(1)).tolist()
        target, ids = resolve_target(adapter, TargetSpec(token_ids=(A,), distractor_ids=(B,)), ids)
        info, p, x = adapter.info, target.position, torch.tensor([ids])
        table = compute_node_table(adapter, ids, TargetObjective(target), node_types={HEAD, NEURON},
                                   target_position_only=True, direct_only=True).table
        heads = dense_direct(table.ids.numpy(), table.metrics.numpy(), HEAD, p, (info.n_layers, info.n_heads))
        neurons = dense_direct(table.ids.numpy(), table.metrics.numpy(), NEURON, p, (info.n_layers, info.d_mlp))
        scale = f"largest |head effect| {float(np.nanmax(np.abs(heads))):.2e}"

        def row(what: str, got: tuple[torch.Tensor, torch.Tensor] | None, why: str) -> dict:
            if got is None:
                return {"id": "P7", "what": f"conventions, perturbed norms: {what}", "value": None, "note": why}
            d = max(max_diff(got[0].reshape(heads.shape), heads), max_diff(got[1].reshape(neurons.shape), neurons))
            return {"id": "P7", "what": f"conventions, perturbed norms: {what}", "value": d, "unit": "max |Δ| vs tdb",
                    "note": f"{why}; {scale}"}

        rows.append({"id": "P7", "what": "conventions, perturbed norms: tdb node table, direct effect at the target",
                     "value": None, "note": "final LayerNorm frozen at the target position, its weight kept; "
                                            "value biases belong to their heads"})
        tl, why_tl = _load("TransformerLens", lambda: load_tl(path, adapter.tokenizer))
        variants = (("TransformerLens default bridge, logit_attrs", {},
                     "projects on raw W_U columns: the final LayerNorm's weight is dropped"),
                    ("TransformerLens enable_compatibility_mode(fold_ln only)",
                     {"fold_value_biases": False, "center_writing_weights": False, "center_unembed": False},
                     "the final LayerNorm's weight folded into W_U: tdb's convention"),
                    ("TransformerLens enable_compatibility_mode() (its defaults)", {"_all": True},
                     "also folds value biases (with the ln_1 bias folded into them) into b_O: heads leave them out"))
        for what, kwargs, why in variants:
            if tl is None:
                rows.append(row(what, None, why_tl))
                continue
            model = tl if not kwargs else load_tl(path, adapter.tokenizer)
            if kwargs:
                model.enable_compatibility_mode(disable_warnings=True,
                                                **{k: v for k, v in kwargs.items() if k != "_all"})
            rows.append(row(what, tl_direct_attribution(model, x), why))
        nns, why_nns = _load("nnsight", lambda: load_nnsight(path))
        rows.append(row("nnsight idiom (DLA by hand, frozen final LayerNorm with its weight)",
                        None if nns is None else nnsight_direct_attribution(nns, x), why_nns or "tdb's convention"))
        if tl is not None:
            prompt = " ".join(adapter.tokenizer.convert_ids_to_tokens(ids[:12]))
            from tdb_server.model.tokens import Prompt, encode

            ours = encode(adapter, Prompt(text=prompt, prepend_bos=True))
            theirs = tl.to_tokens(prompt)[0].tolist()
            with torch.no_grad():
                d = (adapter.model(input_ids=torch.tensor([ours])).logits - tl(torch.tensor([theirs]))).abs().max()
            rows.append({"id": "P7", "what": "conventions: BOS — TransformerLens to_tokens(text) vs tdb prepend_bos=True",
                         "value": float(d), "unit": "max |Δ logits|",
                         "note": f"TL prepends BOS by default (default_prepend_bos={tl.cfg.default_prepend_bos}); "
                                 f"tdb only when asked; same ids with it: {ours == theirs}"})
    return rows


# --- timing -------------------------------------------------------------------------------------

def timed_rows(task: str, entries: dict[str, Entry], plain: Callable[[], object], repeat: int) -> list[dict]:
    """Time the present entries interleaved with a plain forward; one row each (missing peers too)."""
    fns = {"plain": plain, **{k: e.fn for k, e in entries.items() if e.fn is not None}}
    t = interleaved(fns, repeat)
    tdb = next(iter(entries))
    rows = []
    for label, e in entries.items():
        if e.fn is None:
            rows.append({"id": "P7", "what": f"{task}: {label}", "value": None, "unit": "", "note": e.note})
            continue
        vs = (f"{t[label] / t[tdb]:.2f}× tdb in-process; " if label != tdb
              else f"plain forward alongside {t['plain'] * 1e3:.0f} ms; ")
        rows.append({"id": "P7", "what": f"{task}: {label}", "value": t[label] * 1e3, "unit": "ms",
                     "ratio": t[label] / t["plain"], "note": vs + e.note})
    return rows


def run(model_dir: str, tokens: int, repeat: int) -> list[dict]:
    """P7's rows on the random GPT-2-small saved in `model_dir` (see bench_sweeps.save_random_gpt2)."""
    from tdb_client import TdbClient
    from tdb_server.server import create_server

    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # everything is local: never download
    path = Path(model_dir)
    adapter = load_model(str(path), device="cpu", dtype="float32")
    tl, why_tl = _load("TransformerLens", lambda: load_tl(path, adapter.tokenizer))
    nns, why_nns = _load("nnsight", lambda: load_nnsight(path))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 50000, (tokens,), generator=gen).tolist()
    target, ids = resolve_target(adapter, TargetSpec(token_ids=(A,), distractor_ids=(B,)), ids)
    plain = plain_forward(adapter, ids)
    handle, port = create_server("127.0.0.1:0", adapter)
    mgr = SessionManager(adapter)
    try:
        with TdbClient(f"127.0.0.1:{port}", timeout=600) as client, client.session() as wire_session:
            b = Bench(adapter, ids, target, client, tl, nns, {"TransformerLens": why_tl, "nnsight": why_nns})
            rows = [{"id": "P7", "what": f"GPT-2-small, random weights, {len(ids)} tokens, CPU fp32; ratio = ÷ a "
                                         "plain HF forward timed alongside", "value": None, "note": versions()}]
            rows += timed_rows("node table", node_table_entries(b), plain, repeat)
            rows += timed_rows("logit lens", lens_entries(b), plain, repeat)
            rows += timed_rows("cache everything", cache_entries(b, mgr.create(), wire_session, read_back=True), plain,
                               repeat)
    finally:
        mgr.shutdown()
        handle.stop(grace=None)
    return rows + conventions_rows(model_dir, tokens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model-dir", default="", help="a random GPT-2 saved by save_random_gpt2 (default: a new one)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(Path(tmp) / "gpt2-small-random")
        if not args.model_dir:
            save_random_gpt2(Path(model_dir), seed=0)
        rows = run(model_dir, args.tokens, args.repeat)
    report(f"torch {torch.__version__}, {torch.get_num_threads()} threads", rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
