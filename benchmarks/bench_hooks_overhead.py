"""Overhead of tdb's model layer on a forward pass: plain HF vs the adapter with no handler
(the attention wrapper is a pass-through, zero hooks) vs capturing sites.

A randomly initialised GPT-2-small-shaped model (12 blocks, d=768, 12 heads, vocab 50257) by default.
Modes run interleaved, one forward each per repeat, so drift hits them alike; the table shows the
median and the ratio to plain HF.

    python benchmarks/bench_hooks_overhead.py [--batch 1] [--seq 128] [--repeats 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdb_server.model import build_random_model  # noqa: E402
from tdb_server.model.hooks import install_attention_wrapper  # noqa: E402


class Keep:
    """Keeps a reference to every value it is shown (what a capture costs without copies)."""

    def __init__(self, sites):
        self.sites = frozenset(sites)
        self.values = {}

    def on_site(self, site, value):
        self.values[site] = value
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    adapter = build_random_model("gpt2", n_layer=args.layers, n_embd=768, n_head=12, vocab_size=50257,
                                 n_positions=1024, device=args.device)
    model, info = adapter.model, adapter.info
    ids = torch.randint(0, info.vocab_size, (args.batch, args.seq), device=args.device)
    no_pattern = [s for s in info.sites if not s.endswith("attn.pattern")]
    modes = {
        "plain HF (sdpa)": None,
        "adapter, no handler": lambda: adapter.forward(ids),
        "adapter, all sites except pattern": lambda: adapter.forward(ids, Keep(no_pattern)),
        "adapter, all sites": lambda: adapter.forward(ids, Keep(info.sites)),
    }

    def plain():
        model.set_attn_implementation(info.attn_implementation)
        try:
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).logits
        finally:
            install_attention_wrapper(model)

    modes["plain HF (sdpa)"] = plain

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for fn in modes.values():  # warm-up
        fn()
    times = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    assert adapter.installed_hook_count() == 0

    base = statistics.median(times["plain HF (sdpa)"])
    print(f"GPT-2-small-shaped random model, {info.n_layers} blocks, batch {args.batch}, seq {args.seq}, "
          f"{args.device}, torch {torch.__version__}, {args.repeats} repeats")
    print(f"{'mode':<36} {'median ms':>10} {'min ms':>8} {'x plain':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<36} {med * 1e3:>10.1f} {min(ts) * 1e3:>8.1f} {med / base:>8.3f}")


if __name__ == "__main__":
    main()
