"""Debug-session latency and tensor-read throughput over loopback gRPC.

    .venv/bin/python benchmarks/bench_session.py [--model DIR_OR_BUNDLED_NAME] [--steps 200] [--mib 256]

Measures, through a real server on 127.0.0.1 and the typed client:
- step latency: paused -> step into -> paused at the next site (median, p90), on the model given
  (default: the bundled model);
- continue latency between two breakpoints in consecutive blocks;
- ReadTensor throughput for a large tensor (default 256 MiB of float32 logits from a wide random
  GPT-2), and for a 1 MiB read.
Targets (issue 4): <= 5 ms per step on the bundled model, >= 1 GiB/s reads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tdb_client import TdbClient  # noqa: E402
from tdb_server.model import build_random_model, load_model  # noqa: E402
from tdb_server.paths import resolve_model  # noqa: E402
from tdb_server.server import create_server  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_steps(addr: str, n_steps: int, ids: list[int]) -> dict[str, float]:
    lat: list[float] = []
    cont: list[float] = []
    with TdbClient(addr) as c, c.session() as s:
        while len(lat) < n_steps:
            st = s.launch(token_ids=[ids], stop_on_entry=True)
            while st.state == "paused" and len(lat) < n_steps:
                t0 = time.perf_counter()
                st = s.step("into")
                lat.append(time.perf_counter() - t0)
            if st.state == "paused":
                s.terminate()
        n_layers = c.model_info().n_layers
        s.set_breakpoints(["blocks.*.resid_post"])
        for _ in range(max(1, n_steps // max(1, n_layers))):
            s.launch(token_ids=[ids])
            while True:
                t0 = time.perf_counter()
                st = s.continue_()
                cont.append(time.perf_counter() - t0)
                if st.state != "paused":
                    break
    return {"step_median_ms": 1e3 * statistics.median(lat), "step_p90_ms": 1e3 * _pct(lat, 0.9),
            "continue_median_ms": 1e3 * statistics.median(cont), "steps": len(lat)}


def bench_read(mib: int, repeats: int = 3, shared_memory: bool = False) -> dict[str, float]:
    """ReadTensor of `mib` MiB of float32 logits from an in-process server: streamed over gRPC, or
    (shared_memory) through a shared-memory file, as a client on the server's host reads by default."""
    vocab = 65536
    rows = max(1, (mib << 20) // (vocab * 4))          # float32 logit rows of `vocab` each: mib MiB in all
    T = min(256, rows)
    B = max(1, rows // T)
    big = build_random_model("gpt2", seed=3, vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=256)
    handle, port = create_server("127.0.0.1:0", big)
    try:
        ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0)).tolist()
        with TdbClient(f"127.0.0.1:{port}", timeout=600) as c, c.session() as s:
            s.launch(token_ids=ids, capture=["logits"])
            times = []
            nbytes = 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                arr = s.read("logits", shared_memory=shared_memory)
                times.append(time.perf_counter() - t0)
                nbytes = arr.nbytes
            small = []
            for _ in range(50):
                t0 = time.perf_counter()
                s.read("logits", "[0, :4]", shared_memory=shared_memory)
                small.append(time.perf_counter() - t0)
    finally:
        handle.stop(grace=None)
    best = min(times)
    return {"read_mib": nbytes / 2**20, "read_best_s": best, "read_gib_per_s": nbytes / 2**30 / best,
            "read_median_gib_per_s": nbytes / 2**30 / statistics.median(times),
            "read_1mib_median_ms": 1e3 * statistics.median(small)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory or bundled name (default: bundled)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()

    adapter = load_model(resolve_model(args.model), device="cpu", dtype="float32")
    handle, port = create_server("127.0.0.1:0", adapter)
    try:
        ids = list(np.random.default_rng(0).integers(0, adapter.info.vocab_size, args.tokens))
        steps = bench_steps(f"127.0.0.1:{port}", args.steps, [int(i) for i in ids])
    finally:
        handle.stop(grace=None)
    read = bench_read(args.mib)
    print(f"model: {adapter.info.name} ({adapter.info.n_layers} layers, d={adapter.info.d_model}), "
          f"{args.tokens} tokens, torch threads {torch.get_num_threads()}")
    print("| metric | value | target |")
    print("|---|---|---|")
    print(f"| step into, median | {steps['step_median_ms']:.2f} ms | <= 5 ms |")
    print(f"| step into, p90 | {steps['step_p90_ms']:.2f} ms | |")
    print(f"| continue to next block's breakpoint, median | {steps['continue_median_ms']:.2f} ms | |")
    print(f"| ReadTensor {read['read_mib']:.0f} MiB, best of 3 | {read['read_gib_per_s']:.2f} GiB/s "
          f"({read['read_best_s']:.3f} s) | >= 1 GiB/s |")
    print(f"| ReadTensor {read['read_mib']:.0f} MiB, median | {read['read_median_gib_per_s']:.2f} GiB/s | |")
    print(f"| small read (4 x 64k floats), median | {read['read_1mib_median_ms']:.2f} ms | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
