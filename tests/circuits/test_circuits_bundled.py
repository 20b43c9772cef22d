"""The bundled model's induction circuit, found by circuit extraction (ground truth from its file).

For every bundled model whose ground_truth.json claims a verified induction circuit: the demo prompt
("... Mr Darcy ... Mr" -> "Darcy", target logit(answer) - logit(distractor)), corrupted by replacing
the earlier cue token ("Mr" before the name) -- which removes exactly what K-composition matches on.
(Swapping the name itself instead corrupts only what the induction head copies, its V input: a
circuit for that contrast has no reason to contain the K edge, and it does not.) The extracted circuit (faithfulness >= FRACTION) must contain an edge from a listed
previous-token head into a listed induction head *through its key* (K-composition).

Thresholds (measured on the `induction` model: 2 layers x 4 heads, 110 edges).
* FRACTION = 0.9 for the direct edge. At the customary 0.8 (ACDC, EAP) the smallest top-EAP circuit
  (19 edges, faithfulness 0.82) carries K-composition only through MLP0: prev head -> MLP0 (mlp) and
  MLP0 -> induction heads (k) rank 4th-5th. The direct prev head -> induction head k edges rank 20th-21st
  because EAP, first order, underestimates them (exact -0.16 vs EAP -0.08 for L1H3: the induction
  softmax is saturated). At 0.9 (23 edges, 0.94) they are in. So the test asserts the K-composition
  path at 0.8 and the direct edge at 0.9.
* MAX_SHARE = 0.25: the circuit must stay small, at most a quarter of the edges (every edge in gives
  faithfulness 1.0 by definition, so a bar alone proves nothing).
* MIN_SPEARMAN = 0.5 for EAP vs exact path patching on the 20 strongest edges (measured 0.87): the
  order of the big edges must mostly agree; first-order estimates are not exact.

Skipped only when no bundled model is present; a present model without the property fails.
"""

from __future__ import annotations

import json

import pytest

from tdb_server.analyses import circuits as C
from tdb_server.analyses.inputs import TargetSpec, resolve_target
from tdb_server.model import load_model
from tdb_server.paths import bundled_models

MODELS = {name: p for name, p in bundled_models().items() if (p / "ground_truth.json").is_file()}
pytestmark = pytest.mark.skipif(not MODELS, reason="no bundled model yet (scripts/train_bundled.py)")

FRACTION = 0.9
PATH_FRACTION = 0.8
MAX_SHARE = 0.25
MIN_SPEARMAN = 0.5


def _claims_circuit(path) -> bool:
    return bool(json.loads((path / "ground_truth.json").read_text()).get("circuit_verified"))


CIRCUIT_MODELS = [name for name, p in MODELS.items() if _claims_circuit(p)]


def test_some_bundled_model_claims_an_induction_circuit():
    assert CIRCUIT_MODELS, f"no bundled model's ground_truth.json claims a verified circuit: {sorted(MODELS)}"


def demo_case(path):
    """(adapter, truth, clean ids, corrupted ids, target) for a bundled model's demo prompt."""
    truth = json.loads((path / "ground_truth.json").read_text())
    adapter = load_model(str(path), device="cpu", dtype="float32")
    demo = truth["demo"]
    tok = adapter.tokenizer
    ids = tok(demo["prompt"], add_special_tokens=False)["input_ids"]
    answer = tok(demo["answer"], add_special_tokens=False)["input_ids"]
    distractor = tok(demo["distractor"], add_special_tokens=False)["input_ids"]
    assert len(answer) == 1 and len(distractor) == 1, "the demo's answer and distractor must be single tokens"
    assert answer[0] in ids, f"the demo answer {demo['answer']!r} does not occur in the prompt"
    # K-composition is what finds the earlier name: the previous-token head marks the name's position as
    # "after the cue" (the prompt's last token, e.g. "Mr"), and the induction head's key matches that.
    # Corrupt the earlier cue (to the prompt's first token): same length, the name is still there, only
    # the key match is gone.
    cue = ids.index(answer[0]) - 1
    assert cue >= 0 and ids[cue] == ids[-1], "the demo must repeat the cue token before the name"
    bad = list(ids)
    bad[cue] = ids[0] if ids[0] != ids[-1] else distractor[0]
    target, run = resolve_target(adapter, TargetSpec(tokens=(demo["answer"],), distractors=(demo["distractor"],)), ids)
    assert run == ids
    return adapter, truth, ids, bad, target


@pytest.mark.parametrize("name", CIRCUIT_MODELS)
def test_extracted_circuit_has_k_composition(name):
    adapter, truth, ids, bad, target = demo_case(MODELS[name])
    scores = C.edge_attribution(adapter, ids, target, bad)
    assert scores.clean_value > scores.ablated_value, "the demo's logit difference does not favour the answer"
    found = C.extract_circuit(adapter, scores, FRACTION)
    topo = scores.topology
    reachable = int(topo.reach.sum())
    names = {scores.edge_name(e) for e in found.edges}
    prev = [f"blocks.{L}.attn.head.{h}" for L, h in truth["previous_token_heads"]]
    ind = [f"blocks.{L}.attn.head.{h}" for L, h in truth["induction_heads"]]
    k_edges = {(p, i, "k") for p in prev for i in ind}
    print(f"\n{name}: {len(found.edges)} of {reachable} edges, faithfulness {found.faithfulness:.3f}; "
          f"curve {found.curve}")
    assert k_edges & names, (f"{name}: no previous-token head {prev} -> induction head {ind} edge through k in "
                             f"the extracted circuit: {sorted(names)}")
    assert found.faithfulness >= FRACTION
    # at 0.8: a K-composition path prev head -> (MLP0 ->) induction head's key
    small = {scores.edge_name(e) for e in C.extract_circuit(adapter, scores, PATH_FRACTION).edges}
    mlp0_k = (any((p, "blocks.0.mlp", "mlp") in small for p in prev)
              and any(("blocks.0.mlp", i, "k") in small for i in ind))
    assert (k_edges & small) or mlp0_k, f"no K-composition path in the {PATH_FRACTION} circuit: {sorted(small)}"
    assert len(found.edges) <= MAX_SHARE * reachable, f"{len(found.edges)} of {reachable} edges is not a small circuit"
    check = C.verify(adapter, scores, 20)
    print(f"{name}: Spearman {check.spearman:.3f}, Pearson {check.pearson:.3f} on the top 20 edges")
    assert check.spearman >= MIN_SPEARMAN
