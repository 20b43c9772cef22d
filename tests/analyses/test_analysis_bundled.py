"""The bundled model's known induction circuit, found by the analyses (ground truth from its file).

Prompt, answer and distractor come from ground_truth.json's demo ("... Mr. Darcy ... Mr." ->
" Darcy" vs " Bingley"); the induction heads are those the training script measured.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from tdb_client import Target, TdbError
from tdb_server.analyses import TargetSpec, resolve_target
from tdb_server.analyses.node_table import TargetObjective, compute_node_table
from tdb_server.paths import bundled_models

pytestmark = pytest.mark.skipif(not bundled_models(), reason="no bundled model yet (scripts/train_bundled.py)")

NEAR_TOP = 3  # "at or near the top": within the first three heads


@pytest.fixture(scope="module")
def truth():
    from tdb_server.paths import circuit_model_path

    gt = json.loads((circuit_model_path() / "ground_truth.json").read_text())
    assert gt["induction_heads"], "the bundled model's card lists no induction head"
    return gt


def _rank_of_best(names: list[str], wanted: set[str]) -> int:
    return min(names.index(n) for n in wanted if n in names)


def test_induction_head_tops_the_direct_effects(bundled_client, truth):
    demo = truth["demo"]
    induction = {f"blocks.{l}.attn.head.{h}" for l, h in truth["induction_heads"]}
    r = bundled_client.node_table(demo["prompt"], Target(demo["answer"], demo["distractor"]), node_types=["head"],
                                  all_rows=True)
    assert r.target.exact and r.target.value > 0   # the model prefers the answer
    heads = r.all.to_pandas()
    heads = heads[heads.query_pos == r.target.position].sort_values("direct_effect", ascending=False)
    assert _rank_of_best(list(heads.node), induction) < NEAR_TOP, heads.head(6).to_string()


def test_induction_head_tops_the_ablation_effects(bundled_client, truth):
    demo = truth["demo"]
    induction = {f"blocks.{l}.attn.head.{h}" for l, h in truth["induction_heads"]}
    sweep = bundled_client.ablate(demo["prompt"], Target(demo["answer"], demo["distractor"]),
                                  "blocks.*.attn.head.*", separately=True).to_pandas()
    ranked = sweep.sort_values("effect")   # the most negative effect first: the most needed head
    assert ranked.effect.iloc[0] < 0
    assert _rank_of_best(list(ranked.node), induction) < NEAR_TOP, ranked.head(6).to_string()


def test_bundled_node_table_sums_and_matches_in_process(bundled_client, bundled_adapter, truth):
    demo = truth["demo"]
    wire = bundled_client.node_table(demo["prompt"], Target(demo["answer"], demo["distractor"]), all_rows=True)
    assert wire.direct_effect_sum == pytest.approx(wire.target.value, abs=1e-4)
    ids = bundled_adapter.tokenizer(demo["prompt"], add_special_tokens=False)["input_ids"]
    target, run = resolve_target(bundled_adapter, TargetSpec(tokens=(demo["answer"],),
                                                             distractors=(demo["distractor"],)), ids)
    local = compute_node_table(bundled_adapter, run, TargetObjective(target))
    np.testing.assert_array_equal(wire.all.ids, local.table.ids.numpy())
    np.testing.assert_array_equal(wire.all.metrics, local.table.metrics.numpy())


def test_a_target_word_outside_the_vocabulary_is_refused(bundled_client, truth):
    """The word-level model maps unknown words to its unknown token: a target must not silently become it."""
    demo = truth["demo"]
    with pytest.raises(TdbError) as e:
        bundled_client.node_table(demo["prompt"], Target(["Pemberley"], demo["distractor"]))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "BAD_TARGET"
    assert "not in the model's vocabulary" in str(e.value)


def test_node_table_under_ablations_explains_the_ablated_forward(bundled_client, truth):
    """Ablating the top induction head: the table's value is Ablate's `after`, its rows are zero, the
    direct effects still sum to the value, and the other induction heads are what is left."""
    demo = truth["demo"]
    target = Target(demo["answer"], demo["distractor"])
    clean = bundled_client.node_table(demo["prompt"], target, node_types=["head"], top_k=3)
    top = clean.top.to_pandas()
    head = ".".join(top.node[0].split(".")[:5])            # blocks.L.attn.head.H (rows are per position)
    ablated = bundled_client.node_table(demo["prompt"], target, ablations=[head], all_rows=True)
    after = bundled_client.ablate(demo["prompt"], target, [head]).results[0].after
    assert ablated.target.value == pytest.approx(after, abs=1e-4)
    assert ablated.target.value < clean.target.value
    assert ablated.direct_effect_sum == pytest.approx(ablated.target.value, abs=1e-3)
    rows = ablated.all.to_pandas()
    mine = rows[rows.node.str.startswith(head + "@") | (rows.node == head)]
    assert len(mine) and np.allclose(mine.direct_effect, 0.0, atol=1e-6) and np.allclose(mine.activation, 0.0)
    both = bundled_client.compare(demo["prompt"], demo["prompt"], target, ablations=[head])
    assert both.left_target.value == pytest.approx(after, abs=1e-4)


@pytest.mark.parametrize("ablation,words", [("blocks.1.attn", "whole layer"),
                                            ("blocks.1.attn.head.9", "out of range")])
def test_node_table_ablations_are_validated(bundled_client, truth, ablation, words):
    demo = truth["demo"]
    with pytest.raises(TdbError) as e:
        bundled_client.node_table(demo["prompt"], Target(demo["answer"], demo["distractor"]), ablations=[ablation])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in str(e.value)
