"""Integrated gradients say how complete they are, and refine their steps until they add up.

On the bundled model's own demo (its ground truth), the attributions of the default 32 steps from a
zero baseline do not add up to f(input) - f(baseline); every result reports the gap (Captum's
convergence delta) and the server triples the steps until it is within the tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from tdb_client import Target, TdbError


def _demo(client):
    demo = client.model_info().demo
    assert demo is not None, "the bundled model's ground truth has a demo"
    return demo.prompt, Target(demo.answer, distractors=demo.distractor)


def test_every_result_reports_its_completeness_gap(bundled_client):
    prompt, target = _demo(bundled_client)
    r = bundled_client.input_attribution(prompt, target, steps=32, max_steps=32)
    change = r.target.value - r.baseline_value
    assert r.steps == 32
    assert r.completeness_gap == pytest.approx(float(r.integrated_gradients.sum()) - change, abs=1e-4)
    assert r.converged == (abs(r.completeness_gap) <= r.tolerance * abs(change))
    assert r.completeness == pytest.approx(float(r.integrated_gradients.sum()) / change, rel=1e-4)


def test_steps_are_refined_until_the_gap_is_within_the_tolerance(bundled_client):
    prompt, target = _demo(bundled_client)
    coarse = bundled_client.input_attribution(prompt, target, steps=4, max_steps=4, tolerance=0.01)
    assert not coarse.converged, "4 steps from a zero baseline should not add up on the demo"
    r = bundled_client.input_attribution(prompt, target, steps=4, tolerance=0.01)
    change = r.target.value - r.baseline_value
    assert r.steps > 4 and r.steps in (12, 36, 108, 324, 972)          # tripled: the midpoints nest
    assert r.converged == (abs(r.completeness_gap) <= 0.01 * abs(change))
    assert abs(r.completeness_gap) < abs(coarse.completeness_gap)
    # the refined attributions are the plain midpoint rule with that many steps (earlier points reused)
    plain = bundled_client.input_attribution(prompt, target, steps=r.steps, max_steps=r.steps)
    np.testing.assert_allclose(r.integrated_gradients, plain.integrated_gradients, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(tolerance=1.5), dict(tolerance=-0.1), dict(steps=64, max_steps=32),
                                dict(max_steps=5000)])
def test_bad_refinement_options_are_refused(bundled_client, kw):
    prompt, target = _demo(bundled_client)
    with pytest.raises(TdbError) as e:
        bundled_client.input_attribution(prompt, target, **kw)
    assert e.value.reason == "OUT_OF_RANGE" and e.value.code.name == "INVALID_ARGUMENT"


def test_model_info_names_the_unknown_token_and_the_demo(bundled_client):
    info = bundled_client.model_info()
    ids, _ = bundled_client.tokenize("Pemberley")                 # not a word of the bundled vocabulary
    assert info.unk_token_id is not None and info.unk_token_id in ids
    ids, tokens = bundled_client.tokenize(info.demo.prompt)
    assert info.unk_token_id not in ids                          # the demo is written in the model's vocabulary
