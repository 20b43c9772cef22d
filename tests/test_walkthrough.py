"""The walkthrough (docs/walkthrough.py) runs end to end, and its answer is the model card's."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_walkthrough_runs_and_finds_the_induction_heads():
    from tdb_server.paths import circuit_model_path

    r = subprocess.run([sys.executable, "docs/walkthrough.py"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    truth = json.loads((circuit_model_path() / "ground_truth.json").read_text())
    heads = {f"{layer}.{h}" for layer, h in truth["induction_heads"]}
    assert f"next token: '{truth['demo']['answer']}'" in out
    top = re.search(r"blocks\.(\d+)\.attn\.head\.(\d+)\s+direct effect", out)
    assert top and f"{top.group(1)}.{top.group(2)}" in heads
    before, after = map(float, re.search(r"zero-ablating .*: ([-\d.]+) -> ([-\d.]+)", out).groups())
    assert after < before - 5
    sweep = re.search(r"the head that restores the most is (\d+\.\d+)", out)
    assert sweep and sweep.group(1) in heads
    assert "faithfulness" in out
