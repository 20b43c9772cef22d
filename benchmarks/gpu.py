#!/usr/bin/env python3
"""The GPU run: P1, P2, P4 and P5 on random-weight GPT-2-small and a ~1B Llama in bf16, table last.

    python -m benchmarks.gpu                    # cuda, bf16, 128 tokens: meant to fit 10 minutes on an H100/H200
    python -m benchmarks.gpu --tiny --device cpu --dtype float32 --tokens 16 --steps 50   # end-to-end check, CPU

Per model (GPT-2 small: 12 layers, d 768; TinyLlama-1.1B-shaped Llama: 22 layers, d 2048, 4 KV heads):
P1 (session forward ÷ plain forward), P2 (step latency over loopback gRPC), P5 (full node table ÷
one forward), P4 (benchmarks/gpu_sweeps.py: exact head sweep ÷ one forward, target <= 3x; the serial
loop it must reproduce; attribution + exact top 20; resid_pre and neuron sweeps); then the fp32
exactness check of the batched head sweep against the serial loop. Needs only torch, transformers,
grpcio, protobuf and numpy: no peers, no downloads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import measures  # noqa: E402
from benchmarks.common import report  # noqa: E402
from benchmarks.gpu_sweeps import build, exactness_fp32, release, sweep_rows  # noqa: E402
from tdb_server.server import create_server  # noqa: E402


def p4_rows(adapter, args) -> list[dict]:
    return [{"id": "P4", "what": what, "value": secs * 1e3, "unit": "ms", "ratio": ratio, "note": note,
             "target": "<= 3" if what.startswith("exact head sweep") else ""}
            for what, secs, ratio, note in sweep_rows(adapter, args)]


def model_rows(name: str, args) -> list[dict]:
    """P1, P2, P5, P4 on one model, each row's measurement prefixed with the model's name."""
    t0 = time.perf_counter()
    adapter = build(name, args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, adapter.info.vocab_size - 1, (args.tokens,), generator=gen).tolist()
    rows = measures.p1(adapter, ids, args.repeat, sync)
    handle, port = create_server("127.0.0.1:0", adapter)
    try:
        rows += measures.p2(f"127.0.0.1:{port}", ids, args.steps)
    finally:
        handle.stop(grace=None)
    rows += measures.p5(adapter, ids, args.repeat, sync)
    rows += p4_rows(adapter, args)
    del adapter
    release(args.device)
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return [{**r, "what": f"{name}: {r['what']}"} for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated names of gpu_sweeps.CONFIGS "
                                                 "(default gpt2,llama-1b; with --tiny gpt2-tiny,llama-tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes of both families (a quick check on a CPU)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=str(measures.RESULTS / "gpu.json"))
    args = ap.parse_args()
    models = args.models or ("gpt2-tiny,llama-tiny" if args.tiny else "gpt2,llama-1b")
    import transformers

    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda")
    card = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    rows = [r for name in models.split(",") if name for r in model_rows(name, args)]
    diff = exactness_fp32(args, "gpt2-tiny" if args.tiny else "gpt2")
    rows.append({"id": "P4", "what": "fp32 exactness: max |batched - serial| over every head", "value": diff,
                 "unit": ""})
    header = (f"{card}; {args.dtype}, {args.tokens} tokens; torch {torch.__version__}, transformers "
              f"{transformers.__version__}; {time.perf_counter() - t0:.0f} s in all")
    print()
    report(header, rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
