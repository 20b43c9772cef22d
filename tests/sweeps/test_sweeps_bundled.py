"""On the bundled model, the head sweep of an induction prompt puts a model-card induction head first.

Prompt, answer and distractor come from ground_truth.json's demo ("... Mr. Darcy ... Mr." ->
" Darcy" vs " Bingley"); the corrupted prompt has the first name swapped for the distractor, so an
induction head there copies " Bingley". Denoising: patching the clean output of the induction head
into the corrupted run restores the most. Skipped only while no bundled model exists; once one does,
every step fails loudly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tdb_client import Target
from tdb_server.paths import bundled_models

pytestmark = pytest.mark.skipif(not bundled_models(), reason="no bundled model yet (scripts/train_bundled.py)")


@pytest.fixture(scope="module")
def truth():
    from tdb_server.paths import circuit_model_path

    path = circuit_model_path() / "ground_truth.json"
    assert path.is_file(), f"the bundled model has no {path.name}"
    gt = json.loads(path.read_text())
    assert gt.get("induction_heads"), "ground_truth.json lists no induction head"
    assert gt.get("demo", {}).get("prompt"), "ground_truth.json has no demo prompt"
    return gt


def corrupted_ids(adapter, prompt: str, answer: str, distractor: str) -> tuple[list[int], list[int]]:
    """Clean ids, and the same ids with the answer's first token swapped for the distractor's."""
    tok = adapter.tokenizer
    assert tok is not None, "the bundled model has no tokenizer"
    clean = list(tok(prompt, add_special_tokens=False)["input_ids"])
    a = tok(answer, add_special_tokens=False)["input_ids"][0]
    b = tok(distractor, add_special_tokens=False)["input_ids"][0]
    assert a in clean, f"the demo prompt does not contain the answer token {answer!r}: no induction to test"
    return clean, [b if t == a else t for t in clean]


def test_head_sweep_puts_the_induction_head_first(bundled_client, bundled_adapter, truth):
    demo = truth["demo"]
    induction = {(int(layer), int(head)) for layer, head in truth["induction_heads"]}
    clean, corrupted = corrupted_ids(bundled_adapter, demo["prompt"], demo["answer"], demo["distractor"])
    r = bundled_client.patch_sweep(clean, corrupted, Target(demo["answer"], demo["distractor"]), kind="head_out")
    assert r.complete and r.clean_value > r.corrupted_value, (r.clean_value, r.corrupted_value)
    order = np.argsort(-r.normalized.reshape(-1))
    layers, heads = r.axes[0].values, r.axes[1].values
    ranked = [(int(layers[i // len(heads)]), int(heads[i % len(heads)])) for i in order]
    table = r.to_pandas().sort_values("normalized", ascending=False).head(6).to_string()
    assert ranked[0] in induction, f"first: {ranked[0]}, induction heads: {sorted(induction)}\n{table}"

    # attribution patching finds it too, and its verification is exact
    atp = bundled_client.attribution_patching(clean, corrupted, Target(demo["answer"], demo["distractor"]),
                                              kind="head_out", verify_top_k=5)
    verified = ~np.isnan(atp.values)
    np.testing.assert_allclose(atp.values[verified], r.values[verified], atol=1e-4)
    best = np.nanargmax(np.where(verified, atp.normalized, -np.inf).reshape(-1))
    assert (int(layers[best // len(heads)]), int(heads[best % len(heads)])) in induction, table
