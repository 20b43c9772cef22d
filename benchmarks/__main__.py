"""One entry point for the side-by-side measurements: `python -m benchmarks all` (or a list of P1..P7).

Every measurement runs in this one process on the same model, prompt and machine, repeats, and
reports medians and **ratios** (these machines are noisy: compare ratios from one run), as a table and
as JSON (`--json`, default benchmarks/results/latest.json).

    P1  forward in a session ÷ plain HF forward: no breakpoints (nothing hooked), one breakpoint,
        captures of every residual site                                   (target <= 1.03 with none)
    P2  step latency paused -> next stop over loopback gRPC                (target <= 5 ms)
    P3  ReadTensor throughput over gRPC for 1, 16 and 256 MiB              (target >= 1 GiB/s)
    P4  exact head sweep and attribution + exact top-k vs TransformerLens  (needs the `bench` extra;
        runs benchmarks/bench_sweeps.py)                                  (targets >= 3x and >= 10x)
    P5  node table ÷ one forward: full (<= 3x), direct effects at the target position (<= 1.3x),
        direct + total effects there (<= 2.5x)
    P6  memory a session holds beyond the weights, with and without captures
    P7  node table, logit lens and "cache everything" vs TransformerLens and nnsight, numbers checked
        first (the `bench` extra; missing peers get a row saying so; benchmarks/bench_peers.py)
    S   scaling with prompt length: node table, cache, information flow and head sweeps at 20, 128, 512
        and 1,024 tokens on GPT-2-small and at 20 and 128 on a 1.1B Llama shape, peers beside them
        (benchmarks/bench_scaling.py with its defaults; about an hour on 2 CPU cores; not part of `all`; writes
        benchmarks/results/scaling_cpu.json and docs/benchmarks_scaling.svg; its rows join the table)

P1, P2, P3, P5 and P6 run on the bundled model (`--model`); P4 and P7 on one random-weight
GPT-2-small saved to a temporary directory. `--tokens 20,128` runs P4 and P7 at each length (the others at the
first). The GPU run is `python -m benchmarks.gpu`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import measures  # noqa: E402
from benchmarks.common import report, use_clock  # noqa: E402
from tdb_server.model import load_model  # noqa: E402
from tdb_server.paths import resolve_model  # noqa: E402
from tdb_server.server import create_server  # noqa: E402

ALL = ("P1", "P2", "P3", "P4", "P5", "P6", "P7")


def bundled_rows(which: set[str], args) -> tuple[str, list[dict]]:
    """P1, P2, P3, P5, P6 on the bundled (or --model) model: (header, rows)."""
    adapter = load_model(resolve_model(args.model), device="cpu", dtype="float32")
    n = args.tokens[0]
    ids = [int(i) % adapter.info.vocab_size for i in range(7, 7 + 31 * n, 31)][:n]
    rows: list[dict] = []
    if "P1" in which:
        rows += measures.p1(adapter, ids, args.repeat)
    if "P2" in which:
        handle, port = create_server("127.0.0.1:0", adapter)
        try:
            rows += measures.p2(f"127.0.0.1:{port}", ids[:16], args.steps)
        finally:
            handle.stop(grace=None)
    if "P3" in which:
        rows += measures.p3([int(x) for x in args.read_mib.split(",")])
    if "P5" in which:
        rows += measures.p5(adapter, ids, args.repeat)
    if "P6" in which:
        rows += measures.p6(adapter, ids)
    info = adapter.info
    header = (f"model {info.name} ({info.architecture}, {info.n_layers} layers, d_model {info.d_model}), "
              f"{len(ids)} tokens")
    return header, rows


def gpt2_rows(which: set[str], args) -> list[dict]:
    """P4 and P7 on one random-weight GPT-2-small saved to a temporary directory."""
    from benchmarks.bench_sweeps import save_random_gpt2

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2-small-random"
        save_random_gpt2(path, seed=0)
        if "P7" in which:
            from benchmarks.bench_peers import run

            for tokens in args.tokens:           # each prompt length side by side with the peers
                rows += run(str(path), tokens, args.repeat)
        if "P4" in which:
            rows += measures.p4(str(path), args.tokens, args.threads, args.clock)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="*", default=["all"], help="all, or any of " + " ".join(ALL) + " S")
    ap.add_argument("--model", default=None, help="model directory or bundled name (default: the bundled model)")
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[32],
                    help="prompt length; P4 and P7 take a list (e.g. 20,128: one block of rows each), the rest the first")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--read-mib", default="1,16,256")
    ap.add_argument("--json", default=str(measures.RESULTS / "latest.json"))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default); 1 keeps ratios steady on a shared 2-core machine, "
                         "where two threads spend much of their time waiting for each other")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (steadier on a loaded machine; CPU only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_clock(args.clock)
    which = set(ALL) if "all" in args.which else {w.upper() for w in args.which}

    header, rows = bundled_rows(which, args) if which & {"P1", "P2", "P3", "P5", "P6"} else ("", [])
    rows += gpt2_rows(which, args) if which & {"P4", "P7"} else []
    if "S" in which:
        from benchmarks import bench_scaling

        s_args = bench_scaling.parser().parse_args(["--threads", str(args.threads), "--clock", args.clock])
        s_header, s_rows = bench_scaling.run(s_args)
        report(s_header, s_rows, s_args.json)
        bench_scaling.plot(s_rows, Path(s_args.plot))
        rows += s_rows
    header = "; ".join(x for x in (header, f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                                           f"{args.clock} clock") if x)
    report(header, sorted(rows, key=lambda r: r["id"]), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
