"""One entry point for the side-by-side measurements: `python -m benchmarks all` (or a list of P1..P6).

Every measurement runs in this one process on the same model, prompt and machine, repeats, and
reports medians and **ratios** (these machines are noisy: compare ratios from one run), as a table and
as JSON (`--json`, default benchmarks/results/latest.json).

    P1  forward in a session ÷ plain HF forward: no breakpoints (nothing hooked), one breakpoint,
        captures of every residual site                                   (target <= 1.03 with none)
    P2  step latency paused -> next stop over loopback gRPC                (target <= 5 ms)
    P3  ReadTensor throughput over gRPC for 1, 16 and 256 MiB              (target >= 1 GiB/s)
    P4  exact head sweep and attribution + exact top-k vs TransformerLens  (needs the `bench` extra;
        runs benchmarks/bench_sweeps.py)                                  (targets >= 3x and >= 10x)
    P5  full node table ÷ one forward                                      (target <= 3x)
    P6  memory a session holds beyond the weights, with and without captures
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tdb.v1 import debugger_pb2 as pb  # noqa: E402
from tdb_server.engine.session import SessionManager  # noqa: E402
from tdb_server.model import load_model  # noqa: E402
from tdb_server.paths import resolve_model  # noqa: E402
from tdb_server.server import create_server  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _interleaved(fns: dict[str, callable], repeat: int) -> dict[str, float]:
    """Median seconds of each function, alternating them so drift in machine load hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()                                      # warm-up
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def p1(adapter, ids: list[int], repeat: int) -> list[dict]:
    mgr = SessionManager(adapter)
    s = mgr.create()
    x = torch.tensor([ids])
    resid = ["embed", "blocks.*.resid_pre", "blocks.*.resid_mid", "blocks.*.resid_post"]

    def plain():
        with torch.no_grad():
            adapter.model(input_ids=x)

    def run(capture, breakpoints=()):
        def go():
            s.set_breakpoints([pb.Breakpoint(site=b) for b in breakpoints])
            r = s.launch([], [ids], False, capture, False)
            s.wait(r, 120)
            while r.state == pb.PAUSED:
                s.resume("continue")
                s.wait(r, 120)
        return go

    t = _interleaved({"plain": plain, "none": run(["none"]), "one_bp": run(["none"], ["blocks.0.attn.out"]),
                      "resid": run(resid)}, repeat)
    mgr.shutdown()
    base = t["plain"]
    return [
        {"id": "P1", "what": "plain HF forward", "value": base * 1e3, "unit": "ms", "ratio": 1.0},
        {"id": "P1", "what": "session run, nothing hooked", "value": t["none"] * 1e3, "unit": "ms",
         "ratio": t["none"] / base, "target": "<= 1.03"},
        {"id": "P1", "what": "session run, one breakpoint (stop + continue)", "value": t["one_bp"] * 1e3,
         "unit": "ms", "ratio": t["one_bp"] / base},
        {"id": "P1", "what": "session run, capturing every residual site", "value": t["resid"] * 1e3, "unit": "ms",
         "ratio": t["resid"] / base},
    ]


def p2(addr: str, ids: list[int], steps: int) -> list[dict]:
    from benchmarks.bench_session import bench_steps

    r = bench_steps(addr, steps, ids)
    return [{"id": "P2", "what": "step into, paused -> next stop (median)", "value": r["step_median_ms"],
             "unit": "ms", "target": "<= 5"},
            {"id": "P2", "what": "step into (p90)", "value": r["step_p90_ms"], "unit": "ms"},
            {"id": "P2", "what": "continue to the next block's breakpoint (median)", "value": r["continue_median_ms"],
             "unit": "ms"}]


def p3(sizes: list[int]) -> list[dict]:
    from benchmarks.bench_session import bench_read

    rows = []
    for mib in sizes:
        r = bench_read(mib, repeats=3)
        rows.append({"id": "P3", "what": f"ReadTensor {r['read_mib']:.0f} MiB (best of 3)",
                     "value": r["read_gib_per_s"], "unit": "GiB/s", "target": ">= 1"})
    return rows


def p4() -> list[dict]:
    out = RESULTS / "sweeps.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sweeps.py"), "--json", str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["failed"])[-1]
        return [{"id": "P4", "what": "head sweep vs TransformerLens", "value": None, "unit": "", "note": why}]
    print(r.stdout)
    data = json.loads(out.read_text())
    return [{"id": "P4", **row} for row in data.get("rows", [])] if isinstance(data, dict) else []


def p5(adapter, ids: list[int], repeat: int) -> list[dict]:
    from tdb_server.analyses.inputs import TargetSpec, resolve_target
    from tdb_server.analyses.node_table import TargetObjective, compute_node_table

    target, ids = resolve_target(adapter, TargetSpec(token_ids=(ids[1],), distractor_ids=(ids[2],)), ids)
    x = torch.tensor([ids])

    def plain():
        with torch.no_grad():
            adapter.model(input_ids=x)

    t = _interleaved({"plain": plain, "table": lambda: compute_node_table(adapter, ids, TargetObjective(target))},
                     repeat)
    return [{"id": "P5", "what": "node table (all node types) ÷ one forward", "value": t["table"] * 1e3, "unit": "ms",
             "ratio": t["table"] / t["plain"], "target": "<= 3"}]


def p6(adapter, ids: list[int]) -> list[dict]:
    mgr = SessionManager(adapter)
    rows = []
    for what, capture in (("no captures", ["none"]), ("every site captured", [])):
        s = mgr.create()
        r = s.launch([], [ids], False, capture, False)
        s.wait(r, 120)
        rows.append({"id": "P6", "what": f"session memory beyond the weights, {what}",
                     "value": s.captured_bytes() / 2**20, "unit": "MiB"})
    mgr.shutdown()
    weights = sum(p.numel() * p.element_size() for p in adapter.model.parameters()) / 2**20
    rows.append({"id": "P6", "what": "the weights, for scale", "value": weights, "unit": "MiB"})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="*", default=["all"], help="all, or any of P1 P2 P3 P4 P5 P6")
    ap.add_argument("--model", default=None, help="model directory or bundled name (default: the bundled model)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--read-mib", default="1,16,256")
    ap.add_argument("--json", default=str(RESULTS / "latest.json"))
    args = ap.parse_args()
    which = {"P1", "P2", "P3", "P4", "P5", "P6"} if "all" in args.which else {w.upper() for w in args.which}

    adapter = load_model(resolve_model(args.model), device="cpu", dtype="float32")
    ids = [int(i) % adapter.info.vocab_size for i in range(7, 7 + 31 * args.tokens, 31)][:args.tokens]
    rows: list[dict] = []
    if "P1" in which:
        rows += p1(adapter, ids, args.repeat)
    if "P2" in which:
        handle, port = create_server("127.0.0.1:0", adapter)
        try:
            rows += p2(f"127.0.0.1:{port}", ids[:16], args.steps)
        finally:
            handle.stop(grace=None)
    if "P3" in which:
        rows += p3([int(x) for x in args.read_mib.split(",")])
    if "P5" in which:
        rows += p5(adapter, ids, args.repeat)
    if "P6" in which:
        rows += p6(adapter, ids)
    if "P4" in which:
        rows += p4()

    info = adapter.info
    header = (f"model {info.name} ({info.architecture}, {info.n_layers} layers, d_model {info.d_model}), "
              f"{len(ids)} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(header)
    print("| id | measurement | value | ratio | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        v = r.get("value")
        value = "—" if v is None else f"{v:.3g} {r.get('unit', '')}"
        ratio = f"{r['ratio']:.2f}×" if r.get("ratio") is not None else ""
        print(f"| {r['id']} | {r['what']} | {value} | {ratio} | {r.get('target', r.get('note', ''))} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
