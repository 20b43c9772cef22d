"""Walkthrough: why does the model say "Darcy"? — run end to end on the bundled circuit model.

    .venv/bin/python docs/walkthrough.py            (the test suite runs it: tests/test_walkthrough.py)

Starts a tdb server in this process on a free loopback port (any running server works the same way:
`TdbClient("host:port")`), then debugs one prediction: a breakpoint, the attention pattern, the node
table, an ablation, a patching sweep and the circuit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from tdb_client import Ablation, Target, TdbClient  # noqa: E402
from tdb_server.model import load_model  # noqa: E402
from tdb_server.paths import circuit_model_path  # noqa: E402
from tdb_server.server import create_server  # noqa: E402

model_dir = circuit_model_path()
truth = json.loads((model_dir / "ground_truth.json").read_text())
demo = truth["demo"]
prompt = demo["prompt"]                               # "... saw Mr Darcy at the ball ... told Miss Bennet that Mr"
corrupted = demo["variants"][0]["prompt"]             # the same sentence with "Bingley" in the first slot
target = Target(tokens=[demo["answer"]], distractors=[demo["distractor"]])

handle, port = create_server("127.0.0.1:0", load_model(str(model_dir), device="cpu", dtype="float32"))
with TdbClient(f"127.0.0.1:{port}") as tdb:
    info = tdb.model_info()
    print(f"1. model {info.name}: {info.n_layers} layers x {info.n_heads} heads, vocabulary {info.vocab_size}")
    ids, tokens = tdb.tokenize(prompt)
    print(f"   prompt ({len(ids)} tokens): {prompt!r}")

    # -- 2. run it, and stop where layer 1's attention has written to the residual stream ---------------
    with tdb.session() as s:
        s.set_breakpoints(["blocks.1.attn.out"])
        stop = s.launch(prompt, capture=["*"])      # keep every site, the attention patterns too
        print(f"2. stopped at {stop.site} ({stop.stop.reason}); stack: {[f.name for f in s.stack()]}")
        pattern = s.read("blocks.1.attn.pattern")[0]                  # [head, query, key]
        for h in range(info.n_heads):
            k = int(pattern[h, -1].argmax())
            print(f"   head 1.{h} at the last token attends most to position {k} {tokens[k]!r} "
                  f"({pattern[h, -1, k]:.2f})")
        done = s.continue_()
        top = done.result.top[0][0]
        print(f"   next token: {top.text!r} with p = {top.prob:.2f}")

    # -- 3. which components push "Darcy" over "Bingley"? ----------------------------------------------
    table = tdb.node_table(prompt, target, top_k=5, node_types=["head", "neuron"])
    print(f"3. target {table.target.description} = {table.target.value:.2f}; top components by direct effect:")
    for _, row in table.top.to_pandas().head(5).iterrows():
        print(f"   {row['node']:<28} direct effect {row['direct_effect']:+.2f}")

    # -- 4. ablate the induction heads the model card names --------------------------------------------
    heads = [f"blocks.{layer}.attn.head.{h}" for layer, h in truth["induction_heads"]]
    result = tdb.ablate(prompt, target, [Ablation(h) for h in heads])
    print(f"4. zero-ablating {', '.join(heads)}: {result.before:.2f} -> {result.after:.2f}")
    strongest = table.top.to_pandas()["node"][0]                         # head 1.3
    backup = tdb.node_table(prompt, target, top_k=3, node_types=["head"], ablations=[strongest])
    rows = backup.top.to_pandas()                                         # per head and query position
    print(f"   with {strongest} alone ablated the target is {backup.target.value:.2f}, carried now by "
          + ", ".join(f"{r.node} ({r.direct_effect:+.2f})" for r in rows.itertuples()))

    # -- 5. patch every head from the clean run into the corrupted one ---------------------------------
    sweep = tdb.patch_sweep(prompt, corrupted, target, kind="head_out")
    layer, head = np.unravel_index(np.nanargmax(sweep.normalized), sweep.normalized.shape)
    print(f"5. head sweep (denoising): the head that restores the most is {layer}.{head} "
          f"({sweep.normalized[layer, head]:.2f} of the clean-corrupted gap)")

    # -- 6. the circuit ---------------------------------------------------------------------------------
    cue = prompt.split().index("Mr")
    earlier = " ".join(w if i != cue else "the" for i, w in enumerate(prompt.split()))   # break the cue
    circ = tdb.circuit(prompt, earlier, target, fraction=0.9)
    print(f"6. circuit: {len(circ.circuit.edges)} edges explain the effect with faithfulness {circ.faithfulness:.2f}")
    for e in sorted(circ.circuit.edges, key=lambda e: -abs(e.effect))[:6]:
        print(f"   {e.source:<22} -> {e.target:<26} {e.effect:+.2f}")
handle.stop(grace=None)
