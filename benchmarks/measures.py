"""The measurements P1-P6, each a function returning table rows (see common.py), on any device.

`sync` is called after every timed call (torch.cuda.synchronize on a GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import interleaved
from tdb_server.engine.manager import SessionManager
from tdb_server.engine.types import BreakpointRequest, RunState

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RESID = ["embed", "blocks.*.resid_pre", "blocks.*.resid_mid", "blocks.*.resid_post"]


def model_input(adapter, ids: list[int]) -> torch.Tensor:
    """[1, T] on the model's device."""
    return torch.tensor([ids], device=adapter.model.get_input_embeddings().weight.device)


def plain_forward(adapter, ids: list[int]) -> Callable[[], object]:
    """One plain HF forward (no hooks, no grad, no KV cache: what a session's forward runs)."""
    x = model_input(adapter, ids)

    def go():
        with torch.no_grad():
            return adapter.model(input_ids=x, use_cache=False)
    return go


def session_run(session, ids: list[int], capture: list[str], breakpoints: tuple[str, ...] = ()):
    """A run of an in-process session to its end (continuing through every stop); returns the run."""
    def go():
        session.set_breakpoints([BreakpointRequest(site=b) for b in breakpoints])
        r = session.launch([], [ids], False, capture, False)
        session.wait(r, 120)
        while r.state is RunState.PAUSED:
            session.resume("continue")
            session.wait(r, 120)
        return r
    return go


def p1(adapter, ids: list[int], repeat: int, sync=None) -> list[dict]:
    mgr = SessionManager(adapter)
    s = mgr.create()
    t = interleaved({"plain": plain_forward(adapter, ids), "none": session_run(s, ids, ["none"]),
                     "one_bp": session_run(s, ids, ["none"], ("blocks.0.attn.out",)),
                     "resid": session_run(s, ids, RESID)}, repeat, sync)
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
    for shared in (False, True):
        how = "shared memory (same host, the client's default there)" if shared else "streamed over gRPC"
        for mib in sizes:
            r = bench_read(mib, repeats=3, shared_memory=shared)
            rows.append({"id": "P3", "what": f"ReadTensor {r['read_mib']:.0f} MiB, {how} (best of 3)",
                         "value": r["read_gib_per_s"], "unit": "GiB/s", "target": ">= 1"})
    return rows


def p4(model_dir: str = "", tokens: list[int] = (20,), threads: int = 0, clock: str = "wall") -> list[dict]:
    """benchmarks/bench_sweeps.py in a subprocess per prompt length (TransformerLens stays out of this
    process's timings)."""
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for n in tokens:
        out = RESULTS / f"sweeps_{n}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_sweeps.py"), "--json", str(out), "--tokens", str(n),
               "--threads", str(threads), "--clock", clock]
        r = subprocess.run(cmd + (["--model-dir", model_dir] if model_dir else []), capture_output=True, text=True)
        print(r.stdout)
        if r.returncode != 0 or not out.is_file():
            why = (r.stderr.strip().splitlines() or ["failed"])[-1]
            rows.append({"id": "P4", "what": f"head sweep vs TransformerLens, {n} tokens", "value": None, "unit": "",
                         "note": why})
            continue
        rows += [{"id": "P4", **row} for row in json.loads(out.read_text())["rows"]]
    return rows


def p5(adapter, ids: list[int], repeat: int, sync=None) -> list[dict]:
    from tdb_server.analyses.inputs import TargetSpec, resolve_target
    from tdb_server.analyses.node_table import TargetObjective, compute_node_table

    target, ids = resolve_target(adapter, TargetSpec(token_ids=(ids[1],), distractor_ids=(ids[2],)), ids)
    objective = TargetObjective(target)
    t = interleaved({"plain": plain_forward(adapter, ids),
                     "table": lambda: compute_node_table(adapter, ids, objective),
                     "direct": lambda: compute_node_table(adapter, ids, objective, target_position_only=True,
                                                          direct_only=True),
                     "total": lambda: compute_node_table(adapter, ids, objective, target_position_only=True)},
                    repeat, sync)
    return [{"id": "P5", "what": "node table (all node types, every position) ÷ one forward", "value": t["table"] * 1e3,
             "unit": "ms", "ratio": t["table"] / t["plain"], "target": "<= 3"},
            {"id": "P5", "what": "node table, direct effects at the target position ÷ one forward",
             "value": t["direct"] * 1e3, "unit": "ms", "ratio": t["direct"] / t["plain"],
             "target": "<= 1.3 (GPT-2-small, 128 tokens: P7)"},
            {"id": "P5", "what": "node table, direct + total effects at the target position ÷ one forward",
             "value": t["total"] * 1e3, "unit": "ms", "ratio": t["total"] / t["plain"],
             "target": "<= 2.5 (GPT-2-small, 128 tokens: P7)"}]


def p6(adapter, ids: list[int]) -> list[dict]:
    mgr = SessionManager(adapter)
    rows = []
    for what, capture in (("no captures", ["none"]), ("every site captured", [])):
        s = mgr.create()
        session_run(s, ids, capture)()
        rows.append({"id": "P6", "what": f"session memory beyond the weights, {what}",
                     "value": s.captured_bytes() / 2**20, "unit": "MiB"})
    mgr.shutdown()
    weights = sum(p.numel() * p.element_size() for p in adapter.model.parameters()) / 2**20
    rows.append({"id": "P6", "what": "the weights, for scale", "value": weights, "unit": "MiB"})
    return rows
