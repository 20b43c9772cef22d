#!/usr/bin/env python3
"""Patching sweeps on a GPU: time per sweep ÷ one plain forward (target <= 3x for the head sweep).

    python benchmarks/gpu_sweeps.py                 # GPT-2 small + 1.1B Llama shape, bf16, 128 tokens, cuda
    python benchmarks/gpu_sweeps.py --tokens 128 --models gpt2 --device cuda

Random weights (no download): GPT-2 small (12 layers, 12 heads, d 768) and a TinyLlama-1.1B-shaped
Llama (22 layers, 32 heads, 4 KV heads, d 2048, d_mlp 5632), in bf16. Rows per model, each the
median of --repeat runs after a warm-up, with its ratio to one plain HF forward of the same prompt:

* plain forward (1 x T tokens, no hooks);
* exact head sweep (every head, all positions) and the same as a serial loop, one forward per head
  with plain torch hooks (what TransformerLens does), whose numbers the sweep must reproduce;
* attribution patching + exact verification of the top 20;
* exact resid_pre sweep (layer x position) and an exact neuron sweep of the middle layer.

Then an fp32 exactness check on GPT-2: the batched head sweep against the serial loop, max |diff|.
Needs only torch, transformers, grpcio, protobuf, numpy (what the GPU machines have). A few minutes.
`python -m benchmarks.gpu` runs these together with P1, P2 and P5, and prints one table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdb_server.analyses import TargetSpec, resolve_target  # noqa: E402
from tdb_server.analyses.sweeps import SweepSpec, attribution_patching, patch_sweep  # noqa: E402
from tdb_server.model import build_random_model  # noqa: E402
from tdb_server.model.arch import get_path  # noqa: E402

CONFIGS = {
    "gpt2": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)),
    "llama-1b": ("llama", dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632,
                               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                               max_position_embeddings=2048)),
    # tiny shapes of both families: for checking the scripts end to end on a CPU
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=1000)),
    "llama-tiny": ("llama", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)),
}
A, B = 11, 22


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> tuple[float, object]:
    out = fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def serial_head_sweep(adapter, clean, corrupted, target) -> torch.Tensor:
    """One forward per head, plain torch hooks on the output projections (clean z into the corrupted run)."""
    model, spec, info = adapter.model, adapter.spec, adapter.info
    dev = adapter.model.get_input_embeddings().weight.device
    projs = [get_path(b, spec.attn_out_proj) for b in adapter.blocks]
    cache, handles = {}, []
    for layer, proj in enumerate(projs):
        handles.append(proj.register_forward_pre_hook(
            lambda m, args, layer=layer: cache.__setitem__(layer, args[0].detach().clone())))
    with torch.no_grad():
        model(input_ids=torch.tensor([clean], device=dev), use_cache=False)
    for h in handles:
        h.remove()
    Dh = info.d_head
    out = torch.empty(info.n_layers, info.n_heads)
    ids = torch.tensor([corrupted], device=dev)
    for layer, proj in enumerate(projs):
        for head in range(info.n_heads):
            def patch(m, args, layer=layer, head=head):
                x = args[0].clone()
                x[..., head * Dh:(head + 1) * Dh] = cache[layer][..., head * Dh:(head + 1) * Dh]
                return (x,)
            h = proj.register_forward_pre_hook(patch)
            try:
                with torch.no_grad():
                    logits = model(input_ids=ids, use_cache=False).logits[0, target.position]
            finally:
                h.remove()
            out[layer, head] = target.read_rows(logits[None])[0]
    return out


def build(name: str, args):
    """The random-weight model `name` (CONFIGS) in args.dtype on args.device, announced."""
    family, cfg = CONFIGS[name]
    t0 = time.perf_counter()
    adapter = build_random_model(family, seed=0, dtype=args.dtype, device=args.device, **cfg)
    info = adapter.info
    print(f"\n## {name}: {info.n_layers} layers x {info.n_heads} heads, d_model {info.d_model}, {args.dtype}, "
          f"{args.tokens} tokens on {info.device} (built in {time.perf_counter() - t0:.0f} s)", flush=True)
    return adapter


def release(device: str) -> None:
    """Give back the memory of models no longer referenced."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_model(name: str, args) -> dict:
    adapter = build(name, args)
    rows = sweep_rows(adapter, args)
    result = {"model": name, "dtype": args.dtype, "tokens": args.tokens, "device": torch.cuda.get_device_name()
              if args.device.startswith("cuda") else "cpu", "rows": rows}
    del adapter
    release(args.device)
    return result


def sweep_rows(adapter, args) -> list[tuple[str, float, float, str]]:
    """The sweeps on `adapter`, printed as they finish: (what, seconds, ÷ one forward, note)."""
    info = adapter.info
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(100, info.vocab_size - 1, (args.tokens,), generator=gen).tolist()
    corrupted = list(clean)
    for i in range(0, args.tokens, 4):
        corrupted[i] = (corrupted[i] + 7) % info.vocab_size
    target, _ = resolve_target(adapter, TargetSpec(token_ids=(A,), distractor_ids=(B,)), clean)
    ids = torch.tensor([clean], device=info.device)
    with torch.no_grad():
        t_fwd, _ = timed(lambda: adapter.model(input_ids=ids, use_cache=False), args.device, args.repeat)
    rows = [("plain forward", t_fwd, "")]

    t, sweep = timed(lambda: patch_sweep(adapter, clean, corrupted, target, SweepSpec("head_out")),
                     args.device, args.repeat)
    rows.append((f"exact head sweep ({sweep.values.numel()} heads, batch {sweep.summary.batch_size})", t, ""))
    t_serial, serial = timed(lambda: serial_head_sweep(adapter, clean, corrupted, target), args.device, 1)
    diff = float((serial - sweep.values).abs().max())
    rows.append(("serial head sweep, one forward per head", t_serial, f"max |batched - serial| {diff:.2e} ({args.dtype})"))
    t, atp = timed(lambda: attribution_patching(adapter, clean, corrupted, target,
                                                SweepSpec("head_out", verify_top_k=20)), args.device, args.repeat)
    rows.append(("attribution patching + exact top-20", t, f"Spearman on verified {atp.summary.spearman:.3f}"))
    t, rp = timed(lambda: patch_sweep(adapter, clean, corrupted, target, SweepSpec("resid_pre")), args.device, 1)
    rows.append((f"exact resid_pre sweep ({rp.values.numel()} = layer x position)", t, ""))
    mid = info.n_layers // 2
    t, nr = timed(lambda: patch_sweep(adapter, clean, corrupted, target, SweepSpec("neuron", layers=(mid,))),
                  args.device, 1)
    rows.append((f"exact neuron sweep, layer {mid} ({nr.values.numel()} neurons)", t, ""))
    for label, secs, note in rows:
        print(f"| {label:<58} | {secs * 1000:9.1f} ms | {secs / t_fwd:7.2f}x fwd | {note}", flush=True)
    return [(label, secs, secs / t_fwd, note) for label, secs, note in rows]


def exactness_fp32(args, name: str = "gpt2") -> float:
    family, cfg = CONFIGS[name]
    adapter = build_random_model(family, seed=0, dtype="float32", device=args.device, **cfg)
    clean = list(range(100, 100 + 32))
    corrupted = [t + 1 if i % 3 == 0 else t for i, t in enumerate(clean)]
    target, _ = resolve_target(adapter, TargetSpec(token_ids=(A,), distractor_ids=(B,)), clean)
    sweep = patch_sweep(adapter, clean, corrupted, target, SweepSpec("head_out"))
    serial = serial_head_sweep(adapter, clean, corrupted, target)
    diff = float((serial - sweep.values).abs().max())
    print(f"\nfp32 exactness on {args.device} ({name}, 32 tokens, {sweep.values.numel()} heads): "
          f"max |batched - serial| = {diff:.2e}")
    return diff


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,llama-1b")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--exact-model", default="gpt2", help="the model of the fp32 exactness check")
    p.add_argument("--json", default="")
    args = p.parse_args()
    import transformers

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{dev}; torch {torch.__version__}, transformers {transformers.__version__}")
    results = [bench_model(m, args) for m in args.models.split(",") if m]
    diff = exactness_fp32(args, args.exact_model)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "fp32_max_diff": diff}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
