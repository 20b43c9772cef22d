"""Correlations between an approximation and the exact values it approximates (EAP vs path patching,
attribution patching vs exact patches, an explanation's prediction vs activations): the one definition
of each, as scipy.stats defines them.

* `pearson(a, b)`: the sample correlation coefficient, in float64; NaN when either side is constant.
* `spearman(a, b)`: Pearson of the ranks, ties sharing their *average* rank (scipy's `rankdata`
  method "average", the standard for Spearman's rho); NaN with fewer than 2 values.
* A NaN in either input makes both NaN (scipy's `nan_policy="propagate"`): a NaN is not a value to
  rank.
"""

from __future__ import annotations

import torch


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """x [n] -> ranks [n] float64, 0-based; tied values share the mean of the ranks they span."""
    x = x.double()
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)                     # [U], [n]
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """a [n], b [n] -> the Pearson correlation (NaN if either is constant or holds a NaN)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """a [n], b [n] -> Spearman's rho with average ranks for ties (NaN for n < 2 or a NaN input)."""
    if len(a) < 2 or bool(torch.isnan(a.double()).any() or torch.isnan(b.double()).any()):
        return float("nan")
    return pearson(_ranks(a), _ranks(b))
