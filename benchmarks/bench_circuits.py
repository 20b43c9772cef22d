#!/usr/bin/env python3
"""Circuits on a 20-token prompt: information-flow graph, EAP over every edge, exact path patching of
the top edges (with the rank correlation), circuit extraction (faithfulness measured exactly).

    python benchmarks/bench_circuits.py                          # a bundled model, 20 tokens
    python benchmarks/bench_circuits.py --model random-gpt2 --layers 12 --d-model 768 --heads 12

The prompt: the bundled model's demo prompt cut or padded (repeating it) to --tokens tokens, with the
earlier cue token corrupted (see tests/circuits/test_circuits_bundled.py); random models: random
tokens repeated (an induction-style prompt) with one token corrupted. Each row is the median of
--repeat runs after a warm-up.
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

from tdb_server.analyses import circuits as C  # noqa: E402
from tdb_server.analyses.inputs import Target  # noqa: E402
from tdb_server.model import build_random_model, load_model  # noqa: E402
from tdb_server.paths import bundled_models  # noqa: E402


def timed(fn, repeat: int):
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bundled_case(name: str, tokens: int):
    path = bundled_models()[name]
    a = load_model(str(path), device="cpu", dtype="float32")
    truth = json.loads((path / "ground_truth.json").read_text())
    tok = a.tokenizer
    ids = tok(truth["demo"]["prompt"], add_special_tokens=False)["input_ids"]
    answer = tok(truth["demo"]["answer"], add_special_tokens=False)["input_ids"][0]
    distractor = tok(truth["demo"]["distractor"], add_special_tokens=False)["input_ids"][0]
    while len(ids) < tokens:                       # pad at the front (repeating the first token)
        ids = ids[:1] + ids
    ids = ids[-tokens:]                            # or cut at the front, keeping "... Mr Darcy ... Mr"
    bad = list(ids)
    bad[ids.index(answer) - 1] = ids[0] if ids[0] != ids[-1] else distractor   # the earlier cue
    return a, ids, bad, Target("logit_diff", [answer], [distractor], len(ids) - 1)


def random_case(args):
    a = build_random_model("gpt2", seed=0, n_layer=args.layers, n_embd=args.d_model, n_head=args.heads,
                           vocab_size=1000, n_positions=128)
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, 1000, (args.tokens // 2,), generator=g).tolist()
    ids = (half + half)[:args.tokens]
    bad = list(ids)
    bad[2] = (bad[2] + 1) % 1000
    return a, ids, bad, Target("logit_diff", [ids[1]], [ids[0]], len(ids) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a bundled model's name (default: the first with a circuit) or random-gpt2")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--verify", type=int, default=20)
    p.add_argument("--fraction", type=float, default=0.8)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = bundled_models()
    name = args.model or next((n for n in models if (models[n] / "ground_truth.json").is_file()), "random-gpt2")
    a, ids, bad, target = random_case(args) if name == "random-gpt2" else bundled_case(name, args.tokens)
    info = a.info
    print(f"model {name}: {info.n_layers} layers x {info.n_heads} heads, d_model {info.d_model}; "
          f"{len(ids)} tokens; {torch.get_num_threads()} CPU threads")
    plain, _ = timed(lambda: a.forward(torch.tensor([ids])), args.repeat)
    flow_t, flow = timed(lambda: C.information_flow(a, ids), args.repeat)
    eap_t, scores = timed(lambda: C.edge_attribution(a, ids, target, bad), args.repeat)
    ver_t, check = timed(lambda: C.verify(a, scores, args.verify), args.repeat)
    ext_t, found = timed(lambda: C.extract_circuit(a, scores, args.fraction), args.repeat)
    n_edges = int(scores.topology.reach.sum())
    rows = [("plain forward", plain, ""),
            ("information-flow graph", flow_t, f"{len(flow.graph.edges)} edges on routes, {len(flow.graph.nodes)} nodes"),
            ("EAP, every edge", eap_t, f"{n_edges} edges; target clean {scores.clean_value:.3f}, "
                                        f"corrupted {scores.ablated_value:.3f}"),
            (f"exact path patching, top {args.verify}", ver_t,
             f"Spearman {check.spearman:.3f}, Pearson {check.pearson:.3f}, max |err| {check.max_abs_error:.3g}"),
            (f"circuit extraction ({args.fraction})", ext_t,
             f"{len(found.edges)} edges, faithfulness {found.faithfulness:.3f}, {len(found.curve)} circuits measured")]
    print(f"| {'step':40s} | {'time':>9s} | {'x forward':>9s} | notes |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|-------|")
    for label, t, note in rows:
        print(f"| {label:40s} | {t * 1000:7.1f}ms | {t / plain:9.1f} | {note} |")
    total = flow_t + eap_t + ver_t + ext_t
    print(f"all of it: {total:.2f} s")


if __name__ == "__main__":
    main()
