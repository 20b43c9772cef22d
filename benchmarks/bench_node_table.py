#!/usr/bin/env python3
"""Node-table cost vs one plain forward (target: at most 3x), on the bundled model by default.

    python benchmarks/bench_node_table.py                       # bundled model, its demo prompt
    python benchmarks/bench_node_table.py --model random-gpt2 --tokens 128 --device cuda

Rows: plain forward (no hooks, no grad), forward + backward (plain autograd through the model), the
node table's direct effects at the target position (no backward), the same with total effects, the
node table without token pairs, and the full node table (token pairs too); each the median of
`--repeat` runs after a warm-up, and its ratio to the plain forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdb_server.analyses import TargetSpec, resolve_target  # noqa: E402
from tdb_server.analyses.node_table import HEAD_PAIR, NODE_TYPES, TargetObjective, compute_node_table  # noqa: E402
from tdb_server.model import build_random_model, load_model  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeat: int, device: str) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a model directory, a bundled model's name, or random-gpt2 / "
                                               "random-llama (GPT-2-small / 1B-Llama-like shapes)")
    p.add_argument("--tokens", type=int, default=0, help="prompt length in tokens (default: the demo prompt)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = None
    if args.model.startswith("random-"):
        family = args.model.removeprefix("random-")
        cfg = (dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257) if family == "gpt2" else
               dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                    num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000))
        adapter = build_random_model(family, device=args.device, dtype=args.dtype, **cfg)
    else:
        from tdb_server.paths import resolve_model

        path = resolve_model(args.model or None)
        adapter = load_model(path, device=args.device, dtype=args.dtype)
        gt = Path(path) / "ground_truth.json"
        if gt.is_file():
            prompt = json.loads(gt.read_text())["demo"]["prompt"]
    V = adapter.info.vocab_size
    if args.tokens or prompt is None or adapter.tokenizer is None:
        n = args.tokens or 64
        ids = (torch.arange(n) * 7919 % V).tolist()
    else:
        ids = adapter.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target, ids = resolve_target(adapter, TargetSpec(token_ids=(1,), distractor_ids=(2,)), ids)
    x = torch.tensor([ids])

    def forward():
        adapter.forward(x)

    def forward_backward():
        emb = adapter.model.get_input_embeddings()(x.to(adapter.model.device)).detach().requires_grad_(True)
        logits = adapter.model(inputs_embeds=emb, use_cache=False).logits
        (logits[0, -1, 1] - logits[0, -1, 2]).backward()

    no_pairs = set(NODE_TYPES.values()) - {HEAD_PAIR}
    objective = TargetObjective(target)
    rows = [("plain forward", timed(forward, args.repeat, args.device)),
            ("plain forward + backward", timed(forward_backward, args.repeat, args.device)),
            ("direct effects at the target", timed(lambda: compute_node_table(
                adapter, ids, objective, node_types=no_pairs, target_position_only=True, direct_only=True),
                args.repeat, args.device)),
            ("direct + total at the target", timed(lambda: compute_node_table(
                adapter, ids, objective, node_types=no_pairs, target_position_only=True), args.repeat, args.device)),
            ("node table, no token pairs", timed(lambda: compute_node_table(adapter, ids, TargetObjective(target),
                                                                            node_types=no_pairs),
                                                 args.repeat, args.device)),
            ("node table, all node types", timed(lambda: compute_node_table(adapter, ids, TargetObjective(target)),
                                                 args.repeat, args.device))]
    n_rows = len(compute_node_table(adapter, ids, TargetObjective(target)).table.ids)
    info = adapter.info
    print(f"model {info.name} ({info.architecture}, {info.n_layers} layers, d_model {info.d_model}, "
          f"{info.dtype}, {info.device}), {len(ids)} tokens, {n_rows} rows, torch threads {torch.get_num_threads()}")
    base = rows[0][1]
    print(f"| {'':28} | {'median ms':>10} | {'x forward':>9} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 11}|")
    for name, t in rows:
        print(f"| {name:28} | {t * 1000:10.2f} | {t / base:9.2f} |")
    worst = max(t for name, t in rows if name.startswith("node table")) / base
    print(f"node table / forward: {worst:.2f}x ({'within' if worst <= 3 else 'OVER'} the 3x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
