"""The one definition of the correlations (tdb_server/analyses/stats.py), checked against values
computed by hand (scipy is not a dependency; scipy.stats.spearmanr's default, average ranks for
ties, is the rule)."""

import math

import torch

from tdb_server.analyses.stats import _ranks, pearson, spearman


def test_ties_share_their_average_rank():
    assert _ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [3.0, 0.0, 1.5, 1.5]
    assert _ranks(torch.tensor([5.0, 5.0, 5.0])).tolist() == [1.0, 1.0, 1.0]


def test_spearman_with_ties_is_pearson_of_average_ranks():
    # ranks of a: [0, 1.5, 1.5, 3] (ordinal ranks [0, 1, 2, 3] would give rho = 1)
    # centred: [-1.5, 0, 0, 1.5] . [-1.5, -0.5, 0.5, 1.5] = 4.5; norms sqrt(4.5), sqrt(5)
    a, b = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(spearman(a, b), 4.5 / math.sqrt(4.5 * 5), rel_tol=1e-12)
    # ties on both sides: a ranks [0, 1.5, 1.5, 3], b ranks [0.5, 0.5, 2.5, 2.5]
    # centred b: [-1, -1, 1, 1]; dot = 1.5 + 0 + 0 + 1.5 = 3; norms sqrt(4.5), 2 -> 3 / (2 sqrt(4.5))
    b2 = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert math.isclose(spearman(a, b2), 3 / (2 * math.sqrt(4.5)), rel_tol=1e-12)


def test_spearman_is_rank_only_and_signed():
    a = torch.tensor([0.1, 0.5, 0.2, 9.0])
    assert math.isclose(spearman(a, a ** 3), 1.0)
    assert math.isclose(spearman(a, -a), -1.0)


def test_pearson_by_hand():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])
    # centred [-1, 0, 1] . [-1, 1, 0] = 1; norms sqrt(2), sqrt(2)
    assert math.isclose(pearson(a, b), 0.5, rel_tol=1e-12)


def test_degenerate_inputs_are_nan():
    one, const = torch.tensor([1.0]), torch.tensor([2.0, 2.0, 2.0])
    assert math.isnan(spearman(one, one))
    assert math.isnan(pearson(const, torch.tensor([1.0, 2.0, 3.0])))
    assert math.isnan(spearman(const, torch.tensor([1.0, 2.0, 3.0])))
    # a NaN is not ranked as the largest value: it propagates, as scipy's nan_policy="propagate"
    assert math.isnan(spearman(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([1.0, 2.0, 3.0])))
