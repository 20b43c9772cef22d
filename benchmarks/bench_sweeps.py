#!/usr/bin/env python3
"""Patching sweeps side by side with TransformerLens, on the same weights and prompts, in one run.

    pip install -c constraints.txt transformer-lens      # the `bench` extra; never a runtime dependency
    python benchmarks/bench_sweeps.py                     # GPT-2-small shape, 20 tokens, CPU
    python benchmarks/bench_sweeps.py --tokens 32 --verify 20 --top 10

A random-weight GPT-2-small-shaped model is saved (safetensors + a word-level tokenizer) to a
temporary directory; tdb loads it with `load_model`, TransformerLens 4.x with
`TransformerBridge.boot_transformers(path)` (which forces eager attention). Rows:

* one plain HF forward (sdpa), and one TransformerBridge forward;
* TransformerLens `patching.get_act_patch_attn_head_out_all_pos` (one forward per head, serially)
  plus the `run_with_cache` of the clean prompt it needs;
* tdb's exact head sweep (batched, resumed at the patched layer, target row only), in-process and
  over gRPC;
* tdb attribution patching (2 forwards + 1 backward) + exact verification of the `--verify` largest
  estimates; recall = how many of the exhaustive exact top `--top` (by |effect|) the verified top
  `--top` contains, and the rank correlation of estimates and exact effects over all heads.

Numbers are compared (max |tdb - TransformerLens| over all heads, and between our paths). The forwards
are the median of 5 interleaved runs, tdb's in-process sweeps the median of 3 after a warm-up, the
TransformerLens sweep and the gRPC sweep one run each (the former takes a minute); the machine may be
noisy, so read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdb_server.analyses import TargetSpec, resolve_target  # noqa: E402
from tdb_server.analyses.sweeps import SweepSpec, attribution_patching, patch_sweep, spearman  # noqa: E402
from tdb_server.model import load_model  # noqa: E402
from benchmarks.common import interleaved, now, use_clock  # noqa: E402

A, B = 1000, 2000   # target token, distractor


def save_random_gpt2(path: Path, seed: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t0", unk_token="t0").save_pretrained(path)


def once(fn):
    t0 = now()
    out = fn()
    return now() - t0, out


def median_run(fn, repeat: int = 3):
    """(median seconds of `repeat` runs after a warm-up, the last output)."""
    fn()
    runs = [once(fn) for _ in range(repeat)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def sweep_prompts(tokens: int, seed: int = 0, vocab: int = 50000) -> tuple[list[int], list[int]]:
    """(clean, corrupted) token ids: a repeated random sequence (induction-shaped), and the same with every
    third token of its second half replaced; ids in [100, vocab)."""
    gen = torch.Generator().manual_seed(seed + 1)
    half = torch.randint(100, vocab, (tokens // 2,), generator=gen).tolist()
    clean = (half * 2 + half)[:tokens]                      # a repeated sequence: induction-shaped
    corrupted = list(clean)
    for i in range(tokens // 2, tokens, 3):                 # corrupt the second copy's tokens
        corrupted[i] = int(torch.randint(100, vocab, (1,), generator=gen))
    return clean, corrupted


def recompute_bound(n_layers: int, n_heads: int) -> float:
    """Forwards' worth of blocks a head sweep runs if each patch recomputes only the blocks from its layer
    on (n_heads patches at layer L run n_layers - L blocks), plus the clean and corrupted runs."""
    return n_heads * sum(n_layers - layer for layer in range(n_layers)) / n_layers + 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--verify", type=int, default=20, help="attribution candidates verified exactly")
    p.add_argument("--top", type=int, default=10, help="recall of the exhaustive top-k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (steadier on a loaded machine; with --threads 1)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--model-dir", default="", help="a random GPT-2 saved by save_random_gpt2 (default: a new one)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_clock(args.clock)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # everything is local: never download
    try:
        from transformer_lens import patching
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        print("TransformerLens is not installed: pip install -c constraints.txt transformer-lens", file=sys.stderr)
        return 2

    clean, corrupted = sweep_prompts(args.tokens, args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model_dir or Path(tmp) / "gpt2-small-random")
        if not args.model_dir:
            save_random_gpt2(path, args.seed)
        adapter = load_model(str(path), device="cpu", dtype="float32")
        bridge = TransformerBridge.boot_transformers(str(path), device="cpu",
                                                     tokenizer=adapter.tokenizer)
    target, _ = resolve_target(adapter, TargetSpec(token_ids=(A,), distractor_ids=(B,)), clean)
    ids_c, ids_x = torch.tensor([clean]), torch.tensor([corrupted])

    rows: list[tuple[str, float, str, str]] = []      # (what, seconds, note, target)
    with torch.no_grad():
        fwd = interleaved({"hf": lambda: adapter.model(input_ids=ids_c, use_cache=False),
                           "tl": lambda: bridge(ids_c)}, repeat=5)
    t_fwd, t_tl_fwd = fwd["hf"], fwd["tl"]
    rows += [("plain HF forward (sdpa)", t_fwd, "", ""),
             ("TransformerLens TransformerBridge forward", t_tl_fwd, "", "")]

    def metric(logits):
        return logits[0, -1, A] - logits[0, -1, B]

    def tl_sweep():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids_c)
            return patching.get_act_patch_attn_head_out_all_pos(bridge, ids_x, cache, metric)
    t_tl, tl = once(tl_sweep)
    tl = (tl if isinstance(tl, torch.Tensor) else tl.values).float().reshape(12, 12)
    rows.append(("TransformerLens get_act_patch_attn_head_out_all_pos (144 heads)", t_tl, "reference", ""))

    t_ours, ours = median_run(lambda: patch_sweep(adapter, clean, corrupted, target, SweepSpec("head_out")))
    diff_tl = float((ours.values - tl).abs().max())
    spread = float(ours.values.max() - ours.values.min())
    bound = recompute_bound(adapter.info.n_layers, adapter.info.n_heads)
    rows.append(("tdb exact head sweep (batched, resumed, target row only)", t_ours,
                 f"max |tdb - TL| = {diff_tl:.2e} (values span {spread:.2e}); the lower bound of recomputing the "
                 f"layers after each patch at batch 1 is {bound:.0f} forwards", "TL ÷ this >= 5 at 128 tokens"))

    from tdb_client import Target, TdbClient
    from tdb_server.server import create_server

    handle, port = create_server("127.0.0.1:0", adapter)
    try:
        with TdbClient(f"127.0.0.1:{port}", timeout=600) as client:
            client.patch_sweep(clean[:4], corrupted[:4], Target([A], [B]), kind="head_out", layers=[11])  # warm-up
            t_wire, wired = once(lambda: client.patch_sweep(clean, corrupted, Target([A], [B]), kind="head_out"))
    finally:
        handle.stop(grace=None)
    rows.append(("tdb exact head sweep over gRPC (streamed)", t_wire,
                 f"max |wire - in-process| = {float(abs(wired.values - ours.values.numpy()).max()):.1e}", ""))

    t_atp, atp = median_run(lambda: attribution_patching(adapter, clean, corrupted, target,
                                                         SweepSpec("head_out", verify_top_k=args.verify)))
    effect = (ours.values - ours.corrupted_value).flatten()
    exact_top = set(torch.topk(effect.abs(), args.top).indices.tolist())
    verified = (~torch.isnan(atp.values)).flatten()
    v_effect = torch.where(verified, (atp.values - atp.corrupted_value).flatten().abs(), torch.tensor(-1.0))
    found_top = set(torch.topk(v_effect, args.top).indices.tolist())
    recall = len(exact_top & found_top) / args.top
    rho_all = spearman((atp.approx_values - atp.corrupted_value).flatten(), effect)
    v_diff = float((atp.values.flatten()[verified] - ours.values.flatten()[verified]).abs().max())
    rows.append((f"tdb attribution patching + exact verification of top {args.verify}", t_atp,
                 f"recall@{args.top} = {recall:.2f}; Spearman(est, exact) all heads {rho_all:.3f}, "
                 f"verified {atp.summary.spearman:.3f}; verified vs exhaustive {v_diff:.1e}",
                 "TL ÷ this >= 10, same top-k"))

    print(f"\nGPT-2-small-shaped random weights, {args.tokens} tokens, CPU fp32, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}\n")
    print(f"| {'':<66} | {'time':>9} | {'÷ HF fwd':>8} | {'TL ÷ this':>9} | notes |")
    print(f"|{'-' * 68}|{'-' * 11}|{'-' * 10}|{'-' * 11}|-------|")
    for name, t, note, _ in rows:
        print(f"| {name:<66} | {t * 1000:7.0f} ms | {t / t_fwd:8.1f} | {t_tl / t:9.1f} | {note} |")
    ok = diff_tl <= 1e-3 * max(spread, 1e-3) + 1e-4
    if args.json:
        out = [{"what": f"{name}, {args.tokens} tokens", "value": t * 1e3, "unit": "ms", "ratio": t / t_fwd, "target": target,
                "note": f"TL ÷ this {t_tl / t:.1f}×" + (f"; {note}" if note else "")}
               for name, t, note, target in rows]
        Path(args.json).write_text(json.dumps({"rows": out, "recall": recall, "diff_tl": diff_tl, "agree": ok},
                                              indent=1))
    print(f"\nnumbers agree with TransformerLens: {ok}; exact speed-up {t_tl / t_ours:.1f}x (target 3x); "
          f"attribution + verification {t_tl / t_atp:.1f}x (target 10x), recall@{args.top} {recall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
