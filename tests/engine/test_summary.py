"""Stop summaries (engine/summary.py) equal plain float64 statistics over the finite entries, with the
NaN / Inf counts, for finite tensors (the one-pass path every stop takes) and non-finite ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdb_server.engine.summary import summarize


def _reference(t: torch.Tensor) -> dict:
    a = t.detach().double().numpy().ravel()
    fin = a[np.isfinite(a)]
    return {"min": fin.min() if fin.size else math.nan, "max": fin.max() if fin.size else math.nan,
            "mean": fin.mean() if fin.size else math.nan, "std": fin.std(ddof=1) if fin.size > 1 else 0.0,
            "norm": float(np.sqrt((fin ** 2).sum())) if fin.size else math.nan,
            "nan_count": int(np.isnan(a).sum()), "inf_count": int(np.isinf(a).sum())}


CASES = {
    "activations": torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0)),
    "large offset, small spread": torch.randn(50, generator=torch.Generator().manual_seed(1)) * 1e-2 + 1e3,
    "one element": torch.tensor([2.5]),
    "float16": torch.randn(4, 4, generator=torch.Generator().manual_seed(2)).half(),
    "integers": torch.arange(10),
    "a NaN": torch.tensor([1.0, float("nan"), 3.0]),
    "both infinities": torch.tensor([1.0, float("inf"), -float("inf"), 2.0]),
    "finite values whose sum overflows": torch.full((3,), 3e38),
}


@pytest.mark.parametrize("name", list(CASES))
def test_summary_equals_float64_statistics_of_the_finite_entries(name):
    t = CASES[name]
    got, want = summarize(t), _reference(t)
    assert got.shape == tuple(t.shape) and got.numel == t.numel()
    assert (got.nan_count, got.inf_count) == (want["nan_count"], want["inf_count"])
    for key in ("min", "max", "mean", "std"):
        assert math.isclose(getattr(got, key), want[key], rel_tol=1e-5, abs_tol=1e-6), (key, getattr(got, key), want)
    if math.isfinite(want["norm"]) and want["norm"] < 3e38:
        assert math.isclose(got.norm, want["norm"], rel_tol=1e-5)


def test_only_nans():
    got = summarize(torch.full((2, 3), float("nan")))
    assert got.nan_count == 6 and math.isnan(got.mean) and got.std == 0.0
